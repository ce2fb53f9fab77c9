"""Keyword spotting task: honk res8 / res8-narrow on Speech Commands (12 classes).

The model definition and the MFCC front end follow the facts documented in
the shared ``README.md`` (castorini/honk): 40 MFCC x 101 frames per 1 s clip,
mel power spectrogram (n_fft 480, hop 160, 40 Slaney mel bands over
20-4000 Hz, librosa-style centred reflect-padded STFT with a periodic Hann
window), natural log of the positive entries, orthonormal DCT-II over the
40 bands.

Data split: by speaker (:mod:`esc_plugin.datasets.speech_commands`: the hex
id before ``_nohash_``, without the word prefix of ``_unknown_`` clips; clips
without it, e.g. the ``_silence_`` clips, are each their own speaker).
Speakers are shuffled with ``seed`` and taken in that order (skipping any
speaker that would overshoot) until exactly ``n_calib`` calibration clips are
collected; every clip of every other speaker is an evaluation clip. Features
are computed once, at build time, so an ``objective`` call only runs the
model. ``python -m esc_plugin.tasks.honk`` prints the FP32 accuracy and the
time of one objective call for both variants.

The MFCCs match librosa's ``melspectrogram(..., pad_mode="reflect")`` + DCT
(honk's pipeline) up to small float differences.
"""
import random
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF

from esc_plugin.datasets.speech_commands import speaker_of
from esc_plugin.datasets.speech_commands import speaker_split as _speaker_split
from esc_plugin.tasks.audio import load_audio, pad_or_trim, require_path, resolve_shared_root
from esc_plugin.tasks.base import SplitObjective, Task

LABELS = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SAMPLE_RATE = 16000
N_SAMPLES = 16000
VARIANTS = {"res8_narrow": 19, "res8": 45}


class Res8(nn.Module):
    """honk's res8 (n_maps=45) / res8-narrow (n_maps=19).

    Input: MFCC features of shape (batch, 101, 40). Key names match the
    shared checkpoints (``conv0..conv6``, ``bn1..bn6``, ``output``).
    """

    def __init__(self, n_maps: int = 19, n_labels: int = 12, n_layers: int = 6):
        super().__init__()
        self.n_layers = n_layers
        self.conv0 = nn.Conv2d(1, n_maps, (3, 3), padding=(1, 1), bias=False)
        self.pool = nn.AvgPool2d((4, 3))
        for i in range(1, n_layers + 1):
            self.add_module(f"conv{i}", nn.Conv2d(n_maps, n_maps, (3, 3), padding=1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(n_maps, affine=False))
        self.output = nn.Linear(n_maps, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        old_x = None
        for i in range(self.n_layers + 1):
            y = F.relu(getattr(self, f"conv{i}")(x))
            if i == 0:
                y = self.pool(y)
                old_x = y
            if i > 0 and i % 2 == 0:
                x = y + old_x
                old_x = x
            else:
                x = y
            if i > 0:
                x = getattr(self, f"bn{i}")(x)
        x = x.flatten(2).mean(2)
        return self.output(x)


def load_res8(path, n_maps: int, n_labels: int = 12, fold_scales: bool = True) -> Res8:
    """Build a :class:`Res8` and load a honk state_dict from ``path``.

    The full res8 checkpoint (``res8.pt``) carries extra ``scale{1,3,5}.scale``
    tensors: per-channel multipliers applied after ``bn1``/``bn3``/``bn5``
    (the odd layers, whose output feeds only the next conv, never the
    residual path). They are not module parameters of :class:`Res8`; with
    ``fold_scales=True`` (default) each one is folded exactly into the input
    channels of the following conv (``conv2``/``conv4``/``conv6``), so the
    module keeps the plain res8 architecture and key names; dropping them
    (``fold_scales=False``) costs res8 much of its accuracy. Any other
    missing or unexpected key raises.
    """
    model = Res8(n_maps=n_maps, n_labels=n_labels)
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and not any(k.startswith("conv0") for k in sd):
        sd = sd["state_dict"]
    scales = {k: v for k, v in sd.items() if k.startswith("scale")}
    sd = OrderedDict((k, v.clone()) for k, v in sd.items() if not k.startswith("scale"))
    if fold_scales:
        for key, s in scales.items():
            i = int(key[len("scale"):].split(".")[0])
            nxt = f"conv{i + 1}.weight"
            if i % 2 == 0 or nxt not in sd:
                raise ValueError(f"cannot fold {key}: only odd layers feeding a next conv are supported")
            sd[nxt] = sd[nxt] * s.view(1, -1, 1, 1)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------- features
_MEL_CACHE: Dict[str, torch.Tensor] = {}


def _mfcc_mats() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _MEL_CACHE:
        _MEL_CACHE["window"] = torch.hann_window(480, periodic=True)
        # (n_freqs, n_mels), Slaney scale + Slaney area norm == librosa defaults.
        _MEL_CACHE["fb"] = AF.melscale_fbanks(
            n_freqs=241, f_min=20.0, f_max=4000.0, n_mels=40, sample_rate=SAMPLE_RATE,
            norm="slaney", mel_scale="slaney",
        )
        # (n_mels, n_mfcc) orthonormal DCT-II.
        _MEL_CACHE["dct"] = AF.create_dct(n_mfcc=40, n_mels=40, norm="ortho")
    return _MEL_CACHE["window"], _MEL_CACHE["fb"], _MEL_CACHE["dct"]


def compute_mfcc(wav: torch.Tensor) -> torch.Tensor:
    """honk MFCCs for 16 kHz audio.

    Arguments
    ---------
    wav : torch.Tensor
        (samples,) or (batch, samples); padded/trimmed to 16000 samples.

    Returns
    -------
    torch.Tensor
        (batch, 101, 40) float32.
    """
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    wav = pad_or_trim(wav.float(), N_SAMPLES)
    window, fb, dct = _mfcc_mats()
    spec = AF.spectrogram(
        wav, pad=0, window=window, n_fft=480, hop_length=160, win_length=480,
        power=2.0, normalized=False, center=True, pad_mode="reflect",
    )  # (batch, 241, 101)
    mel = torch.matmul(spec.transpose(1, 2), fb)  # (batch, 101, 40)
    pos = mel > 0
    mel = torch.where(pos, torch.log(torch.where(pos, mel, torch.ones_like(mel))), mel)
    return torch.matmul(mel, dct).contiguous()  # (batch, 101, 40)


# -------------------------------------------------------------------- data
def list_clips(data_dir: Path) -> List[Tuple[Path, int]]:
    clips = []
    for idx, label in enumerate(LABELS):
        d = require_path(data_dir / label, f"Speech Commands folder '{label}'")
        clips += [(p, idx) for p in sorted(d.glob("*.flac"))]
    return clips


def speaker_split(clips, n_calib: int, seed: int):
    """Deterministic speaker-disjoint split -> (calib_clips, eval_clips, calib_speakers).

    :func:`esc_plugin.datasets.speech_commands.speaker_split` with every
    non-calibration speaker in the evaluation set; both keep ``clips``' order.
    """
    split = _speaker_split(clips, n_calib, test_fraction=1.0, seed=seed)
    calib, evalc = split["calib"], split["test"]
    return calib, evalc, {speaker_of(p) for p, _ in calib}


def _features(clips, batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    feats = []
    for i in range(0, len(clips), batch):
        wavs = torch.stack([pad_or_trim(load_audio(p, SAMPLE_RATE), N_SAMPLES) for p, _ in clips[i:i + batch]])
        feats.append(compute_mfcc(wavs))
    x = torch.cat(feats) if feats else torch.empty(0, 101, 40)
    y = torch.tensor([lab for _, lab in clips], dtype=torch.long)
    return x, y


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# ------------------------------------------------------------------- task
def build_honk_task(shared_root=None, variant: str = "res8_narrow", n_calib: int = 100, seed: int = 0,
                    eval_limit: Optional[int] = None, batch_size: int = 256) -> Task:
    """Build the honk keyword-spotting task.

    Arguments
    ---------
    shared_root : str or Path, optional
        Shared data folder (default ``$ESC_SHARED``, else ``<repo>/../shared``).
    variant : str
        ``"res8_narrow"`` (19 maps) or ``"res8"`` (45 maps).
    n_calib : int
        Number of calibration clips (speaker-disjoint from evaluation).
    seed : int
        Seed of the speaker split (and of the ``eval_limit`` subset).
    eval_limit : int, optional
        If given, evaluate on a seeded random subset of this many eval clips.
    batch_size : int
        Batch size of forward_loop / objective / evaluate.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    root = resolve_shared_root(shared_root)
    ckpt = require_path(root / "models" / "honk" / f"{variant}.pt", f"honk checkpoint {variant}.pt")
    data_dir = require_path(root / "data" / "speech_commands", "Speech Commands data")

    model = load_res8(ckpt, VARIANTS[variant], len(LABELS))
    clips = list_clips(data_dir)
    calib, evalc, calib_spk = speaker_split(clips, n_calib, seed)
    n_eval_total = len(evalc)
    if eval_limit is not None and eval_limit < len(evalc):
        evalc = list(evalc)
        random.Random(seed + 1).shuffle(evalc)
        evalc = sorted(evalc[:eval_limit], key=lambda c: (c[1], str(c[0])))

    # Features are cached once here; objective/evaluate only run the model.
    x_cal, y_cal = _features(calib)
    x_ev, y_ev = _features(evalc)

    def forward_loop(m: nn.Module) -> None:
        _logits(m, x_cal, batch_size)

    def score(m: nn.Module, idx=None) -> float:
        # Classification error alone is piecewise constant (steps of 1/n_calib),
        # which leaves an evolution strategy with flat plateaus and no signal
        # to rank candidates. A 1e-3 * mean cross-entropy tie-breaker is
        # smooth in the weights/scales and too small to outweigh a single
        # misclassification unless the CE moves by > 10 nats.
        x, y = (x_cal, y_cal) if idx is None else (x_cal[idx], y_cal[idx])
        logits = _logits(m, x, batch_size)
        err = (logits.argmax(1) != y).float().mean().item()
        ce = F.cross_entropy(logits, y).item()
        return err + 1e-3 * ce

    # split-aware: the selection guard scores held-back calibration clips
    objective = SplitObjective(score, len(y_cal))
    # its model calls are batch-first and the metric reduces per candidate: batch_candidates can tile it
    objective.supports_candidate_batching = True

    def evaluate(m: nn.Module) -> Dict[str, float]:
        logits = _logits(m, x_ev, batch_size)
        acc = (logits.argmax(1) == y_ev).float().mean().item() * 100.0
        return {"accuracy": acc, "error": 100.0 - acc, "n": int(len(y_ev))}

    info = {
        "variant": variant,
        "checkpoint": str(ckpt),
        "data": str(data_dir),
        "labels": list(LABELS),
        "split": "speaker-disjoint (speaker id before _nohash_, without the word prefix of _unknown_ "
                 f"clips; files without it are their own speaker), speakers shuffled with seed={seed}",
        "n_calib": len(calib),
        "n_calib_speakers": len(calib_spk),
        "n_eval": len(evalc),
        "n_eval_total": n_eval_total,
        "eval_limit": eval_limit,
        "seed": seed,
        "features": "MFCC 40 x 101 (n_fft 480, hop 160, 40 mel 20-4000 Hz, log>0, DCT-II ortho)",
        "objective": "calib error (fraction) + 1e-3 * mean cross-entropy",
    }
    return Task(
        name=f"honk-{variant.replace('_', '-')}",
        model=model,
        forward_loop=forward_loop,
        objective=objective,
        evaluate=evaluate,
        metric="accuracy",
        higher_is_better=True,
        info=info,
    )


if __name__ == "__main__":  # quick FP32 check: python -m esc_plugin.tasks.honk
    import time

    for var in ("res8_narrow", "res8"):
        t0 = time.time()
        task = build_honk_task(variant=var)
        t1 = time.time()
        obj = task.objective(task.model)
        t2 = time.time()
        res = task.evaluate(task.model)
        print(f"{task.name}: build {t1 - t0:.1f}s, objective {obj:.4f} ({(t2 - t1) * 1e3:.0f} ms/call), "
              f"eval {res}, info n_calib={task.info['n_calib']} n_eval={task.info['n_eval']}")
