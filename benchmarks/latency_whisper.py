"""Latency of a full Whisper tiny.en transcription (encoder + greedy decoding) of a 10 s clip.

Backends: PyTorch FP32 (Hugging Face modules, KV cache: ``tasks.whisper.transcribe_tokens``),
ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8 on the whole-model export
(``esc_plugin.export.whisper``: encoder + decoder-step ONNX, static KV cache,
one token per step). The INT8 model is a saved quantization (``--state``, e.g.
the ESC model of ``benchmarks/whisper_artifact.py``) or, without it, W8A8
``max``; ``quantize_embeddings`` is on so the token table is int8 too.

One clip: the transcribed shared clip closest to 10 s, cut / padded to 10 s
(Whisper pads every input to 30 s of log-mel); batch 8 = 8 copies. Greedy
decoding runs to the end-of-text token (cap ``--max-new-tokens``); the number
of generated tokens is reported per backend, since an INT8 model that decodes a
different number of tokens does different work. Backends are interleaved
(rotated order every round), median of ``--repeats`` rounds.

    python benchmarks/latency_whisper.py --out runs/latency_whisper --state runs/whisper_artifact/quantized.pt \
        --results benchmarks/results/latency
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from latency import describe_machine, stats, time_interleaved, write_atomic  # noqa: E402

CLIP_SECONDS = 10.0
LABELS = {"pytorch_fp32": "PyTorch FP32 (eager, KV cache)", "ort_fp32": "ORT FP32", "ort_int8": "ORT INT8",
          "ov_fp32": "OpenVINO FP32", "ov_int8": "OpenVINO INT8"}
OWN = {"ort_int8": "ort_fp32", "ov_int8": "ov_fp32"}


def ten_second_mel(root, fe):
    from esc_plugin.tasks.audio import pad_or_trim
    from esc_plugin.tasks.whisper import load_clips, log_mel

    clips = load_clips(root)
    clip = min(clips, key=lambda c: abs(len(c["wav"]) / 16000 - CLIP_SECONDS))
    wav = pad_or_trim(clip["wav"], int(16000 * CLIP_SECONDS))
    return log_mel(fe, [wav]), clip["id"], len(clip["wav"]) / 16000


def export(out, root, state, max_calib_tokens=20):
    import esc_plugin as esc
    from esc_plugin.export.whisper import export_whisper
    from esc_plugin.tasks.whisper import load_clips, load_whisper, log_mel, transcribe_tokens

    model, fe, _ = load_whisper(root)
    mel, clip_id, seconds = ten_second_mel(root, fe)
    if state:
        qmodel, how = esc.load(model, state), f"esc.load({state})"
    else:
        calib = log_mel(fe, [c["wav"] for c in sorted(load_clips(root), key=lambda c: c["id"])[-4:]])
        qmodel = esc.quantize(model, esc.QuantConfig(bits=8, method="max", quantize_embeddings=True),
                              lambda m: transcribe_tokens(m, calib, max_new_tokens=max_calib_tokens),
                              progress=False)
        how = "W8A8 max, quantize_embeddings, 4 clips"
    sizes = {"fp32": export_whisper(model, out / "fp32", mel)["bytes"],
             "int8": export_whisper(qmodel, out / "int8", mel)["bytes"]}
    return model, mel, {"clip": clip_id, "clip_seconds": round(seconds, 2), "int8_model": how, "bytes": sizes}


def measure(model, mel, out, batch_sizes, threads, repeats, warmup, max_new_tokens):
    from esc_plugin.export.whisper import WhisperArtifact
    from esc_plugin.tasks.whisper import transcribe_tokens

    torch.set_num_threads(threads)
    artifacts = {f"{rt}_{p}": WhisperArtifact(out / p, "ort" if rt == "ort" else "openvino", threads)
                 for rt in ("ort", "ov") for p in ("fp32", "int8")}
    rows, tokens = [], {}
    for b in batch_sizes:
        x = mel.repeat(b, 1, 1)
        xn = x.numpy()
        runners = {"pytorch_fp32": lambda x=x: transcribe_tokens(model, x, batch_size=b,
                                                                 max_new_tokens=max_new_tokens)}
        runners.update({k: (lambda a=a: a(xn, max_new_tokens)) for k, a in artifacts.items()})
        for name, run in runners.items():
            tokens[(name, b)] = run()
        times = time_interleaved(runners, warmup, repeats, f"whisper transcription b{b}")
        for name in runners:
            rows.append({"model": "whisper_transcription", "backend": name, "batch": b, "threads": threads,
                         "tokens": len(tokens[(name, b)][0]), **stats(times[name])})
    for r in rows:
        own = next((x["median_ms"] for x in rows if x["batch"] == r["batch"]
                    and x["backend"] == OWN.get(r["backend"], r["backend"])), None)
        r["speedup_vs_own_fp32"] = round(own / r["median_ms"], 3)
        base = next(x["median_ms"] for x in rows if x["batch"] == r["batch"] and x["backend"] == "ort_fp32")
        r["speedup_vs_ort_fp32"] = round(base / r["median_ms"], 3)
    same = {name: tokens[(name, batch_sizes[0])][0] == tokens[("pytorch_fp32", batch_sizes[0])][0]
            for name in LABELS}
    return rows, same, {k[0]: v[0] for k, v in tokens.items() if k[1] == batch_sizes[0]}


def markdown(res):
    info = res["export"]
    lines = ["# Whisper tiny.en: full transcription of a 10 s clip (encoder + greedy decoding)", "",
             f"Produced by `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']}, ISA {', '.join(res['machine']['isa'])}; load average "
             f"{res['machine']['load_average_start']} at start, {res['load_average_end']} at end; "
             f"{res['machine']['load_note']}", "",
             f"Clip {info['clip']} ({info['clip_seconds']} s, cut/padded to 10 s); INT8 model: {info['int8_model']}; "
             f"{res['threads']} thread(s); median of {res['repeats']} interleaved rounds after {res['warmup']} warm-up.",
             "", "| batch | backend | median ms | p90 ms | runs | tokens | speedup vs own FP32 | vs ORT FP32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {LABELS[r['backend']]} | {r['median_ms']:.0f} | {r['p90_ms']:.0f} | "
                     f"{r['runs']} | {r['tokens']} | {r['speedup_vs_own_fp32']:.2f}× | {r['speedup_vs_ort_fp32']:.2f}× |")
    b = info["bytes"]
    lines += ["", "| ONNX files | encoder MB | decoder MB | total × FP32 |", "|---|---|---|---|"]
    for k in ("fp32", "int8"):
        lines.append(f"| {k.upper()} | {b[k]['encoder'] / 1e6:.2f} | {b[k]['decoder'] / 1e6:.2f} | "
                     f"{sum(b[k].values()) / sum(b['fp32'].values()):.2f} |")
    lines += ["", "Transcript identical to PyTorch FP32 (batch 1, tokens): "
              + ", ".join(f"{LABELS[k]} {'yes' if v else 'no'}" for k, v in res["same_as_pytorch_fp32"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import shlex

    from esc_plugin.runner import provenance
    from esc_plugin.tasks.audio import resolve_shared_root

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=str(HERE / "results" / "latency"))
    p.add_argument("--state", help="quantized.pt of Whisper tiny.en (default: W8A8 max)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--load-note", default="")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    out = Path(args.out)
    model, mel, info = export(out, resolve_shared_root(None), args.state)
    machine = describe_machine(args.load_note)
    rows, same, tokens = measure(model, mel, out, args.batch_sizes, args.threads, args.repeats, args.warmup,
                                 args.max_new_tokens)
    import os
    res = {"command": "python benchmarks/latency_whisper.py " + shlex.join(argv), "provenance": provenance(),
           "machine": machine, "load_average_end": [round(v, 2) for v in os.getloadavg()], "export": info,
           "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
           "same_as_pytorch_fp32": same, "tokens_batch1": tokens}
    results = Path(args.results)
    write_atomic(results / "whisper_transcription.json", json.dumps(res, indent=2) + "\n")
    write_atomic(results / "whisper_transcription.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
