"""ASR task: Whisper tiny.en (Hugging Face transformers) on the shared clips.

``get_task("whisper")`` / :func:`build_whisper_task`. The package re-exports
every public name of its modules, so ``from esc_plugin.tasks.whisper import X``
works for all of them:

* :mod:`.data`: the transcribed clips, the LibriSpeech utterances, the
  speaker round-robin split, the teacher-forcing target text;
* :mod:`.model`: loading the model from the shared folder, device, log-mel;
* :mod:`.decoding`: batched greedy decoding with a KV cache, teacher-forced CE;
* :mod:`.objectives`: forward loop, objective, evaluation, FP32 pseudo-labels;
* :mod:`.task`: :func:`build_whisper_task`, the two calibration schemes;
* ``python -m esc_plugin.tasks.whisper`` (:mod:`.__main__`): FP32 check.
"""
from .data import (LIBRISPEECH_DIR, LJ_IDS, SAMPLE_RATE, list_librispeech, load_clips, select_librispeech,
                   speaker_round_robin, split_clips, target_text)
from .decoding import (EOS, FIRST_SPECIAL, NO_TIMESTAMPS, SOT, _suppress_mask, greedy_decode, teacher_forced_ce,
                       transcribe, transcribe_tokens)
from .model import _model_device, load_whisper, log_mel, resolve_device
from .objectives import (CALIB_TOKEN_MARGIN, OBJECTIVES, PSEUDO_LABEL_MAX_TOKENS, fp32_pseudo_labels,
                         task_functions)
from .task import CALIB_SOURCES, build_whisper_task

__all__ = [
    "SAMPLE_RATE", "LJ_IDS", "LIBRISPEECH_DIR", "load_clips", "speaker_round_robin", "split_clips",
    "list_librispeech", "select_librispeech", "target_text",
    "SOT", "NO_TIMESTAMPS", "EOS", "FIRST_SPECIAL", "greedy_decode", "teacher_forced_ce", "transcribe",
    "transcribe_tokens",
    "resolve_device", "load_whisper", "log_mel",
    "OBJECTIVES", "PSEUDO_LABEL_MAX_TOKENS", "CALIB_TOKEN_MARGIN", "fp32_pseudo_labels", "task_functions",
    "CALIB_SOURCES", "build_whisper_task",
]
