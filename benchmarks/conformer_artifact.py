"""The in-project SpeechBrain Conformer-CTC as a deployed artifact: features -> CTC logits ONNX,
greedy CTC transcripts from ONNX Runtime and OpenVINO vs the PyTorch models, on the test split.

Loads the trained recipe run (``$ESC_CONFORMER_CTC_RUN`` or ``--run``: the
output folder of ``recipes/SpeechCommands/ASR/conformer_ctc/train.py``), takes
its calibration (100) and test manifests, quantizes W8A8 (default: label-free
ESC with its defaults, on the calibration features), exports FP32
and INT8 (``export_qdq_onnx``, default layout) and decodes the test clips with
PyTorch, ONNX Runtime and OpenVINO, as exported and with the fusion barriers
``esc-quantize export --format openvino`` adds (``esc_plugin.export.ctc.ctc_greedy_decode``,
the recipe's character tokenizer). Reports WER per model and runtime, the WER
of each artifact against its PyTorch model and the share of identical
transcripts.

    ESC_CONFORMER_CTC_RUN=runs/conformer_ctc/1986 python benchmarks/conformer_artifact.py \
        --out runs/conformer_artifact --results benchmarks/results/conformer_artifact
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import esc_plugin as esc  # noqa: E402
from artifact_report import artifact_lines, wer_targets, write_report  # noqa: E402
from esc_plugin.metrics.text import word_error_rate  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402

ROW = {"method": "esc", "init": "best", "sigma0": 0.3}


def load_run(run, shared_root=None):
    """(model wrapper, calibration feats, test feats, test words, tokenizer) of a trained recipe run."""
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml
    from latency_models import ConformerCTC

    from esc_plugin.tasks.audio import load_audio, pad_or_trim, resolve_shared_root

    recipe = HERE.parent / "recipes" / "SpeechCommands" / "ASR" / "conformer_ctc"
    with open(recipe / "hparams" / "conformer_ctc.yaml") as f:
        hp = load_hyperpyyaml(f, {"data_folder": "unused", "output_folder": str(run)})
    hp["checkpointer"].recover_if_possible()
    tokenizer = sb.dataio.encoder.CTCTextEncoder()
    tokenizer.load(os.path.join(hp["save_folder"], "tokenizer.txt"))
    data_root = resolve_shared_root(shared_root) / "data" / "speech_commands"

    def feats_of(manifest):
        with open(Path(run) / "manifests" / manifest) as f:
            items = sorted((e for e in json.load(f).values() if e.get("words")), key=lambda e: e["wav"])
        wavs = torch.stack([pad_or_trim(load_audio(e["wav"].format(data_root=data_root), hp["sample_rate"]),
                                        hp["sample_rate"]) for e in items])
        with torch.no_grad():
            feats = hp["normalize"].eval()(hp["compute_features"](wavs), torch.ones(len(items)))
        return feats, [e["words"] for e in items]

    calib, _ = feats_of("calib.json")
    test, words = feats_of("test.json")
    model = ConformerCTC(hp["CNN"], hp["Transformer"], hp["ctc_lin"]).eval()
    return model, calib, test, words, tokenizer, hp["blank_index"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.environ.get("ESC_CONFORMER_CTC_RUN"), help="trained recipe output folder")
    p.add_argument("--out", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--quant-config", type=json.loads, default={}, metavar="JSON")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not args.run or not (Path(args.run) / "save").is_dir():
        raise SystemExit("give --run (or ESC_CONFORMER_CTC_RUN): the output folder of "
                         "recipes/SpeechCommands/ASR/conformer_ctc/train.py")
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from esc_plugin.export import OrtRunner, export_qdq_onnx
    from esc_plugin.export.ctc import ctc_greedy_decode
    from esc_plugin.export.openvino import OpenVinoRunner, int8_compute_ops
    from esc_plugin.export.openvino_barriers import find_fusion_barriers
    from latency_export import export_fp32
    from latency_models import BenchModel

    model, calib, test, words, tokenizer, blank = load_run(args.run)
    batches = [calib[i:i + 25] for i in range(0, len(calib), 25)]

    def loop(m):
        with torch.no_grad():
            for b in batches:
                m(b)

    config = {**ROW, **args.quant_config, "bits": 8, "budget": 100, "seed": 0}
    t0 = time.perf_counter()
    qmodel = esc.quantize(model, esc.QuantConfig(**config), loop, None, progress=True)
    quant_seconds = time.perf_counter() - t0
    spec = BenchModel("conformer_ctc", model, test[:8], [calib], input_name="fbank", output_name="logits")
    export_fp32(spec, out / "fp32.onnx")
    export_qdq_onnx(qmodel, (test[:1],), out / "int8.onnx", ["fbank"], ["logits"])

    def transcripts(scores):
        return [" ".join("".join(tokenizer.decode_ndim(t)).split()) for t in ctc_greedy_decode(scores, blank)]

    rows, torch_hyps, ov_int8, barriers = [], {}, None, None
    for name, module, path in (("FP32", model, out / "fp32.onnx"), ("W8A8", qmodel, out / "int8.onnx")):
        with torch.no_grad():
            torch_hyps[name] = transcripts(module(test).numpy())
        rows.append({"model": name, "runtime": "PyTorch", "wer": 100 * word_error_rate(words, torch_hyps[name])})
        runners = [("ONNX Runtime", OrtRunner(path, threads=args.threads)),
                   ("OpenVINO", OpenVinoRunner(path, threads=args.threads))]
        if name == "W8A8":  # what `esc-quantize export --format openvino` ships: probed on calibration batches
            barriers = find_fusion_barriers(str(path), [(b.numpy(),) for b in batches[:2]])
            runners.append(("OpenVINO + fusion barriers",
                            OpenVinoRunner(path, threads=args.threads, fusion_barriers=barriers["barriers"])))
        for runtime, runner in runners:
            hyps = []
            for i in range(0, len(test), 64):
                hyps += transcripts(runner(test[i:i + 64].numpy())[0])
            if runtime.startswith("OpenVINO") and name == "W8A8":
                ov_int8 = {**(ov_int8 or {}), runtime: int8_compute_ops(runner)}
            rows.append({"model": name, "runtime": runtime, "wer": 100 * word_error_rate(words, hyps),
                         "wer_vs_pytorch": 100 * word_error_rate(torch_hyps[name], hyps),
                         "identical": sum(a == b for a, b in zip(hyps, torch_hyps[name]))})
        print(rows[-len(runners) - 1:], flush=True)
    sizes = {k: os.path.getsize(out / f"{k}.onnx") for k in ("fp32", "int8")}
    targets = wer_targets(rows)
    prov = provenance()
    res = {"provenance": prov, "run": str(args.run), "n_test": len(words), "quantization": config,
           "quantize_seconds": round(quant_seconds, 1), "rows": rows, "bytes": sizes,
           "openvino_int8_compute_ops": ov_int8, "fusion_barriers": barriers, "targets": targets}
    trained = Path(args.run) / "train_log.txt"
    res["train_log_last_line"] = trained.read_text().strip().splitlines()[-1] if trained.is_file() else None
    md = ["# Conformer-CTC (in-project SpeechBrain recipe) artifact: CTC transcripts from ORT / OpenVINO", "",
          f"Command: `python {' '.join(prov['command'])}` at commit {prov['commit']}"
          f"{' (uncommitted changes in the tree)' if prov['dirty'] else ''}", "",
          f"Trained run `{args.run}` (last epoch: {res['train_log_last_line']}); {len(words)} test clips (one word "
          f"each); W8A8 `{config}` label-free on the 100 calibration clips ({quant_seconds:.0f} s).", "",
          "| model | runtime | WER % ↓ | WER % vs PyTorch | identical transcripts |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['runtime']} | {r['wer']:.2f} | "
                  f"{r['wer_vs_pytorch']:.2f} | {r['identical']}/{len(words)} |" if "identical" in r else
                  f"| {r['model']} | {r['runtime']} | {r['wer']:.2f} | - | - |")
    write_report(results, res, md + artifact_lines(sizes, ov_int8, barriers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
