"""What the whole-model artifact benchmarks (``conformer_artifact.py``, ``nemo_artifact.py``) share:
the 2 %-relative WER target per runtime, the files / kernels / fusion-barrier lines, and writing."""
from esc_plugin.core.io import write_bytes, write_json


def wer_targets(rows, relative=0.02):
    """One line per INT8 runtime row: its WER against the PyTorch W8A8 model's, met or not."""
    pt = next(r["wer"] for r in rows if r["model"] == "W8A8" and r["runtime"] == "PyTorch")
    return [f"{r['runtime']} INT8 WER {r['wer']:.2f} vs PyTorch W8A8 {pt:.2f}: "
            f"{'met' if abs(r['wer'] - pt) <= relative * max(pt, 1e-9) else 'not met'} ({100 * relative:g} % relative)"
            for r in rows if r["model"] == "W8A8" and r["runtime"] != "PyTorch"]


def artifact_lines(sizes, kernels, barriers):
    """Markdown lines: file sizes, OpenVINO's int8 / float compute layers, the fusion barriers found."""
    return ["", f"Files: FP32 {sizes['fp32'] / 1e6:.2f} MB, INT8 {sizes['int8'] / 1e6:.2f} MB "
            f"({sizes['int8'] / sizes['fp32']:.2f}×); OpenVINO INT8 compute layers int8 / float: {kernels}.", "",
            f"Fusion barriers found on 2 calibration batches (`esc_plugin.export.openvino_barriers`): "
            f"{barriers['barriers']} (OpenVINO vs literal Q/DQ, relative L2: {barriers['distance']:.3g} as "
            f"exported, {barriers['fixed_distance']:.3g} with them; {barriers['compiles']} compiles).", ""]


def write_report(results, res, md):
    """``results.json`` and ``results.md`` (with the targets as a list) in ``results``; prints the markdown."""
    md = md + [f"* {t}" for t in res["targets"]]
    write_json(results / "results.json", res)
    write_bytes(results / "results.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
