#!/usr/bin/env python
"""Quantize a NeMo CTC ASR model (``quantize: esc``), save it as a .nemo, export it as QDQ ONNX.

NeMo-style recipe (Hydra config ``conf/quantize.yaml``)::

    python recipes/NeMo/asr/quantize_asr.py                                    # W8A8 ESC vs max
    python recipes/NeMo/asr/quantize_asr.py quantize=esc bits=8 budget=100 compare=[max,percentile]
    python recipes/NeMo/asr/quantize_asr.py model=my.nemo manifests.calibration=calib.json \
        manifests.test=test.json output.dir=runs/mine

Steps: check the config and the files (before loading anything slow), restore
the FP32 model (never written to), score it on the test split, quantize with
``quantize`` (and each of ``compare``) using NeMo's dataloader on the
calibration manifest and NeMo's WER as the objective, score each quantized
model on the test split, save the ``quantize`` model to ``output.model``
(FP32 weights + esc_plugin state; restored and checked for identical outputs)
and export it with NeMo's ``model.export`` to ``output.onnx`` (Q/DQ nodes).
Writes ``results.json`` / ``results.md``, the ESC report and plots into
``output.dir``, all atomically.
"""
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo.core.config import hydra_runner

CONF = str(Path(__file__).resolve().parent / "conf")


def configs(cfg):
    """``{method: QuantConfig}`` for ``quantize`` then each of ``compare``; raises on unknown values."""
    from esc_plugin.nemo import quantization_config
    options = {"budget": int(cfg.budget), "sigma0": float(cfg.sigma0), "seed": int(cfg.seed),
               "n_samples": int(cfg.n_samples)}
    for side in ("weight_bits", "act_bits"):
        if cfg.get(side) is not None:
            options[side] = int(cfg[side])
    if cfg.get("quantization"):  # further QuantConfig options: executor, workers, batch_candidates, ...
        options.update(OmegaConf.to_container(cfg.quantization, resolve=True))
    methods = [cfg.quantize] + [m for m in (cfg.compare or []) if m != cfg.quantize]
    return {m: quantization_config(m, bits=int(cfg.bits), **options) for m in methods}


def check_inputs(cfg):
    """Every check that needs no NeMo model: bad input fails here, before minutes of work."""
    from esc_plugin.nemo import NemoModelError, read_manifest
    quant_configs = configs(cfg)
    if not Path(cfg.model).is_file():
        raise NemoModelError(f"model={cfg.model} not found: train one with "
                             "recipes/NeMo/asr/train_conformer_ctc.py or pass model=<path to .nemo>.")
    read_manifest(cfg.manifests.calibration, min_rows=int(cfg.n_samples))
    if cfg.manifests.test:
        read_manifest(cfg.manifests.test)
    if os.path.abspath(cfg.output.model) == os.path.abspath(cfg.model):
        raise NemoModelError(f"output.model is the FP32 model {cfg.model}: choose a new file.")
    return quant_configs


def run(cfg):
    from esc_plugin.core.io import write_bytes, write_json
    from esc_plugin.export import count_qdq
    from esc_plugin.nemo import ASRFeatureCache, quantize_asr_model, restore_quantized_asr_model
    from esc_plugin.runner import provenance
    from nemo.collections.asr.models import ASRModel

    quant_configs = check_inputs(cfg)
    prov = provenance()  # commit, dirty flag and command line, taken before the work
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output.dir)
    fp32 = ASRModel.restore_from(cfg.model, map_location="cpu").eval()
    test = (ASRFeatureCache.from_manifest(fp32, cfg.manifests.test, batch_size=int(cfg.batch_size),
                                          use_cer=bool(cfg.use_cer), progress=False)
            if cfg.manifests.test else None)
    metric = "cer" if cfg.use_cer else "wer"
    rows = [{"config": "FP32", "method": "-", f"test_{metric}": test.word_error_rate(fp32) if test else None,
             "calibration_objective": None, "seconds": 0.0}]
    quantized = {}
    for method, qcfg in quant_configs.items():
        start = time.perf_counter()
        qmodel = quantize_asr_model(fp32, qcfg, manifest=cfg.manifests.calibration,
                                    n_samples=int(cfg.n_samples), batch_size=int(cfg.batch_size),
                                    use_cer=bool(cfg.use_cer))
        seconds = time.perf_counter() - start
        report = qmodel.esc_report
        if rows[0]["calibration_objective"] is None:
            rows[0]["calibration_objective"] = report.objective["fp32"]
        rows.append({"config": f"W{qcfg.weight_bits}A{qcfg.act_bits}", "method": method,
                     f"test_{metric}": test.word_error_rate(qmodel) if test else None,
                     "calibration_objective": qmodel.esc_features.word_error_rate(qmodel),
                     "seconds": round(seconds, 1)})
        report.save_json(str(out / f"report_{method}.json"))
        if method == "esc":
            report.plot(str(out / f"plots_{method}"))
        quantized[method] = qmodel
        print(json.dumps(rows[-1]), flush=True)

    qmodel = quantized[cfg.quantize]
    qmodel.save_to(cfg.output.model)
    restored = restore_quantized_asr_model(cfg.output.model)
    feats, lens = qmodel.esc_features.batches[0][:2]
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(
            qmodel(processed_signal=feats, processed_signal_length=lens),
            restored(processed_signal=feats, processed_signal_length=lens)))
    results = {"rows": rows, "fp32_model": cfg.model, "quantized_model": cfg.output.model,
               "restored_outputs_identical": same, "config": OmegaConf.to_container(cfg, resolve=True),
               "provenance": prov}
    if cfg.output.onnx:
        qmodel.export(cfg.output.onnx)
        results.update(onnx=cfg.output.onnx, onnx_qdq=count_qdq(cfg.output.onnx))
    write_json(cfg.output.results, results)
    md = markdown(rows, metric) + (f"\nCommit {prov['commit']}{' (uncommitted changes)' if prov['dirty'] else ''}; "
                                   f"command: `{' '.join(prov['command'])}`\n")
    write_bytes(str(Path(cfg.output.results).with_suffix(".md")), md.encode())
    return results


def markdown(rows, metric):
    def fmt(v, scale=1.0):
        return "-" if v is None else f"{100 * v * scale:.2f}" if scale else f"{v}"
    lines = [f"| config | calibrator | test {metric.upper()} (%) | calib. {metric.upper()} (%) | time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['method']} | {fmt(r[f'test_{metric}'])} | "
                     f"{fmt(r['calibration_objective'])} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


@hydra_runner(config_path=CONF, config_name="quantize")
def main(cfg):
    print(json.dumps(run(cfg), indent=2, default=str))


if __name__ == "__main__":
    main()
