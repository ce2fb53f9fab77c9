"""GTCRN: grouped temporal convolutional recurrent network for speech enhancement (48 k parameters).

Written from the paper (X. Rong, T. Sun, X. Zhang, Y. Hu, C. Zhu, J. Lu,
"GTCRN: A Speech Enhancement Model Requiring Ultralow Computational
Resources", ICASSP 2024) so that the authors' released state dicts
(``model_trained_on_vctk.tar`` / ``model_trained_on_dns3.tar``, MIT licence)
load with ``strict=True``; module names follow the checkpoint keys.

Signal path, on a 512-point STFT (hop 256, square-root Hann window, 16 kHz):

* input features: magnitude, real and imaginary parts, (B, 3, T, 257);
* ERB band merging: the 65 lowest bins kept, the 192 others mapped to 64
  ERB bands by a fixed linear layer (129 bands);
* subband feature extraction (SFE): each band concatenated with its two
  neighbours (unfold over frequency), 3 → 9 channels;
* encoder: two strided (1, 5) conv blocks (129 → 65 → 33 bands, 16 channels),
  then three grouped temporal conv (GTConv) blocks with causal depthwise
  (3, 3) convolutions dilated 1, 2, 5 in time, each followed by temporal
  recurrent attention (TRA: a GRU over the per-channel energy gives a
  sigmoid gain per channel and frame); half the channels bypass a GTConv
  block and the two halves are interleaved (channel shuffle);
* two grouped dual-path GRN blocks (DPGRNN): a bidirectional grouped GRU
  across the 33 bands of each frame, then a causal grouped GRU across frames,
  each with a linear layer, a LayerNorm over (bands, channels) and a residual;
* decoder: the mirror of the encoder with transposed convolutions and skip
  additions, ending with a tanh to a 2-channel complex ratio mask;
* ERB band splitting back to 257 bins, complex multiplication with the input.

Every temporal operation is causal, so the model streams frame by frame.
"""
import numpy as np
import torch
from torch import nn


class ERB(nn.Module):
    """Fixed ERB band merging (``bm``) and splitting (``bs``) above the ``erb_subband_1`` lowest bins.

    Arguments
    ---------
    erb_subband_1 : int
        Low bins kept as they are.
    erb_subband_2 : int
        ERB bands the remaining bins are merged into.
    nfft : int
        STFT size.
    high_lim : float
        Upper frequency (Hz) of the ERB scale.
    fs : int
        Sample rate (Hz).

    Example
    -------
    >>> erb = ERB(65, 64)
    >>> erb.bm(torch.rand(1, 3, 10, 257)).shape
    torch.Size([1, 3, 10, 129])
    >>> erb.bs(torch.rand(1, 2, 10, 129)).shape
    torch.Size([1, 2, 10, 257])
    """

    def __init__(self, erb_subband_1, erb_subband_2, nfft=512, high_lim=8000, fs=16000):
        super().__init__()
        filters = self.erb_filter_banks(erb_subband_1, erb_subband_2, nfft, high_lim, fs)
        n_freqs = nfft // 2 + 1
        self.erb_subband_1 = erb_subband_1
        self.erb_fc = nn.Linear(n_freqs - erb_subband_1, erb_subband_2, bias=False)
        self.ierb_fc = nn.Linear(erb_subband_2, n_freqs - erb_subband_1, bias=False)
        self.erb_fc.weight = nn.Parameter(filters, requires_grad=False)
        self.ierb_fc.weight = nn.Parameter(filters.T.contiguous(), requires_grad=False)

    @staticmethod
    def hz2erb(freq_hz):
        """Frequency (Hz) to ERB-rate."""
        return 21.4 * np.log10(0.00437 * freq_hz + 1)

    @staticmethod
    def erb2hz(erb_f):
        """ERB-rate to frequency (Hz)."""
        return (10 ** (erb_f / 21.4) - 1) / 0.00437

    def erb_filter_banks(self, erb_subband_1, erb_subband_2, nfft=512, high_lim=8000, fs=16000):
        """Triangular filters, equally spaced on the ERB scale, over the bins above ``erb_subband_1``."""
        low_lim = erb_subband_1 / nfft * fs
        erb_points = np.linspace(self.hz2erb(low_lim), self.hz2erb(high_lim), erb_subband_2)
        bins = np.round(self.erb2hz(erb_points) / fs * nfft).astype(np.int32)
        filters = np.zeros([erb_subband_2, nfft // 2 + 1], dtype=np.float32)
        eps = 1e-12
        filters[0, bins[0]:bins[1]] = (bins[1] - np.arange(bins[0], bins[1]) + eps) / (bins[1] - bins[0] + eps)
        for i in range(erb_subband_2 - 2):
            rise = np.arange(bins[i], bins[i + 1])
            fall = np.arange(bins[i + 1], bins[i + 2])
            filters[i + 1, bins[i]:bins[i + 1]] = (rise - bins[i] + eps) / (bins[i + 1] - bins[i] + eps)
            filters[i + 1, bins[i + 1]:bins[i + 2]] = (bins[i + 2] - fall + eps) / (bins[i + 2] - bins[i + 1] + eps)
        filters[-1, bins[-2]:bins[-1] + 1] = 1 - filters[-2, bins[-2]:bins[-1] + 1]
        return torch.from_numpy(np.abs(filters[:, erb_subband_1:]))

    def bm(self, x):
        """Band merging, (B, C, T, 257) -> (B, C, T, 129)."""
        low = x[..., :self.erb_subband_1]
        high = self.erb_fc(x[..., self.erb_subband_1:])
        return torch.cat([low, high], dim=-1)

    def bs(self, x_erb):
        """Band splitting, (B, C, T, 129) -> (B, C, T, 257)."""
        low = x_erb[..., :self.erb_subband_1]
        high = self.ierb_fc(x_erb[..., self.erb_subband_1:])
        return torch.cat([low, high], dim=-1)


class SFE(nn.Module):
    """Subband feature extraction: each band with its ``kernel_size - 1`` neighbours, (B, C, T, F) -> (B, kC, T, F).

    Example
    -------
    >>> SFE(3)(torch.rand(2, 3, 5, 129)).shape
    torch.Size([2, 9, 5, 129])
    """

    def __init__(self, kernel_size=3, stride=1):
        super().__init__()
        self.kernel_size = kernel_size
        self.unfold = nn.Unfold(kernel_size=(1, kernel_size), stride=(1, stride),
                                padding=(0, (kernel_size - 1) // 2))

    def forward(self, x):
        """x: (B, C, T, F)."""
        b, c, t, f = x.shape
        return self.unfold(x).reshape(b, c * self.kernel_size, t, f)


class TRA(nn.Module):
    """Temporal recurrent attention: a causal GRU over each channel's mean energy gives a gain per (channel, frame).

    Example
    -------
    >>> TRA(8)(torch.rand(2, 8, 5, 33)).shape
    torch.Size([2, 8, 5, 33])
    """

    def __init__(self, channels):
        super().__init__()
        self.att_gru = nn.GRU(channels, channels * 2, 1, batch_first=True)
        self.att_fc = nn.Linear(channels * 2, channels)
        self.att_act = nn.Sigmoid()

    def forward(self, x):
        """x: (B, C, T, F)."""
        energy = torch.mean(x.pow(2), dim=-1)  # (B, C, T)
        att = self.att_gru(energy.transpose(1, 2))[0]
        att = self.att_act(self.att_fc(att).transpose(1, 2))
        return x * att[..., None]


class ConvBlock(nn.Module):
    """(Transposed) conv -> BatchNorm -> PReLU (tanh for the last block)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, groups=1,
                 use_deconv=False, is_last=False):
        super().__init__()
        conv = nn.ConvTranspose2d if use_deconv else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.Tanh() if is_last else nn.PReLU()

    def forward(self, x):
        """x: (B, C, T, F)."""
        return self.act(self.bn(self.conv(x)))


class GTConvBlock(nn.Module):
    """Grouped temporal convolution: half the channels go through SFE, a point conv, a causal
    dilated depthwise conv, a point conv and TRA; the other half bypasses; the halves are interleaved."""

    def __init__(self, in_channels, hidden_channels, kernel_size, stride, padding, dilation, use_deconv=False):
        super().__init__()
        self.use_deconv = use_deconv
        self.pad_size = (kernel_size[0] - 1) * dilation[0]  # causal: all the time padding is in the past
        conv = nn.ConvTranspose2d if use_deconv else nn.Conv2d
        self.sfe = SFE(kernel_size=3, stride=1)
        self.point_conv1 = conv(in_channels // 2 * 3, hidden_channels, 1)
        self.point_bn1 = nn.BatchNorm2d(hidden_channels)
        self.point_act = nn.PReLU()
        self.depth_conv = conv(hidden_channels, hidden_channels, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, groups=hidden_channels)
        self.depth_bn = nn.BatchNorm2d(hidden_channels)
        self.depth_act = nn.PReLU()
        self.point_conv2 = conv(hidden_channels, in_channels // 2, 1)
        self.point_bn2 = nn.BatchNorm2d(in_channels // 2)
        self.tra = TRA(in_channels // 2)

    @staticmethod
    def shuffle(x1, x2):
        """Interleave the channels of two (B, C, T, F) tensors -> (B, 2C, T, F)."""
        x = torch.stack([x1, x2], dim=2)  # (B, C, 2, T, F)
        return x.reshape(x.shape[0], -1, x.shape[3], x.shape[4])

    def forward(self, x):
        """x: (B, C, T, F)."""
        x1, x2 = torch.chunk(x, chunks=2, dim=1)
        h1 = self.point_act(self.point_bn1(self.point_conv1(self.sfe(x1))))
        h1 = nn.functional.pad(h1, [0, 0, self.pad_size, 0])
        h1 = self.depth_act(self.depth_bn(self.depth_conv(h1)))
        h1 = self.point_bn2(self.point_conv2(h1))
        h1 = self.tra(h1)
        return self.shuffle(h1, x2)


class GRNN(nn.Module):
    """Grouped GRU: the features are split in two halves, each with its own GRU of half the size."""

    def __init__(self, input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=False):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.rnn1 = nn.GRU(input_size // 2, hidden_size // 2, num_layers, batch_first=batch_first,
                           bidirectional=bidirectional)
        self.rnn2 = nn.GRU(input_size // 2, hidden_size // 2, num_layers, batch_first=batch_first,
                           bidirectional=bidirectional)

    def forward(self, x, h=None):
        """x: (B, L, input_size); h: (layers * directions, B, hidden_size) or None."""
        if h is None:
            layers = self.num_layers * (2 if self.bidirectional else 1)
            h = torch.zeros(layers, x.shape[0], self.hidden_size, device=x.device, dtype=x.dtype)
        x1, x2 = torch.chunk(x, chunks=2, dim=-1)
        h1, h2 = (t.contiguous() for t in torch.chunk(h, chunks=2, dim=-1))
        y1, h1 = self.rnn1(x1, h1)
        y2, h2 = self.rnn2(x2, h2)
        return torch.cat([y1, y2], dim=-1), torch.cat([h1, h2], dim=-1)


class DPGRNN(nn.Module):
    """Grouped dual-path RNN: intra-frame (across bands, bidirectional) then inter-frame (causal) GRNN."""

    def __init__(self, input_size, width, hidden_size):
        super().__init__()
        self.input_size = input_size
        self.width = width
        self.hidden_size = hidden_size
        self.intra_rnn = GRNN(input_size=input_size, hidden_size=hidden_size // 2, bidirectional=True)
        self.intra_fc = nn.Linear(hidden_size, hidden_size)
        self.intra_ln = nn.LayerNorm((width, hidden_size), eps=1e-8)
        self.inter_rnn = GRNN(input_size=input_size, hidden_size=hidden_size, bidirectional=False)
        self.inter_fc = nn.Linear(hidden_size, hidden_size)
        self.inter_ln = nn.LayerNorm((width, hidden_size), eps=1e-8)

    def forward(self, x):
        """x: (B, C, T, F)."""
        x = x.permute(0, 2, 3, 1)  # (B, T, F, C)
        b, t, f, c = x.shape
        intra = self.intra_rnn(x.reshape(b * t, f, c))[0]
        intra = self.intra_fc(intra).reshape(b, t, self.width, self.hidden_size)
        intra_out = x + self.intra_ln(intra)

        x = intra_out.permute(0, 2, 1, 3)  # (B, F, T, C)
        inter = self.inter_rnn(x.reshape(b * f, t, c))[0]
        inter = self.inter_fc(inter).reshape(b, self.width, t, self.hidden_size).permute(0, 2, 1, 3)
        out = intra_out + self.inter_ln(inter)
        return out.permute(0, 3, 1, 2)  # (B, C, T, F)


class Encoder(nn.Module):
    """Two strided conv blocks and three GTConv blocks (time dilations 1, 2, 5)."""

    def __init__(self):
        super().__init__()
        self.en_convs = nn.ModuleList([
            ConvBlock(3 * 3, 16, (1, 5), stride=(1, 2), padding=(0, 2)),
            ConvBlock(16, 16, (1, 5), stride=(1, 2), padding=(0, 2), groups=2),
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(0, 1), dilation=(1, 1)),
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(0, 1), dilation=(2, 1)),
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(0, 1), dilation=(5, 1)),
        ])

    def forward(self, x):
        """x: (B, 9, T, 129) -> (B, 16, T, 33) and every block's output (for the skips)."""
        outs = []
        for block in self.en_convs:
            x = block(x)
            outs.append(x)
        return x, outs


class Decoder(nn.Module):
    """Mirror of the encoder with transposed convolutions; skip additions from the encoder."""

    def __init__(self):
        super().__init__()
        # Transposed depthwise convs: padding 2·dilation in time removes the
        # samples that the causal left padding added, keeping T frames.
        self.de_convs = nn.ModuleList([
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(2 * 5, 1), dilation=(5, 1), use_deconv=True),
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(2 * 2, 1), dilation=(2, 1), use_deconv=True),
            GTConvBlock(16, 16, (3, 3), stride=(1, 1), padding=(2 * 1, 1), dilation=(1, 1), use_deconv=True),
            ConvBlock(16, 16, (1, 5), stride=(1, 2), padding=(0, 2), groups=2, use_deconv=True),
            ConvBlock(16, 2, (1, 5), stride=(1, 2), padding=(0, 2), use_deconv=True, is_last=True),
        ])

    def forward(self, x, en_outs):
        """x: (B, 16, T, 33) -> mask features (B, 2, T, 129)."""
        n = len(self.de_convs)
        for i, block in enumerate(self.de_convs):
            x = block(x + en_outs[n - 1 - i])
        return x


class GTCRN(nn.Module):
    """The GTCRN network on a complex spectrum.

    Example
    -------
    >>> model = GTCRN().eval()
    >>> spec = torch.randn(1, 257, 20, 2)  # (batch, bins, frames, real/imag)
    >>> model(spec).shape
    torch.Size([1, 257, 20, 2])
    >>> sum(p.numel() for p in model.parameters()) > 40000
    True
    """

    def __init__(self):
        super().__init__()
        self.erb = ERB(65, 64)
        self.sfe = SFE(3, 1)
        self.encoder = Encoder()
        self.dpgrnn1 = DPGRNN(16, 33, 16)
        self.dpgrnn2 = DPGRNN(16, 33, 16)
        self.decoder = Decoder()

    def forward(self, spec):
        """spec: (B, 257, T, 2) noisy STFT -> enhanced STFT, same shape."""
        real = spec[..., 0].permute(0, 2, 1)  # (B, T, F)
        imag = spec[..., 1].permute(0, 2, 1)
        mag = torch.sqrt(real ** 2 + imag ** 2 + 1e-12)
        feat = torch.stack([mag, real, imag], dim=1)  # (B, 3, T, 257)
        feat = self.sfe(self.erb.bm(feat))  # (B, 9, T, 129)
        feat, en_outs = self.encoder(feat)
        feat = self.dpgrnn2(self.dpgrnn1(feat))  # (B, 16, T, 33)
        mask = self.erb.bs(self.decoder(feat, en_outs))  # (B, 2, T, 257)
        # Complex ratio mask: (real + j·imag) · (m0 + j·m1).
        enh_real = real * mask[:, 0] - imag * mask[:, 1]
        enh_imag = imag * mask[:, 0] + real * mask[:, 1]
        return torch.stack([enh_real, enh_imag], dim=-1).permute(0, 2, 1, 3)  # (B, F, T, 2)
