"""Keep the stage's files away from the FP32 run's: the output-layout check and the redirection.

The stage writes ``quantized.pt``, ``checkpoint/`` (a ``Checkpointer`` that
keeps one checkpoint, so it *deletes* any other checkpoint in that folder),
``report.json``, the plots, ``metrics.json``, ``log.txt`` and the test-time
outputs of the recipe (``wer_file``…). A folder that holds, or is, any file of
the FP32 run is refused before any work; during the quantized evaluation, the
recipe's loggers and output files are pointed into the stage's folder.

Example
-------
>>> import types
>>> hp = {"output_folder": "results/run", "wer_file": "results/run/wer.txt"}
>>> brain = types.SimpleNamespace(checkpointer=None, hparams=types.SimpleNamespace(**hp))
>>> unsafe_reason(brain, hp, "results/run/quantized/esc_w8a8") is None
True
>>> unsafe_reason(brain, hp, "results/run")
"it holds the FP32 run's output_folder 'results/run'"
"""
import os

from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.train_logger import FileTrainLogger, TrainLogger

from ..core.errors import ConfigError

LOG_FILE = "log.txt"


class CapturingLogger(FileTrainLogger):
    """A ``FileTrainLogger`` that also keeps the last ``test_stats`` it was given: SpeechBrain's
    templates log their test metrics without keeping them on the Brain."""

    def __init__(self, save_file, precision=2):
        super().__init__(save_file, precision)
        self.test_stats = None

    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=False):
        if test_stats is not None:
            self.test_stats = dict(test_stats)
        super().log_stats(stats_meta, train_stats, valid_stats, test_stats, verbose)


def _store(brain, hparams):
    """hparams entries from both views (the recipe's dict and ``brain.hparams``)."""
    items = dict(hparams or {})
    hp = getattr(brain, "hparams", None)
    if hp is not None and hasattr(hp, "__dict__"):
        items.update(vars(hp))
    return items


def _under(path, folder):
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return a == b or a.startswith(b + os.sep)


def fp32_paths(brain, hparams):
    """``[(what, path)]``: the FP32 run's output folder, checkpoint folders, log files, and
    every hparams path that exists or names a file under the output folder."""
    items = _store(brain, hparams)
    out = items.get("output_folder")
    found = [("output_folder", str(out))] if out else []
    ckpts = [getattr(brain, "checkpointer", None)] + [v for v in items.values() if isinstance(v, Checkpointer)]
    found += [("checkpoint folder", str(c.checkpoints_dir)) for c in ckpts if c is not None]
    for key, value in items.items():
        if isinstance(value, TrainLogger):
            found += [(key, str(getattr(value, a))) for a in ("save_file", "save_dir")
                      if getattr(value, a, None)]
        elif isinstance(value, (str, os.PathLike)) and key != "output_folder":
            path = os.fspath(value)
            if os.path.exists(path) or (out and os.path.splitext(path)[1] and _under(path, out)):
                found.append((key, path))
    return found


def unsafe_reason(brain, hparams, folder):
    """Why writing the stage's files into ``folder`` could touch an FP32 file, or ``None``."""
    for what, path in fp32_paths(brain, hparams):
        folders = what in ("output_folder", "checkpoint folder")
        if what == "checkpoint folder" and _under(folder, path):
            return f"it is inside the FP32 checkpoint folder {path!r}"
        if not folders and os.path.realpath(path) == os.path.realpath(folder) and not os.path.isfile(path):
            continue  # an hparams entry naming the stage's own folder refers to it: not an FP32 file
        if _under(path, folder):
            return f"it holds the FP32 run's {what if folders else 'file ' + what} {path!r}"
    return None


def check_output_folder(brain, hparams, settings):
    """Refuse, before any work, an output folder that holds or is inside an FP32 file or folder;
    the error names a safe one."""
    reason = unsafe_reason(brain, hparams, settings.output_folder)
    if reason is None:
        return
    out = _store(brain, hparams).get("output_folder")
    candidates = [settings.default_folder, os.path.join(settings.output_folder, "quantized", settings.tag)]
    if out:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(str(out))),
                                       os.path.basename(os.path.abspath(str(out))) + "_quantized", settings.tag))
    safe = next((c for c in candidates if c and unsafe_reason(brain, hparams, c) is None), None)
    raise ConfigError(
        f"quantization: output_folder {settings.output_folder!r} is not safe: {reason}, and the stage "
        "writes quantized.pt, checkpoint/ (keeping one checkpoint, i.e. deleting others), log.txt and "
        "the test outputs there. " + (f"Use `quantization: {{output_folder: {safe}}}` (or leave it unset "
                                      f"for the default)." if safe else "Choose a folder of its own."))


def redirect_outputs(brain, folder):
    """Point the recipe's loggers and the output files it names under ``output_folder`` into
    ``folder`` (same relative paths); returns ``(saved entries, capturing logger)``."""
    hp = vars(brain.hparams) if hasattr(brain.hparams, "__dict__") else {}
    out = str(hp.get("output_folder", "")) or None
    saved, logger = {}, None
    for key, value in list(hp.items()):
        if isinstance(value, TrainLogger):
            logger = logger or CapturingLogger(os.path.join(folder, LOG_FILE))
            saved[key], hp[key] = value, logger
        elif (isinstance(value, str) and out and os.path.splitext(value)[1] and _under(value, out)
              and not _under(value, folder)):
            target = os.path.join(folder, os.path.relpath(os.path.realpath(value), os.path.realpath(out)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            saved[key], hp[key] = value, target
    os.makedirs(folder, exist_ok=True)
    return saved, logger


def restore_outputs(brain, saved):
    vars(brain.hparams).update(saved)
