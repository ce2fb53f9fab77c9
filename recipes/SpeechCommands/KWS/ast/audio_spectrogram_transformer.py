"""A small Audio Spectrogram Transformer (AST, Gong et al., Interspeech 2021) for keyword spotting.

Log-mel features are cut into overlapping 2-D patches by one strided
``Conv2d`` (the patch embedding), a learned [CLS] token and learned position
embeddings are added, SpeechBrain's ``TransformerEncoder`` (pre-norm,
``nn.MultiheadAttention``) encodes the patch sequence, and a ``Linear`` head
classifies the [CLS] output. Unlike the original AST it is trained from
scratch (no ImageNet initialisation) and is much smaller.

Authors
 * esc_plugin contributors
"""
import torch
import torch.nn as nn
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder


class AudioSpectrogramTransformer(nn.Module):
    """Patch embedding + transformer encoder + linear classifier.

    Arguments
    ---------
    n_mels : int
        Feature dimension of the input.
    n_frames : int
        Number of frames of every input (inputs are fixed-length clips).
    n_classes : int
        Number of output classes.
    patch_size : tuple of int
        (time, frequency) size of a patch.
    patch_stride : tuple of int
        (time, frequency) stride between patches; smaller than
        ``patch_size`` gives overlapping patches, as in AST.
    d_model : int
        Embedding size.
    nhead : int
        Attention heads.
    num_layers : int
        Transformer layers.
    d_ffn : int
        Hidden size of the feed-forward blocks.
    dropout : float
        Dropout in the encoder and after the embeddings.

    Example
    -------
    >>> model = AudioSpectrogramTransformer(n_mels=40, n_frames=101, n_classes=12, d_model=32,
    ...                                     nhead=2, num_layers=1, d_ffn=64)
    >>> model(torch.randn(3, 101, 40)).shape
    torch.Size([3, 12])
    """

    def __init__(
        self,
        n_mels=64,
        n_frames=101,
        n_classes=12,
        patch_size=(16, 16),
        patch_stride=(10, 10),
        d_model=128,
        nhead=4,
        num_layers=4,
        d_ffn=256,
        dropout=0.1,
    ):
        super().__init__()
        patch_size, patch_stride = tuple(patch_size), tuple(patch_stride)
        if n_frames < patch_size[0] or n_mels < patch_size[1]:
            raise ValueError(f"input ({n_frames} frames x {n_mels} mels) is smaller than one patch {patch_size}")
        self.n_frames, self.n_mels = n_frames, n_mels
        self.patch_embedding = nn.Conv2d(1, d_model, kernel_size=patch_size, stride=patch_stride)
        grid = [(n - p) // s + 1 for n, p, s in zip((n_frames, n_mels), patch_size, patch_stride)]
        self.n_patches = grid[0] * grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.n_patches + 1, d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.embedding_dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(
            num_layers=num_layers,
            nhead=nhead,
            d_ffn=d_ffn,
            d_model=d_model,
            dropout=dropout,
            activation=nn.GELU,
            normalize_before=True,
            attention_type="regularMHA",
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, feats):
        """Class logits.

        Arguments
        ---------
        feats : torch.Tensor
            (batch, n_frames, n_mels) features.

        Returns
        -------
        torch.Tensor
            (batch, n_classes) logits.
        """
        if feats.shape[1:] != (self.n_frames, self.n_mels):
            raise ValueError(
                f"expected features of shape (batch, {self.n_frames}, {self.n_mels}), got {tuple(feats.shape)}: "
                "pad or trim the clips to the length the model was built for"
            )
        patches = self.patch_embedding(feats.unsqueeze(1))  # (batch, d_model, time', freq')
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.embedding_dropout(tokens + self.position_embedding)
        encoded, _ = self.encoder(tokens)  # the pre-norm encoder ends with a LayerNorm
        return self.head(encoded[:, 0])
