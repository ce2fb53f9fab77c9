"""keep_freed_memory: glibc malloc settings for processes esc_plugin owns (Ray actors, the CLI).

Each case runs in a fresh interpreter: the settings are per process and cannot be undone.
"""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

PROBE = """
import torch
from esc_plugin.core.allocator import keep_freed_memory
first, again = keep_freed_memory(), keep_freed_memory()
x = torch.randn(64, 19, 101, 40)  # ~20 MB activations, allocated and freed as in a forward
for _ in range(3):
    y = torch.relu(x); del y
print(first, again)
"""


def _run(extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_applied_once_per_process_on_glibc():
    assert _run() == ["True", "True"]


def test_the_users_own_malloc_tuning_wins():
    assert _run({"MALLOC_TOP_PAD_": "0"}) == ["False", "False"]
