"""Atomic file writes: a crash never leaves a half-written report or checkpoint."""
import json
import os
import tempfile

import torch


def _atomic(path, write):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path, data):
    _atomic(path, lambda f: f.write(data))


def write_json(path, obj):
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def torch_save(path, obj):
    _atomic(path, lambda f: torch.save(obj, f))
