"""Data preparation for the LJSpeech FastSpeech2 recipe: SpeechBrain JSON manifests.

Reads the LJSpeech-1.1 layout (``metadata.csv`` with ``id|text|normalized
text`` rows and ``wavs/<id>.wav`` at 22.05 kHz) and writes three disjoint
splits to ``save_folder``:

* ``test.json``: the last ``n_test`` transcribed clips (sorted by id);
* ``calib.json``: the ``n_calib`` transcribed clips before them; the
  recipe's validation set during training and the quantization stage's
  calibration set;
* ``train.json``: every other transcribed clip, plus (optionally) clips that
  have no transcript in ``metadata.csv``, transcribed by a Whisper model
  (``pseudo_label_model``). Such pseudo-transcripts only ever go to training;
  the calibration and test sets keep the human transcripts.

Each entry holds ``wav`` (with a ``{data_root}`` placeholder), ``label`` (the
normalized text), ``duration`` (s) and ``transcript`` (``metadata`` or
``whisper``). ``splits.json`` lists the ids of each split. Re-running with the
same options and existing manifests does nothing.

Authors
 * esc_plugin contributors 2025
"""
import csv
import json
import logging
import os
import re

import soundfile as sf

from esc_plugin.core.io import write_json

logger = logging.getLogger(__name__)

SAMPLE_RATE = 22050
OPTIONS_FILE = "prepare_options.json"
PSEUDO_LABELS_FILE = "pseudo_transcripts.json"
SPLITS = ("train", "calib", "test")


class PreparationError(ValueError):
    """The data folder does not hold what the recipe needs; the message names the fix."""


def prepare_ljspeech(
    data_folder,
    save_folder,
    n_calib=100,
    n_test=100,
    pseudo_label_model=None,
    sample_rate=SAMPLE_RATE,
    skip_prep=False,
):
    """Write ``train.json``, ``calib.json``, ``test.json`` and ``splits.json``.

    Arguments
    ---------
    data_folder : str
        LJSpeech folder with ``metadata.csv`` and ``wavs/``.
    save_folder : str
        Where the manifests go.
    n_calib : int
        Transcribed clips for calibration (and validation).
    n_test : int
        Transcribed clips for the test set.
    pseudo_label_model : str, optional
        A Whisper model folder (Hugging Face format, e.g. whisper-tiny.en).
        When given, wavs without a ``metadata.csv`` row are transcribed with it
        (greedy) and added to training; transcripts containing digits are
        dropped, since the model's tokens are letters and numbers are not
        verbalised here. The transcripts are cached in
        ``save_folder/pseudo_transcripts.json``.
    sample_rate : int
        Expected sampling rate of every clip.
    skip_prep : bool
        Do nothing.

    Returns
    -------
    dict
        ``{split: [ids]}``.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "wavs"))
    >>> rows = []
    >>> for i in range(5):
    ...     sf.write(os.path.join(root, "wavs", f"LJ0-{i}.wav"), np.zeros(2205), 22050)
    ...     rows.append(f"LJ0-{i}|Text {i}.|Text {i}.")
    >>> _ = open(os.path.join(root, "metadata.csv"), "w").write("\\n".join(rows))
    >>> splits = prepare_ljspeech(root, os.path.join(root, "out"), n_calib=1, n_test=2)
    >>> splits["train"], splits["calib"], splits["test"]
    (['LJ0-0', 'LJ0-1'], ['LJ0-2'], ['LJ0-3', 'LJ0-4'])
    """
    if skip_prep:
        return None
    options = {
        "data_folder": os.path.abspath(data_folder),
        "n_calib": int(n_calib),
        "n_test": int(n_test),
        "pseudo_label_model": os.path.abspath(pseudo_label_model) if pseudo_label_model else None,
        "sample_rate": int(sample_rate),
    }
    if _already_prepared(save_folder, options):
        logger.info("Manifests in %s match the options; skipping preparation.", save_folder)
        with open(os.path.join(save_folder, "splits.json")) as f:
            return json.load(f)

    wav_folder = os.path.join(data_folder, "wavs")
    if not os.path.isdir(wav_folder):
        raise PreparationError(
            f"{wav_folder} does not exist: --data_folder must point to an LJSpeech-1.1 folder "
            "(metadata.csv and wavs/), e.g. --data_folder=../shared/data/ljspeech."
        )
    transcripts = read_metadata(os.path.join(data_folder, "metadata.csv"))
    wavs = {f[:-4]: os.path.join(wav_folder, f) for f in os.listdir(wav_folder) if f.endswith(".wav")}
    missing = sorted(set(transcripts) - set(wavs))
    if missing:
        raise PreparationError(
            f"metadata.csv lists {len(missing)} clip(s) with no wav in {wav_folder} (first: {missing[0]}); "
            "restore the wavs or remove their rows."
        )

    transcribed = sorted(transcripts)
    if n_calib < 1 or n_test < 1:
        raise PreparationError("n_calib and n_test must be at least 1.")
    n_train_real = len(transcribed) - n_calib - n_test
    if n_train_real < 0 or (n_train_real == 0 and not pseudo_label_model):
        raise PreparationError(
            f"{len(transcribed)} transcribed clips cannot give n_calib={n_calib} + n_test={n_test} and a "
            "training set: lower --n_calib / --n_test, or add untranscribed clips with "
            "--pseudo_label_model=<whisper folder>."
        )
    split_ids = {
        "test": transcribed[len(transcribed) - n_test:],
        "calib": transcribed[n_train_real:n_train_real + n_calib],
        "train": transcribed[:n_train_real],
    }
    labels = {uid: (text, "metadata") for uid, text in transcripts.items()}

    untranscribed = sorted(set(wavs) - set(transcripts))
    if pseudo_label_model and untranscribed:
        pseudo = _pseudo_transcripts(untranscribed, wavs, pseudo_label_model, save_folder)
        kept = [uid for uid in untranscribed if not re.search(r"\d", pseudo[uid])]
        logger.info(
            "Whisper pseudo-transcripts: %d of %d untranscribed clips kept for training "
            "(%d dropped for containing digits).", len(kept), len(untranscribed), len(untranscribed) - len(kept))
        split_ids["train"] = sorted(split_ids["train"] + kept)
        labels.update({uid: (pseudo[uid], "whisper") for uid in kept})

    os.makedirs(save_folder, exist_ok=True)
    for split in SPLITS:
        manifest = {}
        for uid in split_ids[split]:
            info = sf.info(wavs[uid])
            if info.samplerate != sample_rate:
                raise PreparationError(
                    f"{wavs[uid]} is at {info.samplerate} Hz, the recipe expects {sample_rate} Hz: "
                    "resample the clips or set sample_rate (and the mel settings) in the hparams."
                )
            text, source = labels[uid]
            manifest[uid] = {
                "wav": "{data_root}/wavs/" + os.path.basename(wavs[uid]),
                "label": text,
                "duration": round(info.frames / info.samplerate, 3),
                "transcript": source,
            }
        write_json(os.path.join(save_folder, f"{split}.json"), manifest)
    write_json(os.path.join(save_folder, "splits.json"), split_ids)
    write_json(os.path.join(save_folder, OPTIONS_FILE), options)
    logger.info("LJSpeech splits: %s", {k: len(v) for k, v in split_ids.items()})
    return split_ids


def read_metadata(path):
    """``{id: normalized text}`` from an LJSpeech ``metadata.csv`` (``id|text|normalized``).

    Arguments
    ---------
    path : str

    Returns
    -------
    dict
    """
    if not os.path.isfile(path):
        raise PreparationError(f"{path} does not exist: the LJSpeech folder needs its metadata.csv.")
    out = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
            if not row:
                continue
            if len(row) < 2:
                raise PreparationError(f"{path}: row {row!r} is not `id|text|normalized text`.")
            out[row[0]] = row[2] if len(row) > 2 and row[2] else row[1]
    return out


def _already_prepared(save_folder, options):
    files = [os.path.join(save_folder, f) for f in (OPTIONS_FILE, "splits.json")]
    files += [os.path.join(save_folder, f"{s}.json") for s in SPLITS]
    if not all(os.path.isfile(f) for f in files):
        return False
    with open(files[0]) as f:
        return json.load(f) == options


def _pseudo_transcripts(ids, wavs, model_folder, save_folder):
    """Greedy Whisper transcripts of ``ids`` (cached in ``save_folder``)."""
    cache_path = os.path.join(save_folder, PSEUDO_LABELS_FILE)
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
        if cache.get("model") != os.path.abspath(model_folder):
            cache = {}
    texts = dict(cache.get("transcripts", {}))
    todo = [uid for uid in ids if uid not in texts]
    if todo:
        texts.update(_transcribe(todo, wavs, model_folder))
        os.makedirs(save_folder, exist_ok=True)
        write_json(cache_path, {"model": os.path.abspath(model_folder), "transcripts": texts})
    return {uid: texts[uid].strip() for uid in ids}


def _transcribe(ids, wavs, model_folder, batch_size=8):
    import torch
    import torchaudio.functional as AF
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from esc_plugin.tasks.whisper import SAMPLE_RATE as WHISPER_RATE, greedy_decode, log_mel

    if not os.path.isfile(os.path.join(model_folder, "tokenizer.json")):
        raise PreparationError(
            f"{model_folder} is not a Whisper model folder (no tokenizer.json): "
            "pass e.g. --pseudo_label_model=../shared/models/whisper-tiny.en, or leave it empty."
        )
    model = WhisperForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(model_folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_folder, "tokenizer.json"))
    out = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="whisper pseudo-transcripts"):
        chunk = ids[start:start + batch_size]
        audio = []
        for uid in chunk:
            samples, rate = sf.read(wavs[uid], dtype="float32", always_2d=True)
            audio.append(AF.resample(torch.from_numpy(samples[:, 0]), rate, WHISPER_RATE))
        with torch.no_grad():
            enc = model.model.encoder(log_mel(extractor, audio)).last_hidden_state
            hyps = tokenizer.batch_decode(greedy_decode(model, enc), skip_special_tokens=True)
        out.update(zip(chunk, hyps))
    return out
