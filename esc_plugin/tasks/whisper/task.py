"""Whisper tiny.en ASR task builder: data, features, references and objective as one :class:`Task`.

Two calibration schemes (``calib=``):

``"transcribed"`` (default, the original one): the 18 transcribed clips
(:mod:`.data`) are split. Deterministic and clip-disjoint (with only 3
speakers it cannot be speaker-disjoint): the clips are grouped by speaker
(spk1, spk2, LJ), each group's ids are sorted and shuffled with ``seed``, the
groups are interleaved round-robin, and the first ``n_calib`` clips of that
order (default half: 9 = 3 per speaker) are the calibration clips, the rest
the evaluation clips. The calibration references are the true transcripts.
Nine sentences are too few: ESC fits them and the decoder's outlier channels
stay unconstrained (README, Results).

``"librispeech"``: calibration = ``n_calib`` (default 100) untranscribed
utterances of ``data/librispeech_speakers`` (LibriSpeech test-other, 10
speakers x 10, 2-23 s), taken round-robin over speakers in the same seeded
order; their references are the FP32 model's own greedy transcripts,
decoded once at build time. The objective is then a label-free "agreement
with FP32": WER against the FP32 transcript + 0.01 x teacher-forced
cross-entropy of the FP32 tokens (:mod:`.objectives`). Evaluation = all 18
transcribed clips with their true references, so calibration and evaluation
share neither clips nor speakers. ``info["calib_ids"]`` / ``info["eval_ids"]``
list them.

Log-mel features (WhisperFeatureExtractor, padded to 30 s) and the
reference token ids are computed once at build time, on ``device``.
Decoding: :mod:`.decoding`.

Cost: an objective call is dominated by the encoder (every clip is padded to
30 s) and the greedy decoding; the teacher-forced pass is cheap, so ``"ce"``
is the fastest objective. LibriSpeech calibration (100 utterances of up to
23 s) is slow on a CPU: use a GPU (``device="cuda"``, batches of 50). The
FP32 numbers are printed by ``python -m esc_plugin.tasks.whisper [--calib
librispeech] [--threads 1]``.
"""
import time
from typing import Optional

from esc_plugin.core.errors import ConfigError
from esc_plugin.tasks.audio import resolve_shared_root
from esc_plugin.tasks.base import Task

from .data import LIBRISPEECH_DIR, load_clips, select_librispeech, split_clips, target_text
from .decoding import EOS, NO_TIMESTAMPS, SOT
from .model import load_whisper, log_mel, resolve_device
from .objectives import OBJECTIVES, fp32_pseudo_labels, task_functions

CALIB_SOURCES = ("transcribed", "librispeech")


def build_whisper_task(shared_root=None, n_calib: Optional[int] = None, seed: int = 0, objective: str = "wer+ce",
                       batch_size: Optional[int] = None, max_new_tokens: int = 100,
                       decode_threads: Optional[int] = None, calib: str = "transcribed",
                       device: str = "cpu") -> Task:
    """Build the Whisper tiny.en ASR task.

    Arguments
    ---------
    shared_root : str or Path, optional
        Shared data folder (default ``$ESC_SHARED``, else ``<repo>/../shared``).
    n_calib : int, optional
        Number of calibration clips (default: ``calib="transcribed"``: half
        of the 18, i.e. 9; ``calib="librispeech"``: 100).
    seed : int
        Seed of the split / of the choice of LibriSpeech utterances.
    objective : str
        ``"wer"``: greedy WER (fraction) on the calibration clips;
        ``"ce"``: mean teacher-forced token cross-entropy (nats) of the
        reference tokens on the calibration clips (one decoder pass,
        smooth); ``"wer+ce"`` (default): ``wer + 0.01 * ce``. With
        ``calib="librispeech"`` the references are the FP32 transcripts.
    batch_size : int, optional
        Clips per encoder/decoder batch (default 9 for ``"transcribed"``;
        for ``"librispeech"`` 50 on CUDA, 25 on the CPU).
    max_new_tokens : int
        Greedy decoding cap per clip on the evaluation clips (and on the
        calibration clips with ``"transcribed"``).
    decode_threads : int, optional
        Torch threads during greedy decoding (None: unchanged). 1 helps a
        lot when other processes share the CPU (see :mod:`.decoding`).
    calib : str
        ``"transcribed"`` (default): calibrate and evaluate on a split of the
        18 transcribed clips; ``"librispeech"``: calibrate on LibriSpeech
        utterances against the FP32 model's transcripts, evaluate on all 18
        transcribed clips (see the module docstring).
    device : str
        ``"cpu"`` (default) or ``"cuda"`` / ``"cuda:N"``: where the model,
        the features and the decoding live.

    Returns
    -------
    Task
        metric ``"wer"`` (percent, lower is better).
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if calib not in CALIB_SOURCES:
        raise ConfigError(f"calib must be one of {CALIB_SOURCES}, got {calib!r}")
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = 9 if calib == "transcribed" else (50 if dev.type == "cuda" else 25)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    root = resolve_shared_root(shared_root)
    mdir = root / "models" / "whisper-tiny.en"
    model, fe, tok = load_whisper(root, dev)
    clips = load_clips(root)
    timings = {}

    def prep(cs):
        targets = [tok.encode(target_text(c["ref"]), add_special_tokens=False) for c in cs]
        return log_mel(fe, [c["wav"] for c in cs], dev), targets, [c["ref"] for c in cs]

    # Cached once: log-mel features, reference token ids, reference strings.
    t0 = time.perf_counter()
    if calib == "transcribed":
        calib_items, evalc = split_clips(clips, n_calib, seed)
        x_cal, t_cal, r_cal = prep(calib_items)
        calib_max_tokens = max_new_tokens
    else:
        calib_items, evalc = select_librispeech(root, 100 if n_calib is None else n_calib, seed), clips
        x_cal = log_mel(fe, [u["wav"] for u in calib_items], dev)
    x_ev, t_ev, r_ev = prep(evalc)
    timings["features_s"] = time.perf_counter() - t0
    pseudo = {}
    if calib == "librispeech":
        # The references are the FP32 model's own greedy transcripts (tokens
        # for the teacher-forced CE, text for the WER): label-free agreement.
        t0 = time.perf_counter()
        t_cal, r_cal, calib_max_tokens, pseudo = fp32_pseudo_labels(
            model, tok, x_cal, batch_size, decode_threads, root / "data" / LIBRISPEECH_DIR)
        timings["pseudo_labels_s"] = time.perf_counter() - t0

    forward_loop, objective_fn, evaluate = task_functions(
        tok, (x_cal, t_cal, r_cal), (x_ev, t_ev, r_ev), objective, batch_size, decode_threads,
        calib_max_tokens, max_new_tokens)

    if calib == "transcribed":
        data = [str(root / "data" / "sb_samples"), str(root / "data" / "ljspeech")]
        split = ("clips grouped by speaker (spk1, spk2, LJ), each group sorted then shuffled with seed, "
                 "interleaved round-robin; first n_calib -> calibration, rest -> evaluation "
                 "(clip-disjoint, not speaker-disjoint: only 3 speakers)")
    else:
        data = [str(root / "data" / LIBRISPEECH_DIR), str(root / "data" / "sb_samples"),
                str(root / "data" / "ljspeech")]
        split = ("calibration: first n_calib LibriSpeech test-other utterances in speaker round-robin order "
                 "(each speaker's sorted ids shuffled with seed), references = FP32 greedy transcripts; "
                 "evaluation: all 18 transcribed clips (SpeechBrain samples + LJSpeech) with true references; "
                 "disjoint in clips and speakers")
    info = {
        "model": str(mdir),
        "data": data,
        "calib": calib,
        "split": split,
        "seed": seed,
        "n_calib": len(calib_items),
        "n_eval": len(evalc),
        "calib_ids": [c["id"] for c in calib_items],
        "eval_ids": [c["id"] for c in evalc],
        "calib_speakers": sorted({c["speaker"] for c in calib_items}),
        "eval_speakers": sorted({c["speaker"] for c in evalc}),
        "objective": objective,
        "decoding": f"greedy, KV cache, prompt [{SOT}, {NO_TIMESTAMPS}], eos {EOS}, max {max_new_tokens} tokens "
                    f"(evaluation), {calib_max_tokens} (calibration)",
        "wer": "corpus WER (esc_plugin.metrics.text.word_error_rate: lowercase, punctuation stripped, "
               "whitespace collapsed)",
        "refs": {"calib": list(r_cal), "eval": list(r_ev)},
        "decode_threads": decode_threads,
        "device": str(dev),
        "batch_size": batch_size,
        "build_timings": timings,
        "notes": "spk2_snt5 and spk2_snt3 references do not match their audio (kept as shipped)",
    }
    if pseudo:
        info["pseudo_labels"] = pseudo
    return Task(
        name="whisper-tiny-en" if calib == "transcribed" else "whisper-tiny-en-librispeech-calib",
        model=model,
        forward_loop=forward_loop,
        objective=objective_fn,
        evaluate=evaluate,
        metric="wer",
        higher_is_better=False,
        info=info,
    )
