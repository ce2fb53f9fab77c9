"""FastSpeech2 with internal alignment, guided by the static beta-binomial alignment prior.

SpeechBrain's ``FastSpeech2WithAlignment`` implements the aligner of "One TTS
Alignment To Rule Them All" (Badlani et al., 2021) but calls it without the
paper's static prior, which biases each mel frame towards the tokens near the
diagonal of the (frames × tokens) plane. Without it, in this recipe's budget
(30 epochs on the 20-clip stand-in, batch 4) the aligner stayed degenerate
(1 frame per character) and the decoder learned little more than the average
spectrum. The subclass below adds the prior and
changes nothing else: same parameters, same state dict, same outputs format.

Authors
 * esc_plugin contributors 2025
"""
import torch

from speechbrain.lobes.models.FastSpeech2 import FastSpeech2WithAlignment, maximum_path_numpy


def beta_binomial_prior(n_tokens, n_frames, scaling=1.0):
    """Static alignment prior ``P[frame, token]`` (each row a beta-binomial pmf over tokens).

    Frame ``i`` (1-based) of ``n_frames`` has ``pmf(k; n_tokens, a=scaling*i,
    b=scaling*(n_frames + 1 - i))`` for tokens ``k = 0 … n_tokens-1``.

    Arguments
    ---------
    n_tokens : int
    n_frames : int
    scaling : float
        Lower values give a wider prior.

    Returns
    -------
    torch.Tensor
        ``(n_frames, n_tokens)``.

    Example
    -------
    >>> prior = beta_binomial_prior(3, 6)
    >>> prior.shape, prior.argmax(dim=1).tolist()
    (torch.Size([6, 3]), [0, 0, 1, 2, 2, 2])
    """
    n = torch.tensor(float(n_tokens))
    k = torch.arange(n_tokens, dtype=torch.float64)[None, :]
    i = torch.arange(1, n_frames + 1, dtype=torch.float64)[:, None]
    a, b = scaling * i, scaling * (n_frames + 1 - i)

    def log_beta(x, y):
        return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)

    log_choose = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    log_pmf = log_choose + log_beta(k + a, n - k + b) - log_beta(a, b)
    return log_pmf.exp().float()


class FastSpeech2WithAlignmentPrior(FastSpeech2WithAlignment):
    """``FastSpeech2WithAlignment`` whose aligner also sees the beta-binomial prior.

    Arguments
    ---------
    prior_scaling : float
        Scaling of the prior's beta parameters (1.0 as in the paper).
    **kwargs
        The arguments of ``FastSpeech2WithAlignment``.
    """

    def __init__(self, prior_scaling=1.0, **kwargs):
        super().__init__(**kwargs)
        self.prior_scaling = prior_scaling

    def _forward_aligner(self, x, y, x_mask, y_mask):
        """As the parent's, with the prior passed to the alignment network."""
        token_lengths = x_mask.sum(dim=-1).flatten().long().tolist()
        frame_lengths = y_mask.sum(dim=-1).flatten().long().tolist()
        prior = torch.zeros(x.shape[0], y.shape[1], x.shape[1], device=x.device)
        for idx, (n_tok, n_frm) in enumerate(zip(token_lengths, frame_lengths)):
            prior[idx, :n_frm, :n_tok] = beta_binomial_prior(n_tok, n_frm, self.prior_scaling)
        attn_mask = torch.unsqueeze(x_mask, -1) * torch.unsqueeze(y_mask, 2)
        alignment_soft, alignment_logprob = self.aligner(
            y.transpose(1, 2), x.transpose(1, 2), x_mask, prior.to(x.device)
        )
        alignment_mas = maximum_path_numpy(
            alignment_soft.squeeze(1).transpose(1, 2).contiguous(),
            attn_mask.squeeze(1).contiguous(),
        )
        durations = torch.sum(alignment_mas, -1).int()
        alignment_soft = alignment_soft.squeeze(1).transpose(1, 2)
        return durations, alignment_soft, alignment_logprob, alignment_mas
