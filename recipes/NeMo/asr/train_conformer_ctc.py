#!/usr/bin/env python
"""Train a small character Conformer-CTC (NeMo EncDecCTCModel) on the Speech Commands words.

NeMo-style recipe (Hydra config in ``conf/``, PyTorch Lightning trainer)::

    python recipes/NeMo/asr/train_conformer_ctc.py                        # conf/conformer_ctc_char.yaml
    python recipes/NeMo/asr/train_conformer_ctc.py --config-name conformer_ctc_char_tiny
    python recipes/NeMo/asr/train_conformer_ctc.py trainer.max_time=00:00:10:00 model.encoder.n_layers=4

Steps: write the speaker-disjoint manifests (train / calibration (exactly
``data.n_calibration``) / test, seeded) from the ten word classes of
``../shared/data/speech_commands`` (``$ESC_SHARED`` overrides), train, save the
FP32 model to ``output.model`` (atomically) and its WER on the test split to
``output.metrics``. Training stops at ``trainer.max_epochs`` or
``trainer.max_time``, whichever comes first.
"""
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo.core.config import hydra_runner

CONF = str(Path(__file__).resolve().parent / "conf")


def speech_commands_folder(cfg):
    """``data.speech_commands``, else ``<shared>/data/speech_commands`` (``$ESC_SHARED`` or ../shared)."""
    if cfg.data.speech_commands:
        return Path(cfg.data.speech_commands)
    from esc_plugin.tasks.audio import default_shared_root
    return default_shared_root() / "data" / "speech_commands"


def prepare_manifests(cfg):
    from esc_plugin.nemo import speech_commands_manifests
    return speech_commands_manifests(speech_commands_folder(cfg), cfg.data.manifest_dir,
                                     cfg.data.n_calibration, cfg.data.test_fraction, cfg.data.seed)


def save_atomically(model, path):
    """``model.save_to`` through a temporary file beside ``path`` (a crash leaves no half .nemo)."""
    from esc_plugin.core.io import atomic_path
    with atomic_path(path) as tmp:
        model.save_to(tmp)
    return path


def train(cfg):
    """Build, train and save the model; returns ``(model, metrics)``."""
    import lightning.pytorch as pl

    from esc_plugin.core.io import write_json
    from esc_plugin.nemo import ASRFeatureCache
    from nemo.collections.asr.models import EncDecCTCModel

    torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True)
    manifests = prepare_manifests(cfg)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True))
    model = EncDecCTCModel(cfg=cfg.model, trainer=trainer)
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    model.eval()
    save_atomically(model, cfg.output.model)
    test = ASRFeatureCache.from_manifest(model, manifests["test"], progress=False)
    metrics = {"test_wer": test.word_error_rate(model), "test_utterances": test.n_utterances,
               "train_seconds": round(seconds, 1), "steps": int(trainer.global_step),
               "epochs": int(trainer.current_epoch), "threads": int(cfg.threads),
               "parameters": sum(p.numel() for p in model.parameters()),
               "model": os.fspath(cfg.output.model), "manifests": manifests}
    write_json(cfg.output.metrics, metrics)
    return model, metrics


@hydra_runner(config_path=CONF, config_name="conformer_ctc_char")
def main(cfg):
    _, metrics = train(cfg)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
