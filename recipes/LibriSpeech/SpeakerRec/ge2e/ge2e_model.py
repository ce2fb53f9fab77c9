"""GE2E speaker encoder (Resemblyzer's ``pretrained.pt``) and its front end.

Architecture, as in the shared README: LSTM(40 -> 256, 3 layers,
batch_first) -> the last layer's final hidden state -> Linear(256, 256) ->
ReLU -> L2 normalisation. Input: 40-band mel *power* spectrogram (no log),
16 kHz, 25 ms Hann window, 10 ms hop, shape (batch, frames, 40).

An utterance is embedded as Resemblyzer does it: its volume is raised to
-30 dBFS if quieter, it is cut into partial windows of 160 frames (1.6 s) with
``partial_step`` frames between starts (80 = the README's 50 % overlap; the
package's default ``rate=1.3`` gives 77), the last window is kept when it is
at least ``min_coverage`` full (zero-padded), the window embeddings are
averaged and the mean is L2-normalised. Resemblyzer also shortens long
silences with webrtcvad; that step is left out (webrtcvad is not a
dependency, and LibriSpeech utterances are segmented speech).
"""
import math

import torch
import torch.nn as nn
import torchaudio

#: Keys of the Resemblyzer checkpoint that belong to GE2E training, not to the encoder.
TRAINING_ONLY_KEYS = ("similarity_weight", "similarity_bias")


class GE2EEncoder(nn.Module):
    """Resemblyzer's GE2E speaker encoder.

    Arguments
    ---------
    n_mels : int
        Mel bands of the input.
    hidden_size : int
        LSTM width.
    num_layers : int
        LSTM layers.
    embedding_size : int
        Output size of the linear layer.

    Example
    -------
    >>> encoder = GE2EEncoder()
    >>> encoder(torch.rand(2, 160, 40)).shape
    torch.Size([2, 256])
    """

    def __init__(self, n_mels=40, hidden_size=256, num_layers=3, embedding_size=256):
        super().__init__()
        self.lstm = nn.LSTM(n_mels, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, embedding_size)
        self.relu = nn.ReLU()

    def forward(self, mels):
        """(batch, frames, n_mels) mel power spectrogram -> (batch, embedding_size), unit norm."""
        _, (hidden, _) = self.lstm(mels)
        embeddings = self.relu(self.linear(hidden[-1]))
        return embeddings / torch.norm(embeddings, dim=1, keepdim=True).clamp_min(1e-12)


def load_resemblyzer_state(encoder, path):
    """Load ``torch.load(path)["model_state"]`` into ``encoder`` (a Pretrainer custom hook).

    The GE2E similarity scale/bias are training-only and skipped; every other
    key must match exactly.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model_state" not in checkpoint:
        raise ValueError(
            f"{path} is not a Resemblyzer checkpoint (expected a dict with 'model_state'); "
            "point pretrained_path at resemblyzer/pretrained.pt."
        )
    state = {k: v for k, v in checkpoint["model_state"].items() if k not in TRAINING_ONLY_KEYS}
    encoder.load_state_dict(state, strict=True)


class GE2EFeatures(nn.Module):
    """Waveform of one utterance -> its partial windows of mel power frames.

    Arguments
    ---------
    sample_rate : int
        Audio sample rate (16 kHz for the pretrained model).
    n_mels : int
        Mel bands.
    window_ms : float
        STFT window (and FFT) length in milliseconds.
    hop_ms : float
        Hop in milliseconds.
    partial_frames : int
        Frames per partial window.
    partial_step : int
        Frames between the starts of consecutive windows.
    min_coverage : float
        The last window is kept when this fraction of it holds audio.
    target_dbfs : float
        Quieter utterances are scaled up to this RMS level (dB full scale).

    Example
    -------
    >>> features = GE2EFeatures()
    >>> features(torch.randn(1, 16000 * 3)).shape  # 3 s -> 3 windows of 160 frames
    torch.Size([3, 160, 40])
    """

    def __init__(
        self,
        sample_rate=16000,
        n_mels=40,
        window_ms=25,
        hop_ms=10,
        partial_frames=160,
        partial_step=80,
        min_coverage=0.75,
        target_dbfs=-30.0,
    ):
        super().__init__()
        if not 0 < partial_step <= partial_frames:
            raise ValueError(f"partial_step must be in (0, partial_frames={partial_frames}], got {partial_step}")
        if not 0 < min_coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
        n_fft = int(sample_rate * window_ms / 1000)
        self.hop = int(sample_rate * hop_ms / 1000)
        self.partial_frames, self.partial_step = partial_frames, partial_step
        self.min_coverage, self.target_dbfs = min_coverage, target_dbfs
        # librosa.feature.melspectrogram defaults: periodic Hann, centred frames, Slaney mel.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop_length=self.hop,
            n_mels=n_mels,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
            center=True,
            pad_mode="constant",
        )

    def window_starts(self, n_samples):
        """First frame of each partial window (Resemblyzer's ``compute_partial_slices``)."""
        n_frames = math.ceil((n_samples + 1) / self.hop)
        steps = max(1, n_frames - self.partial_frames + self.partial_step + 1)
        starts = list(range(0, steps, self.partial_step))
        last = starts[-1] * self.hop
        coverage = (n_samples - last) / (self.partial_frames * self.hop)
        if coverage < self.min_coverage and len(starts) > 1:
            starts = starts[:-1]
        return starts

    def forward(self, wav):
        """(1, samples) or (samples,) waveform -> (windows, partial_frames, n_mels)."""
        wav = wav.reshape(-1)
        rms = wav.pow(2).mean().sqrt()
        gain_db = self.target_dbfs - 20 * torch.log10(rms.clamp_min(1e-10))
        if gain_db > 0:  # increase only, as Resemblyzer's normalize_volume(increase_only=True)
            wav = wav * 10 ** (gain_db / 20)
        starts = self.window_starts(wav.numel())
        needed = (starts[-1] + self.partial_frames) * self.hop
        if needed > wav.numel():
            wav = nn.functional.pad(wav, (0, needed - wav.numel()))
        mel = self.mel(wav).transpose(0, 1)  # (frames, n_mels)
        return torch.stack([mel[s : s + self.partial_frames] for s in starts])
