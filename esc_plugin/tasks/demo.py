"""Built-in default task: a small keyword classifier on audio this project synthesises.

It needs no download and no ``../shared``: harmonic "words" (pitch contours and
formant patterns) in noise, log-mel features without normalisation (so the
first layer sees the wide, speech-like activation range that makes naive
calibration fail), and a Conv1d + LayerNorm + self-attention + Linear model
trained for a few seconds. Deterministic given the seed.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from .base import Task

SAMPLE_RATE = 16000


# Class = (pitch contour start/end ratios, two formant centres in Hz). Neighbouring
# classes differ only slightly, so the task is not trivially separable.
_CLASSES = [((1.0, 1.0), (500, 1500)), ((1.0, 1.4), (650, 1100)), ((1.4, 1.0), (300, 2300)),
            ((1.0, 1.0), (700, 1800)), ((1.0, 1.4), (400, 900)), ((1.4, 1.0), (550, 2600)),
            ((1.0, 1.0), (350, 1700)), ((1.0, 1.4), (800, 1300))]
N_CLASSES = len(_CLASSES)


def synth_batch(labels, gen, seconds=0.5, snr_db=-9.0):
    """Clips of the given classes: a voiced sound with class-specific pitch
    contour and formants, per-clip speaker pitch, formant and timing jitter, and
    white noise at ``snr_db`` (vectorised over the batch)."""
    n, b = int(SAMPLE_RATE * seconds), len(labels)
    t = (torch.arange(n) / n)[None]
    contour = torch.tensor([_CLASSES[i][0] for i in labels])
    formants = torch.tensor([_CLASSES[i][1] for i in labels], dtype=torch.float32)
    formants = formants * (1 + 0.12 * (torch.rand(b, 1, generator=gen) - 0.5))
    f0 = 100 + 120 * torch.rand(b, 1, generator=gen)
    shift = 0.3 * (torch.rand(b, 1, generator=gen) - 0.5)
    ramp = (t + shift).clamp(0, 1)
    pitch = f0 * (contour[:, :1] + (contour[:, 1:] - contour[:, :1]) * ramp)
    phase = 2 * math.pi * torch.cumsum(pitch, 1) / SAMPLE_RATE
    wave = torch.zeros(b, n)
    for h in range(1, 20):
        freq = pitch * h
        gain = sum(torch.exp(-((freq - formants[:, k:k + 1]) / 150.0) ** 2) for k in range(2)) + 0.02
        wave += gain * torch.sin(h * phase)
    onset = 0.05 + 0.3 * torch.rand(b, 1, generator=gen)
    env = torch.exp(-((t - onset - 0.25) / 0.12) ** 2)
    wave = wave * env
    wave = wave / wave.pow(2).mean(1, keepdim=True).sqrt()
    noise = torch.randn(b, n, generator=gen) * 10 ** (-snr_db / 20)
    clip = 0.1 * (wave + noise)
    # Digital silence padding (as datasets pad short clips): its log-mel is the
    # floor value, far below speech, which is what wrecks per-tensor max scales.
    keep = (n * (0.7 + 0.3 * torch.rand(b, 1, generator=gen))).long()
    return clip * (torch.arange(n)[None] < keep)


class DemoKWS(nn.Module):
    """Conv1d front end → LayerNorm → self-attention → Linear classifier."""

    def __init__(self, n_mels=40, d=32, n_classes=N_CLASSES):
        super().__init__()
        self.conv = nn.Conv1d(n_mels, d, 5, padding=2)
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, n_classes)

    def forward(self, feats):  # (batch, time, n_mels)
        h = F.relu(self.conv(feats.transpose(1, 2))).transpose(1, 2)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ffn(self.norm2(h))
        return self.head(h.mean(1))


def features(waves):
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=40)
    return torch.log(mel(waves) + 1e-10).transpose(1, 2)  # (batch, time, 40), no normalisation


def make_split(n, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES
    return features(synth_batch(labels.tolist(), gen)), labels


def build_demo_task(n_calib=100, n_eval=600, n_train=960, epochs=8, seed=0):
    """Train the demo model (a few seconds on 2 cores) and return the :class:`Task`.

    Example
    -------
    >>> task = build_demo_task(n_calib=12, n_eval=24, n_train=120, epochs=1)
    >>> sorted(task.evaluate(task.model))
    ['accuracy', 'error', 'n']
    """
    torch.manual_seed(seed)
    x_train, y_train = make_split(n_train, seed + 1)
    x_cal, y_cal = make_split(n_calib, seed + 2)
    x_eval, y_eval = make_split(n_eval, seed + 3)
    model = DemoKWS()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n_train).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()

    def forward_loop(m):
        for xb in x_cal.split(50):
            m(xb)

    def objective(m):
        # error + a small cross-entropy term: the error alone is piecewise
        # constant, which gives an evolution strategy flat plateaus.
        logits = torch.cat([m(xb) for xb in x_cal.split(50)])
        err = float((logits.argmax(1) != y_cal).float().mean())
        return err + 1e-2 * float(F.cross_entropy(logits, y_cal))

    @torch.no_grad()
    def evaluate(m):
        logits = torch.cat([m(xb) for xb in x_eval.split(100)])
        acc = float((logits.argmax(1) == y_eval).float().mean()) * 100
        return {"accuracy": acc, "error": 100 - acc, "n": n_eval}

    return Task("demo-kws", model, forward_loop, objective, evaluate, "accuracy", True,
                {"n_calib": n_calib, "n_eval": n_eval, "n_train": n_train, "data": "synthesised"})
