"""Whisper tiny.en as a deployed artifact: greedy transcripts from ONNX Runtime and OpenVINO vs PyTorch.

Quantizes Whisper tiny.en W8A8 (default: the label-free ``esc_recommended``
row of ``benchmarks/quality.py``, plus ``quantize_embeddings`` so that the
tied 51,864 x 384 token table is stored in int8), or rebuilds a saved
quantization (``--state quantized.pt``); exports the FP32 and the quantized
model as encoder + decoder-step ONNX (``esc_plugin.export.whisper``: static
KV cache, one token per step) and transcribes the shared clips with:

* PyTorch FP32 and the fake-quantized PyTorch model (``tasks.whisper.transcribe_tokens``);
* ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8 (``WhisperArtifact``, same
  prompt, suppression and stop rules); INT8 twice: the standard QDQ export
  (``W8A8``: QuantizeLinear saturates at -128) and ``W8A8 clip``
  (``clip_activations=True``: at -127, as the simulation).

For each: corpus WER on the task's 9 evaluation clips (the quality table's
split; the other 9 calibrated the scales) and on all 18, and, for the
artifacts, the WER of their transcripts against their PyTorch counterpart's
and how many clips decode to identical tokens.

    python benchmarks/whisper_artifact.py --out runs/whisper_artifact \
        --results benchmarks/results/whisper_artifact
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import esc_plugin as esc  # noqa: E402
from esc_plugin.core.io import write_bytes, write_json  # noqa: E402
from esc_plugin.metrics.text import word_error_rate  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402

ROW = {"method": "esc", "init": "best", "sigma0": 0.3, "quantize_embeddings": True}  # esc_recommended + int8 tables
BACKENDS = ("pytorch", "ort", "openvino")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder: quantized.pt, fp32/ and int8/ ONNX folders")
    p.add_argument("--results", required=True, help="where results.json / results.md go")
    p.add_argument("--state", help="a quantized.pt to rebuild instead of quantizing")
    p.add_argument("--quant-config", type=json.loads, default={}, metavar="JSON",
                   help="extra QuantConfig fields over the default row")
    p.add_argument("--threads", type=int, default=2, help="torch threads and runtime threads")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--runtimes", nargs="+", default=["ort", "openvino"], choices=["ort", "openvino"])
    return p.parse_args(argv)


def quantized_model(task, args, out):
    if args.state:
        return esc.load(task.model, args.state), {"state": args.state}
    config = esc.QuantConfig(bits=8, budget=100, seed=0, **{**ROW, **args.quant_config})
    t0 = time.perf_counter()
    q = esc.quantize(task.model, config, task.forward_loop, None, progress=True)
    seconds = time.perf_counter() - t0
    esc.save(q, out / "quantized.pt")
    return q, {"config": {**ROW, **args.quant_config, "bits": 8, "budget": 100, "seed": 0},
               "objective": "label-free (distillation to FP32 outputs) + selection guard",
               "quantize_seconds": round(seconds, 1), "state": str(out / "quantized.pt")}


def scores(tok, refs, eval_idx, tokens, against=None):
    hyps = tok.batch_decode(tokens, skip_special_tokens=True)
    row = {"wer_eval": 100 * word_error_rate([refs[i] for i in eval_idx], [hyps[i] for i in eval_idx]),
           "wer_all": 100 * word_error_rate(refs, hyps), "hyps": hyps}
    if against is not None:
        ref_hyps = tok.batch_decode(against, skip_special_tokens=True)
        row["wer_vs_pytorch_all"] = 100 * word_error_rate(ref_hyps, hyps)
        row["identical_clips"] = sum(a == b for a, b in zip(tokens, against))
    return row


def markdown(res):
    lines = ["# Whisper tiny.en artifacts: greedy transcripts from ONNX Runtime / OpenVINO vs PyTorch", "",
             f"Command: `python {' '.join(res['provenance']['command'])}` at commit "
             f"{res['provenance']['commit']}{' (uncommitted changes in the tree)' if res['provenance']['dirty'] else ''}",
             "", res["layout"], "", f"Quantization: {res['quantization']}", "",
             f"Clips: {res['n_eval']} evaluation clips (the quality table's split) and all {res['n_all']} "
             "transcribed clips (the other 9 calibrated the scales); corpus WER %, greedy, "
             f"max {res['max_new_tokens']} tokens.", "",
             "| model | runtime | WER % eval ↓ | WER % all 18 | WER % vs PyTorch (all 18) | identical clips | "
             "decode s |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        vs = f"{r['wer_vs_pytorch_all']:.2f}" if "wer_vs_pytorch_all" in r else "-"
        same = f"{r['identical_clips']}/{res['n_all']}" if "identical_clips" in r else "-"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['wer_eval']:.2f} | {r['wer_all']:.2f} | {vs} | "
                     f"{same} | {r['seconds']:.1f} |")
    lines += ["", "| ONNX files | encoder MB | decoder MB | total × FP32 |", "|---|---|---|---|"]
    fp32_total = sum(res["bytes"]["FP32"].values())
    for model, b in res["bytes"].items():
        lines.append(f"| {model} | {b['encoder'] / 1e6:.2f} | {b['decoder'] / 1e6:.2f} | "
                     f"{sum(b.values()) / fp32_total:.2f} |")
    lines += ["", "Targets (artifact WER within 2 % relative of the fake-quantized PyTorch model):"]
    lines += [f"* {t}" for t in res["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from esc_plugin.export.whisper import WhisperArtifact, export_whisper
    from esc_plugin.tasks import get_task
    from esc_plugin.tasks.audio import resolve_shared_root
    from esc_plugin.tasks.whisper import load_clips, load_whisper, log_mel, split_clips, transcribe_tokens

    task = get_task("whisper")
    qmodel, quant_info = quantized_model(task, args, out)
    root = resolve_shared_root(None)
    _, feature_extractor, tok = load_whisper(root)
    calib, evaluation = split_clips(load_clips(root), None, 0)  # the task's split (seed 0, half)
    clips = evaluation + calib
    mel = log_mel(feature_extractor, [c["wav"] for c in clips])
    refs, eval_idx = [c["ref"] for c in clips], list(range(len(evaluation)))
    rows, torch_tokens, sizes = [], {}, {}
    for name, model, clip in (("FP32", task.model, False), ("W8A8", qmodel, False), ("W8A8 clip", qmodel, True)):
        if name not in torch_tokens and not clip:
            t0 = time.perf_counter()
            torch_tokens[name] = transcribe_tokens(model, mel, batch_size=9, max_new_tokens=args.max_new_tokens)
            rows.append({"model": name, "runtime": "PyTorch", "seconds": time.perf_counter() - t0,
                         **scores(tok, refs, eval_idx, torch_tokens[name])})
            print(f"{name} PyTorch WER eval {rows[-1]['wer_eval']:.2f}", flush=True)
        folder = out / name.lower().replace(" ", "_")
        spec = export_whisper(model, folder, mel[:1], clip_activations=clip)
        sizes[name] = spec["bytes"]
        for runtime in args.runtimes:
            artifact = WhisperArtifact(folder, runtime, threads=args.threads)
            t0 = time.perf_counter()
            tokens = []
            for i in range(0, len(mel), 9):
                tokens += artifact(mel[i:i + 9], max_new_tokens=args.max_new_tokens)
            rows.append({"model": name, "runtime": {"ort": "ONNX Runtime", "openvino": "OpenVINO"}[runtime],
                         "seconds": time.perf_counter() - t0,
                         **scores(tok, refs, eval_idx, tokens, torch_tokens[name.split()[0]])})
            print(f"{name} {runtime} WER eval {rows[-1]['wer_eval']:.2f}, vs PyTorch "
                  f"{rows[-1]['wer_vs_pytorch_all']:.2f}", flush=True)
    pytorch_q = next(r for r in rows if r["model"] == "W8A8" and r["runtime"] == "PyTorch")
    targets = []
    for r in rows:
        if r["model"].startswith("W8A8") and r["runtime"] != "PyTorch":
            rel = abs(r["wer_eval"] - pytorch_q["wer_eval"]) / max(pytorch_q["wer_eval"], 1e-9)
            targets.append(f"{r['runtime']} {r['model']}: WER {r['wer_eval']:.2f} vs PyTorch {pytorch_q['wer_eval']:.2f} "
                           f"({100 * rel:.1f} % relative): {'met' if rel <= 0.02 else 'not met'}")
    from esc_plugin.export import int8_kernels_exact
    res = {"provenance": provenance(), "quantization": quant_info, "max_new_tokens": args.max_new_tokens,
           "n_eval": len(evaluation), "n_all": len(clips), "clip_ids": [c["id"] for c in clips],
           "refs": refs, "rows": rows, "bytes": sizes, "targets": targets,
           "ort_int8_kernels_exact_on_this_cpu": int8_kernels_exact(),
           "layout": ("Layout: encoder.onnx (mel -> cross-attention K/V of every decoder layer) + decoder.onnx "
                      "(one token per step, static KV cache of prompt + max tokens; the prefix is not re-run); "
                      "OpenVINO with f32 inference precision; threads "
                      f"{args.threads}. ONNX Runtime int8 kernels exact on this CPU: {int8_kernels_exact()} "
                      "(AVX2 without VNNI saturates u8 x s8 pair sums).")}
    write_json(results / "results.json", res)
    write_bytes(results / "results.md", markdown(res).encode())
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
