#!/usr/bin/env python3
"""Recipe: a small Conformer-CTC ASR model on the Speech Commands keywords, then
(optionally) its low-bit quantization with esc_plugin.

Fbank (40 mels) -> global mean/variance normalisation -> 2 strided conv blocks
(time and frequency / 4) -> Conformer encoder (RelPosMHAXL attention) ->
linear -> CTC over characters; greedy CTC decoding. Every clip holds one
word, so the word error rate is the fraction of misrecognised words.

To run this recipe::

    python train.py hparams/conformer_ctc.yaml --data_folder=../shared/data/speech_commands

and to quantize the trained model (the training is recovered from the
checkpoint, not repeated)::

    python train.py hparams/conformer_ctc.yaml --data_folder=../shared/data/speech_commands \\
        --quantize=esc --quantization="{bits: 4}"

Authors
 * esc_plugin contributors
"""
import os
import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.logger import get_logger

from esc_plugin.metrics import char_error_rate
from esc_plugin.speechbrain import quantize_brain

# speech_commands_prepare.py is shared by the Speech Commands recipes, two folders up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from speech_commands_prepare import prepare_speech_commands  # noqa: E402

logger = get_logger(__name__)


class ASR(sb.Brain):
    """Conformer encoder + CTC head, greedy decoding, WER/CER on the evaluation stages."""

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC log-probabilities (batch, frames, tokens)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "fea_augment"):
            feats, wav_lens = self.hparams.fea_augment(feats, wav_lens)
        src = self.modules.CNN(feats)
        enc_out = self.modules.Transformer.encode(src, wav_lens)
        log_probs = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        return log_probs, wav_lens

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; on the evaluation stages also the greedy transcripts into ``wer_metric``."""
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        loss = self.hparams.ctc_cost(log_probs, tokens, wav_lens, token_lens)
        if stage != sb.Stage.TRAIN:
            hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=self.hparams.blank_index)
            # One word per clip and no space token: the characters form the word.
            predicted = ["".join(self.tokenizer.decode_ndim(h)).split() for h in hyps]
            targets = [w.split() for w in batch.words]
            self.wer_metric.append(batch.id, predicted, targets)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """A fresh WER tracker for every evaluation pass."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.wer_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log loss / WER / CER; checkpoint after validation; keep the test summary."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats["WER"] = self.wer_metric.summarize("error_rate")
        stage_stats["CER"] = 100.0 * char_error_rate(
            [" ".join(s["ref_tokens"]) for s in self.wer_metric.scores],
            [" ".join(s["hyp_tokens"]) for s in self.wer_metric.scores],
            normalize=False,
        )
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(meta={"WER": stage_stats["WER"]}, num_to_keep=1)
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stage_stats,
            )
            self.test_stats = {k: float(v) for k, v in stage_stats.items()}
            if sb.utils.distributed.if_main_process():
                with open(self.hparams.wer_file, "w") as w:
                    self.wer_metric.write_stats(w)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """The Noam schedule advances with every optimizer step."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)


def dataio_prepare(hparams, tokenizer):
    """Train / calibration / test ``DynamicItemDataset``s with ``sig``, ``words`` and ``tokens``."""
    data_folder = hparams["data_folder"]

    def load(json_key, n_key):
        data = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[json_key], replacements={"data_root": data_folder}
        )
        n = hparams.get(n_key)
        return data.filtered_sorted(select_n=n) if n else data

    train_data = load("train_json", "n_train")
    calib_data = load("calib_json", None)
    test_data = load("test_json", "n_test")
    datasets = [train_data, calib_data, test_data]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("words")
    @sb.utils.data_pipeline.provides("words", "tokens")
    def text_pipeline(words):
        yield words
        yield tokenizer.encode_sequence_torch(list(words))

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "words", "tokens"])
    return train_data, calib_data, test_data


def build_tokenizer(hparams):
    """Character encoder: CTC blank at ``blank_index``, then the letters of the keywords."""
    letters = sorted(set("".join(hparams["words"])))
    tokenizer = sb.dataio.encoder.CTCTextEncoder()
    tokenizer.load_or_create(
        path=os.path.join(hparams["save_folder"], "tokenizer.txt"),
        from_iterables=[letters],
        sequence_input=False,
        special_labels={"blank_label": hparams["blank_index"]},
    )
    if len(tokenizer) != hparams["output_neurons"]:
        raise ValueError(
            f"the keywords {hparams['words']} give {len(tokenizer)} tokens (blank + letters) but "
            f"output_neurons={hparams['output_neurons']}: set --output_neurons={len(tokenizer)}"
        )
    return tokenizer


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
        prepare_speech_commands,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prepare_folder"],
            "labels": hparams["words"],
            "n_calib": hparams["n_calib"],
            "test_fraction": hparams["test_fraction"],
            "seed": hparams["split_seed"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    os.makedirs(hparams["save_folder"], exist_ok=True)
    tokenizer = build_tokenizer(hparams)
    train_data, calib_data, test_data = dataio_prepare(hparams, tokenizer)

    asr_brain = ASR(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer

    # The calibration split doubles as the validation set: it is disjoint from
    # training and test, and the checkpoint kept is the last one (no selection).
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        calib_data,
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )

    asr_brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(asr_brain, hparams, calib_set=calib_data, test_set=test_data,
                   loader_kwargs=hparams["test_dataloader_opts"])
