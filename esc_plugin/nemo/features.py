"""Preprocessor features of a manifest, computed once, and the WER objective on them.

The audio goes through NeMo's own dataloader: the model's
``_setup_dataloader_from_config`` on a copy of its ``test_ds`` (else
``validation_ds``) config pointed at the manifest, so sample rate, labels /
tokenizer, text normalisation and batching are NeMo's. The float preprocessor
(``AudioToMelSpectrogramPreprocessor``) runs once, in eval mode (no dither);
:meth:`ASRFeatureCache.forward_loop` and :meth:`ASRFeatureCache.word_error_rate`
then only run encoder + decoder (``model(processed_signal=..., ...)``), which is
all that depends on the quantization scales.
"""
import copy

import torch
from tqdm.auto import tqdm

from ._modules import check_ctc_model, evaluation_mode
from .errors import ManifestError
from .manifest import read_manifest


def dataloader_config(asr_model, manifest, n_samples=None, batch_size=16, overrides=None):
    """The NeMo data config used to read ``manifest`` (a plain dict).

    Starts from the model's ``test_ds`` (else ``validation_ds``) config, reads the
    manifest as a plain (not tarred, not Lhotse) dataset in file order, first
    ``n_samples`` utterances (``max_utts``), and applies ``overrides`` last.
    """
    from omegaconf import OmegaConf

    base = {}
    for key in ("test_ds", "validation_ds"):
        section = asr_model.cfg.get(key) if asr_model.cfg is not None else None
        if section is not None:
            base = OmegaConf.to_container(section, resolve=True)
            break
    config = dict(base)
    for key in ("tarred_audio_filepaths", "shard_strategy", "bucketing_strategy", "bucketing_batch_size"):
        config.pop(key, None)
    config.update({
        "manifest_filepath": str(manifest),
        "batch_size": int(batch_size),
        "shuffle": False,
        "num_workers": 0,
        "pin_memory": False,
        "is_tarred": False,
        "use_lhotse": False,
        "use_semi_sorted_batching": False,
        "return_sample_id": False,
        "max_utts": int(n_samples or 0),
    })
    config.update(dict(overrides or {}))
    return config


class ASRFeatureCache:
    """Cached preprocessor features + references of a manifest, for a NeMo CTC model.

    Arguments
    ---------
    batches : list of tuple
        ``(features, feature_lengths, tokens, token_lengths)`` per batch.
    manifest : str
        Where the utterances came from (for reports).
    use_cer : bool
        Score character instead of word error rate.

    Example
    -------
    >>> cache = ASRFeatureCache.from_manifest(asr_model, "calibration.json", n_samples=100)  # doctest: +SKIP
    >>> wer = cache.word_error_rate(asr_model)   # NeMo's WER with the model's decoding     # doctest: +SKIP
    """

    def __init__(self, batches, manifest=None, use_cer=False):
        self.batches = list(batches)
        self.manifest = manifest
        self.use_cer = bool(use_cer)

    @property
    def n_utterances(self):
        return sum(int(b[0].shape[0]) for b in self.batches)

    @classmethod
    @torch.no_grad()
    def from_manifest(cls, asr_model, manifest, n_samples=None, batch_size=16, data_config=None,
                      use_cer=False, progress=True):
        """Read ``manifest`` with NeMo's dataloader and run the model's preprocessor once.

        Arguments
        ---------
        asr_model : nemo.collections.asr.models.EncDecCTCModel
            The FP32 model (not modified: its preprocessor runs in eval mode and
            every module's mode is restored after).
        manifest : str or Path
            NeMo JSON-lines manifest.
        n_samples : int, optional
            Use the first ``n_samples`` utterances (all if None); fewer raises
            :class:`ManifestError` before any audio is read.
        batch_size : int
            Utterances per batch.
        data_config : dict, optional
            Overrides of the NeMo data config (see :func:`dataloader_config`).
        use_cer : bool
            Objective = character error rate instead of WER.
        progress : bool
            tqdm bar.
        """
        check_ctc_model(asr_model)
        rows = read_manifest(manifest, min_rows=n_samples)
        if not rows:
            raise ManifestError(f"manifest '{manifest}' is empty.")
        expected = n_samples or len(rows)
        config = dataloader_config(asr_model, manifest, n_samples, batch_size, data_config)
        loader = asr_model._setup_dataloader_from_config(config=copy.deepcopy(config))
        if loader is None:
            raise ManifestError(f"NeMo built no dataloader for '{manifest}' with config {config}.")
        n_read = len(loader.dataset)
        if n_read < expected:
            raise ManifestError(
                f"NeMo's dataset kept {n_read} of the {expected} utterances asked for from '{manifest}' "
                "(the data config's min_duration / max_duration filter the others): pass "
                "data_config={'min_duration': None, 'max_duration': None} or a larger manifest."
            )
        batches = []
        with evaluation_mode(asr_model.preprocessor):
            for batch in tqdm(loader, desc="NeMo preprocessor (cached once)", disable=not progress):
                signal, signal_len, tokens, tokens_len = batch[:4]
                feats, feats_len = asr_model.preprocessor(input_signal=signal, length=signal_len)
                batches.append((feats.contiguous(), feats_len, tokens, tokens_len))
        return cls(batches, str(manifest), use_cer)

    @torch.no_grad()
    def forward_loop(self, model):
        """Run the cached features through ``model``'s encoder + decoder (calibration pass)."""
        for feats, feats_len, _, _ in self.batches:
            model(processed_signal=feats, processed_signal_length=feats_len)

    def split_objective(self):
        """:meth:`word_error_rate` as a :class:`~esc_plugin.core.selection.SplitObjective` over the
        cached batches, so ESC's selection guard can hold some of them back."""
        from esc_plugin.core.selection import SplitObjective

        return SplitObjective(self.word_error_rate, len(self.batches),
                              sizes=[int(b[0].shape[0]) for b in self.batches])

    @torch.no_grad()
    def word_error_rate(self, model, indices=None):
        """NeMo's ``WER`` (corpus level: edits / reference words, a fraction) of ``model`` on the
        cached utterances (the batches at ``indices``, all by default), decoded with
        ``model.decoding``; the model runs in eval mode (its modes are restored after).

        NeMo's ``WER.update`` keeps only the last batch's counts (its validation loop computes
        each batch and sums numerators and denominators at the epoch's end), so the counts of
        each batch are summed here the same way.
        """
        from nemo.collections.asr.metrics.wer import WER

        metric = WER(decoding=model.decoding, use_cer=self.use_cer, log_prediction=False,
                     dist_sync_on_step=False)
        errors, words = 0.0, 0.0
        with evaluation_mode(model):
            for i, (feats, feats_len, tokens, tokens_len) in enumerate(self.batches):
                if indices is not None and i not in indices:
                    continue
                log_probs, encoded_len, _ = model(processed_signal=feats, processed_signal_length=feats_len)
                metric.update(predictions=log_probs, predictions_lengths=encoded_len,
                              targets=tokens, targets_lengths=tokens_len)
                _, batch_errors, batch_words = metric.compute()
                metric.reset()
                errors += float(batch_errors)
                words += float(batch_words)
        if words == 0:
            raise ManifestError(f"the references of {self.manifest} hold no words: WER is undefined.")
        return errors / words

    objective = word_error_rate
