#!/usr/bin/env python3
"""Recipe: pretrained Whisper tiny.en through SpeechBrain's Hugging Face
integration, as a SpeechBrain Brain: FP32 evaluation (WER) on the transcribed
clips, then (optionally) its low-bit quantization with esc_plugin, with the
Brain's ErrorRateStats WER as the calibration objective.

Nothing is trained: the weights come from ``whisper_source`` (read, never
written) and are evaluated in float32. Decoding is SpeechBrain's
``S2SWhisperGreedySearcher`` (KV cache). Calibration (``calib_source``, see
``transcribed_prepare.py``): by default 100 untranscribed LibriSpeech
utterances whose references are the FP32 model's own greedy transcripts
(made once, stored in ``calib_fp32_labels.json``), so the objective is the
quantized model's WER against FP32 -- calibration needs no transcripts and
shares no speaker with the 18 test clips.

The file is called ``train.py`` like every recipe, so that the same commands
drive all of them::

    python train.py hparams/whisper.yaml --data_folder=../shared/data \\
        --whisper_source=../shared/models/whisper-tiny.en --quantize=esc

Authors
 * esc_plugin contributors
"""
import json
import os
import sys

import speechbrain as sb
import torch
import torchaudio.functional as AF
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.logger import get_logger

from esc_plugin.core.io import write_json
from esc_plugin.metrics.text import normalize_text
from esc_plugin.speechbrain import quantize_brain
from esc_plugin.tasks.whisper import target_text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transcribed_prepare import prepare_transcribed  # noqa: E402

logger = get_logger(__name__)


class WhisperASR(sb.Brain):
    """Whisper encoder + teacher-forced decoder pass (NLL loss) + greedy search (WER)."""

    def compute_forward(self, batch, stage):
        """Waveforms -> (log-probabilities of the reference tokens, greedy hypotheses, lengths)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        bos_tokens, _ = batch.tokens_bos
        whisper = self.modules.whisper
        enc_out, logits, _ = whisper(wavs, bos_tokens)
        log_probs = self.hparams.log_softmax(logits)
        # The searcher keeps its own reference to the model: point it at the
        # module in use, which the quantization stage swaps for its quantized copy.
        searcher = self.hparams.test_search
        searcher.model = whisper
        hyps, _, _, _ = searcher(enc_out.detach(), wav_lens)
        return log_probs, hyps, wav_lens

    def compute_objectives(self, predictions, batch, stage):
        """NLL of the reference tokens; on the evaluation stages the WER of the hypotheses."""
        log_probs, hyps, _ = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        loss = self.hparams.nll_loss(log_probs, tokens_eos, length=tokens_eos_lens)
        if stage != sb.Stage.TRAIN:
            texts = self.modules.whisper.tokenizer.batch_decode(hyps, skip_special_tokens=True)
            # Whisper writes cased, punctuated text; references are upper case (SpeechBrain
            # samples) or cased (LJSpeech): both sides are normalised before scoring.
            predicted = [normalize_text(t).split() for t in texts]
            targets = [normalize_text(w).split() for w in batch.words]
            self.wer_metric.append(batch.id, predicted, targets)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """A fresh WER tracker for every evaluation pass."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.wer_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log loss and WER (percent); keep them in ``test_stats``; write the per-utterance WER file."""
        if stage != sb.Stage.TEST:
            return
        stats = {"loss": stage_loss, "WER": self.wer_metric.summarize("error_rate")}
        self.hparams.train_logger.log_stats(stats_meta={"pretrained": self.hparams.whisper_source},
                                            test_stats=stats)
        self.test_stats = {k: float(v) for k, v in stats.items()}
        if sb.utils.distributed.if_main_process():
            with open(self.hparams.wer_file, "w") as w:
                self.wer_metric.write_stats(w)


def build_brain(hparams, run_opts):
    """The Brain around ``hparams["whisper"]``, in float32 (the shared weights are stored in float16)."""
    hparams["whisper"].float()
    return WhisperASR(modules=hparams["modules"], hparams=hparams, run_opts=run_opts)


def dataio_prepare(hparams, tokenizer, json_path, n=None):
    """A ``DynamicItemDataset`` of ``json_path`` with ``sig`` (16 kHz), ``words``, ``tokens_bos`` and ``tokens_eos``."""
    data = sb.dataio.dataset.DynamicItemDataset.from_json(
        json_path=json_path, replacements={"data_root": hparams["data_folder"]}
    )
    if n:
        data = data.filtered_sorted(select_n=n)
    prefix = list(tokenizer.prefix_tokens)  # <|startoftranscript|><|notimestamps|> for tiny.en
    eos = tokenizer.eos_token_id

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        sig = sb.dataio.dataio.read_audio(wav)
        rate = sb.dataio.dataio.read_audio_info(wav).sample_rate
        return AF.resample(sig, rate, hparams["sample_rate"]) if rate != hparams["sample_rate"] else sig

    @sb.utils.data_pipeline.takes("words")
    @sb.utils.data_pipeline.provides("words", "tokens_bos", "tokens_eos")
    def text_pipeline(words):
        yield words
        # Whisper's own style (leading space, sentence case) so the NLL measures the
        # acoustic match; an unlabelled calibration item has no target tokens.
        tokens = tokenizer.encode(target_text(words), add_special_tokens=False) if words.strip() else []
        yield torch.LongTensor(prefix + tokens)
        yield torch.LongTensor(prefix[1:] + tokens + [eos])

    sb.dataio.dataset.add_dynamic_item([data], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([data], text_pipeline)
    sb.dataio.dataset.set_output_keys([data], ["id", "sig", "words", "tokens_bos", "tokens_eos"])
    return data


@torch.no_grad()
def label_calibration_set(brain, calib_data, hparams):
    """Write ``calib_labelled_json``: the calibration manifest with the FP32 model's
    greedy transcripts as ``words``. Kept when it already labels the same items."""
    path = hparams["calib_labelled_json"]
    with open(hparams["calib_json"]) as f:
        manifest = json.load(f)
    ids = [calib_data[i]["id"] for i in range(len(calib_data))]
    if os.path.isfile(path):
        with open(path) as f:
            if list(json.load(f)) == ids:
                return
    loader = brain.make_dataloader(calib_data, sb.Stage.TEST, ckpt_prefix=None,
                                   **dict(hparams["test_dataloader_opts"], shuffle=False))
    brain.modules.eval()
    tokenizer = brain.modules.whisper.tokenizer
    labels = {}
    for batch in loader:
        _, hyps, _ = brain.compute_forward(batch, sb.Stage.TEST)
        labels.update(zip(batch.id, (t.strip() for t in tokenizer.batch_decode(hyps, skip_special_tokens=True))))
    write_json(path, {uid: dict(manifest[uid], words=labels[uid]) for uid in ids})
    logger.info(f"FP32 transcripts of {len(ids)} calibration utterances written to {path}")


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(
        prepare_transcribed,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prepare_folder"],
            "calib_source": hparams["calib_source"],
            "n_calib": hparams["n_calib"],
            "seed": hparams["split_seed"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    asr_brain = build_brain(hparams, run_opts)
    tokenizer = hparams["whisper"].tokenizer
    test_data = dataio_prepare(hparams, tokenizer, hparams["test_json"], hparams["n_test"])
    calib_data = dataio_prepare(hparams, tokenizer, hparams["calib_json"])
    if hparams["calib_source"] == "librispeech":
        run_on_main(label_calibration_set, args=[asr_brain, calib_data, hparams])
        calib_data = dataio_prepare(hparams, tokenizer, hparams["calib_labelled_json"])

    asr_brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(asr_brain, hparams, calib_set=calib_data, test_set=test_data,
                   loader_kwargs=hparams["test_dataloader_opts"])
