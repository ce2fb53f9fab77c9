"""Pieces shared by the LibriSpeech speaker-verification recipes (ecapa, ge2e).

* :class:`VerificationStats`: a ``BinaryMetricStats`` whose summary also holds
  ``EER`` (percent), ``minDCF`` (normalized), ``gaussian_EER`` and the
  calibration objective ``EER+gaussian_EER``.
* :func:`trial_datasets`: the calibration / test trial datasets built from the
  manifests of ``librispeech_prepare.py``.
* :func:`embed_trials`: embeds both sides of a batch of trials, each distinct
  utterance once and unpadded, so an utterance's embedding does not depend on
  which trials share its batch.
"""
import math

import speechbrain as sb
import torch
from speechbrain.utils.metric_stats import EER, BinaryMetricStats, minDCF


class VerificationStats(BinaryMetricStats):
    """Cosine scores of verification trials -> EER and minDCF.

    ``summarize()`` returns ``BinaryMetricStats``' fields (at the EER
    threshold) plus:

    * ``EER``: equal error rate in percent (``speechbrain.utils.metric_stats.EER``);
    * ``minDCF``: ``speechbrain.utils.metric_stats.minDCF`` divided by
      ``min(c_miss * p_target, c_fa * (1 - p_target))`` (the NIST convention:
      1.0 is the cost of always rejecting, so values are comparable across
      ``p_target``);
    * ``gaussian_EER``: the EER (percent) of two Gaussians fitted to the target
      and non-target scores, ``100 * Phi(-(mu_t - mu_n) / (sigma_t + sigma_n))``
      (exact for unequal variances). It moves smoothly with the scores and is
      never exactly 0, so it still measures separation when the trials are
      perfectly separated (empirical EER 0);
    * ``EER+gaussian_EER``: their sum (percent), the recipes' calibration
      objective: the empirical EER moves in steps of ``100 / n_trials``, and
      on a well-separated calibration set it is 0 whatever the scales, so the
      search would get no signal from it alone.

    Arguments
    ---------
    p_target : float
        Prior of a target trial for minDCF.
    c_miss : float
        Cost of a miss.
    c_fa : float
        Cost of a false alarm.

    Example
    -------
    >>> stats = VerificationStats(p_target=0.5)
    >>> stats.append(["a", "b", "c", "d"], torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    >>> summary = stats.summarize()
    >>> summary["EER"], summary["minDCF"]
    (0.0, 0.0)
    """

    def __init__(self, p_target=0.01, c_miss=1.0, c_fa=1.0):
        super().__init__(positive_label=1)
        self.p_target, self.c_miss, self.c_fa = p_target, c_miss, c_fa

    def summarize(self, field=None, threshold=None, max_samples=None, beta=1, eps=1e-8):
        """Compute the summary (see the class docstring); ``field`` selects one key."""
        if len(self.scores) == 0:
            raise ValueError("VerificationStats has no trials: append scores before summarize().")
        summary = super().summarize(None, threshold, max_samples, beta, eps)
        positive = self.scores[self.labels == self.positive_label]
        negative = self.scores[self.labels != self.positive_label]
        if len(positive) == 0 or len(negative) == 0:
            raise ValueError(
                f"EER needs target and non-target trials; got {len(positive)} target and "
                f"{len(negative)} non-target: use more trials (the manifests interleave both kinds)."
            )
        eer, eer_threshold = EER(positive, negative)
        dcf, _ = minDCF(positive, negative, self.c_miss, self.c_fa, self.p_target)
        dcf = dcf / min(self.c_miss * self.p_target, self.c_fa * (1 - self.p_target))
        summary["EER"] = 100.0 * eer
        summary["EER_threshold"] = eer_threshold
        summary["minDCF"] = dcf
        summary["gaussian_EER"] = 100.0 * gaussian_eer(positive, negative)
        summary["EER+gaussian_EER"] = summary["EER"] + summary["gaussian_EER"]
        return summary[field] if field is not None else summary


def gaussian_eer(positive_scores, negative_scores):
    """EER (fraction) of N(mu_t, sigma_t) targets against N(mu_n, sigma_n) non-targets.

    At the threshold ``(mu_t * sigma_n + mu_n * sigma_t) / (sigma_t + sigma_n)``
    the miss and false-alarm rates are both ``Phi(-(mu_t - mu_n) / (sigma_t + sigma_n))``.

    Example
    -------
    >>> round(gaussian_eer(torch.tensor([0.8, 1.0, 1.2]), torch.tensor([-0.2, 0.0, 0.2])), 4)
    0.0011
    """
    positive, negative = positive_scores.double(), negative_scores.double()
    spread = positive.std(unbiased=False) + negative.std(unbiased=False)
    z = (positive.mean() - negative.mean()) / spread.clamp_min(1e-12)
    return float(0.5 * torch.special.erfc(z / math.sqrt(2.0)))


def trial_datasets(hparams):
    """Calibration and test trial datasets from the prepared manifests.

    Items provide ``id``, ``enrol_id``, ``test_id``, ``enrol_sig``, ``test_sig``
    (waveforms, cropped to ``hparams["max_trial_seconds"]`` when it is set)
    and ``label`` (1 = same speaker, 0 = different; batched as an int64 tensor).

    Arguments
    ---------
    hparams : dict
        Needs ``calib_trials``, ``test_trials`` (manifest paths),
        ``trials_folder``, ``sample_rate`` and optionally ``max_trial_seconds``.

    Returns
    -------
    calib_data, test_data : DynamicItemDataset
    """
    max_seconds = hparams.get("max_trial_seconds")
    max_samples = None if max_seconds is None else int(max_seconds * hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("enrol_wav", "test_wav")
    @sb.utils.data_pipeline.provides("enrol_sig", "test_sig")
    def audio_pipeline(enrol_wav, test_wav):
        for path in (enrol_wav, test_wav):
            yield sb.dataio.dataio.read_audio(path)[:max_samples]

    datasets = []
    for manifest in (hparams["calib_trials"], hparams["test_trials"]):
        data = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=manifest,
            replacements={"data_root": hparams["trials_folder"]},
            dynamic_items=[audio_pipeline],
            output_keys=["id", "enrol_id", "test_id", "enrol_sig", "test_sig", "label"],
        )
        datasets.append(data)
    return tuple(datasets)


def embed_trials(batch, embed_utterances):
    """Embeddings of both sides of a batch of trials.

    The distinct utterances of the batch are cut to their own lengths (no
    padding) and embedded once each with ``embed_utterances``; trials share
    utterances, so this is several times cheaper than embedding each side of
    each trial, and an utterance's embedding does not depend on which trials
    share its batch.

    Arguments
    ---------
    batch : PaddedBatch
        A batch of trials from :func:`trial_datasets`.
    embed_utterances : callable
        ``list of (samples,) waveforms -> (len(list), dim) embeddings``.

    Returns
    -------
    enrol_embeddings, test_embeddings : torch.Tensor
        Shape (batch, dim) each.

    Example
    -------
    >>> from speechbrain.dataio.batch import PaddedBatch
    >>> items = [{"enrol_id": "a", "test_id": "b", "enrol_sig": torch.ones(3), "test_sig": torch.ones(2)},
    ...          {"enrol_id": "a", "test_id": "c", "enrol_sig": torch.ones(3), "test_sig": torch.ones(4)}]
    >>> calls = []
    >>> def total(wavs):
    ...     calls.append(len(wavs))
    ...     return torch.stack([w.sum().reshape(1) for w in wavs])
    >>> enrol, test = embed_trials(PaddedBatch(items), total)
    >>> enrol.flatten().tolist(), test.flatten().tolist(), calls
    ([3.0, 3.0], [2.0, 4.0], [3])
    """
    index, wavs = {}, []
    for ids, (signals, lens) in ((batch.enrol_id, batch.enrol_sig), (batch.test_id, batch.test_sig)):
        for i, utt_id in enumerate(ids):
            if utt_id not in index:
                index[utt_id] = len(wavs)
                wavs.append(signals[i, : int(torch.round(lens[i] * signals.shape[1]))])
    embeddings = embed_utterances(wavs).reshape(len(wavs), -1)
    enrol = embeddings[[index[u] for u in batch.enrol_id]]
    test = embeddings[[index[u] for u in batch.test_id]]
    return enrol, test


def cosine_scores(enrol_embeddings, test_embeddings):
    """Cosine similarity of each trial's two embeddings, shape (batch,)."""
    return torch.nn.functional.cosine_similarity(enrol_embeddings, test_embeddings, dim=-1, eps=1e-8)
