"""The NeMo Conformer-CTC recipe as a deployed artifact: features -> log-probs ONNX (NeMo's exporter),
WER of ONNX Runtime and OpenVINO on the test split vs the PyTorch models.

Restores the FP32 ``.nemo`` written by ``recipes/NeMo/asr/train_conformer_ctc.py``,
quantizes it W8A8 (``quantize_asr_model``: ESC with its defaults, NeMo's WER as
the objective, the first 100 calibration utterances), exports FP32 (NeMo's
``model.export``) and INT8 (``export_quantized_asr_model``: NeMo's exporter with
Q/DQ pairs), and scores every model on the test manifest with NeMo's ``WER``
and the model's own greedy CTC decoding; the preprocessor stays in PyTorch (the
exported graph starts at the mel features, as NeMo's export does). OpenVINO
runs as compiled from the file and with the fusion barriers
``esc-quantize export --format openvino`` adds (probed on two calibration
batches). Both graphs get a positional-encoding table sized for the longest
manifest utterance (``max_audio_seconds``); the file sizes are reported with
NeMo's own table too::

    python recipes/NeMo/asr/train_conformer_ctc.py data.manifest_dir=/tmp/nemo_asr/manifests \\
        output.model=/tmp/nemo_asr/conformer_ctc_char.nemo output.metrics=/tmp/nemo_asr/train_metrics.json
    python benchmarks/nemo_artifact.py --model /tmp/nemo_asr/conformer_ctc_char.nemo \\
        --manifests /tmp/nemo_asr/manifests --out /tmp/nemo_art --results benchmarks/results/nemo_artifact
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_report import artifact_lines, wer_targets, write_report  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402


class ArtifactASR(torch.nn.Module):
    """An exported ``(features, lengths) -> log-probs`` graph behind a NeMo CTC model's call,
    so :meth:`ASRFeatureCache.word_error_rate` scores it with the reference model's decoding."""

    def __init__(self, runner, reference):
        super().__init__()
        self.runner, self.reference = runner, reference
        self.decoding = reference.decoding

    def forward(self, processed_signal, processed_signal_length):
        log_probs = torch.from_numpy(self.runner(processed_signal.numpy(), processed_signal_length.numpy())[0])
        with torch.no_grad():  # the encoder's output lengths (a function of the input lengths only)
            _, encoded_len, _ = self.reference(processed_signal=processed_signal,
                                               processed_signal_length=processed_signal_length)
        return log_probs, encoded_len, log_probs.argmax(-1)


@torch.no_grad()
def transcripts(cache, model):
    """Greedy CTC transcripts of the cached utterances, with the reference model's decoding."""
    out = []
    for feats, lens, _, _ in cache.batches:
        log_probs, encoded_len, _ = model(processed_signal=feats, processed_signal_length=lens)
        out += [h.text for h in model.decoding.ctc_decoder_predictions_tensor(log_probs, encoded_len)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="FP32 .nemo from train_conformer_ctc.py")
    p.add_argument("--manifests", required=True, help="folder with calibration.json and test.json")
    p.add_argument("--out", required=True, help="folder for the ONNX files")
    p.add_argument("--results", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-audio-seconds", type=float, default=None,
                   help="positional table of the exported graphs (default: the longest manifest utterance)")
    args = p.parse_args(argv)
    from nemo.collections.asr.models import ASRModel

    from esc_plugin.export import OrtRunner
    from esc_plugin.export.openvino import OpenVinoRunner, int8_compute_ops
    from esc_plugin.export.openvino_barriers import find_fusion_barriers
    from esc_plugin.nemo.export import export_example
    from esc_plugin.nemo import (ASRFeatureCache, encoder_positions, export_quantized_asr_model,
                                 quantization_config, quantize_asr_model, read_manifest)

    prov = provenance()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    manifests = Path(args.manifests)
    fp32 = ASRModel.restore_from(args.model, map_location="cpu").eval()
    test = ASRFeatureCache.from_manifest(fp32, manifests / "test.json", batch_size=64, progress=False)
    config = quantization_config("esc", bits=8)
    t0 = time.perf_counter()
    qmodel = quantize_asr_model(fp32, config, manifest=str(manifests / "calibration.json"), n_samples=100)
    quant_seconds = time.perf_counter() - t0
    seconds = args.max_audio_seconds or math.ceil(10 * max(
        e["duration"] for m in ("calibration", "test") for e in read_manifest(manifests / f"{m}.json"))) / 10
    fp32.export(str(out / "fp32_nemo_table.onnx"))
    export_quantized_asr_model(qmodel, str(out / "int8_nemo_table.onnx"))
    with encoder_positions(fp32, seconds) as frames:  # NeMo's 256-frame example would not fit the table
        fp32.export(str(out / "fp32.onnx"), input_example=export_example(fp32, frames))
    export_quantized_asr_model(qmodel, str(out / "int8.onnx"), max_audio_seconds=seconds)
    calib = [(f.numpy(), n.numpy()) for f, n, _, _ in qmodel.esc_features.batches[:2]]
    barriers = find_fusion_barriers(str(out / "int8.onnx"), calib)

    rows, kernels = [], {}
    for name, module, path in (("FP32", fp32, out / "fp32.onnx"), ("W8A8", qmodel, out / "int8.onnx")):
        reference = 100 * test.word_error_rate(module)
        rows.append({"model": name, "runtime": "PyTorch", "wer": reference})
        torch_hyps = transcripts(test, module)
        runners = [("ONNX Runtime", OrtRunner(str(path), threads=args.threads)),
                   ("OpenVINO", OpenVinoRunner(str(path), threads=args.threads))]
        if name == "W8A8":
            runners.append(("OpenVINO + fusion barriers", OpenVinoRunner(
                str(path), threads=args.threads, fusion_barriers=barriers["barriers"])))
        for runtime, runner in runners:
            artifact = ArtifactASR(runner, module)
            wer = 100 * test.word_error_rate(artifact)
            hyps = transcripts(test, artifact)
            rows.append({"model": name, "runtime": runtime, "wer": wer,
                         "relative_to_pytorch": (wer - reference) / reference if reference else None,
                         "identical": sum(a == b for a, b in zip(hyps, torch_hyps))})
            if runtime.startswith("OpenVINO") and name == "W8A8":
                kernels[runtime] = int8_compute_ops(runner)
        print(rows[-len(runners) - 1:], flush=True)
    sizes = {k: os.path.getsize(out / f"{k}.onnx") for k in ("fp32", "int8", "fp32_nemo_table", "int8_nemo_table")}
    targets = wer_targets(rows)
    res = {"provenance": prov, "model": args.model, "n_test": test.n_utterances, "quantization": "esc W8A8 defaults",
           "quantize_seconds": round(quant_seconds, 1), "rows": rows, "bytes": sizes, "max_audio_seconds": seconds,
           "openvino_int8_compute_ops": kernels, "fusion_barriers": barriers, "targets": targets}
    md = ["# NeMo Conformer-CTC (in-project recipe) artifact: WER from ORT / OpenVINO", "",
          f"Command: `python {' '.join(prov['command'])}` at commit {prov['commit']}"
          f"{' (uncommitted changes in the tree)' if prov['dirty'] else ''}", "",
          f"Model `{args.model}`; {test.n_utterances} test utterances (NeMo's WER, greedy CTC); W8A8 ESC with "
          f"its defaults on the first 100 calibration utterances ({quant_seconds:.0f} s). Graphs exported with "
          f"the positional table sized for {seconds} s (`max_audio_seconds`); NeMo's own table (pos_emb_max_len): "
          f"FP32 {sizes['fp32_nemo_table'] / 1e6:.2f} MB, INT8 {sizes['int8_nemo_table'] / 1e6:.2f} MB.", "",
          "| model | runtime | WER % ↓ | relative to PyTorch | identical transcripts |", "|---|---|---|---|---|"]
    for r in rows:
        rel, same = r.get("relative_to_pytorch"), r.get("identical")
        md.append(f"| {r['model']} | {r['runtime']} | {r['wer']:.2f} | {'-' if rel is None else f'{100 * rel:+.1f} %'} | "
                  f"{'-' if same is None else f'{same}/{test.n_utterances}'} |")
    write_report(results, res, md + artifact_lines(sizes, kernels, barriers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
