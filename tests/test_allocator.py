"""keep_freed_memory: glibc malloc settings for processes esc_plugin owns (Ray actors, the CLI), and
``QuantConfig(keep_freed_memory=True)`` for a caller's own process.

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


# esc.quantize in a fresh process, the option on or off: the report's note, and whether the settings ran
QUANTIZE = """
import sys
import torch
import esc_plugin as esc
from esc_plugin.core import allocator
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
x = torch.randn(16, 8)
q = esc.quantize(model, esc.QuantConfig(method="max", keep_freed_memory=sys.argv[1] == "on"),
                 forward_loop=lambda m: m(x), progress=False)
notes = [n for n in q.esc_report.notes if n.startswith("keep_freed_memory")]
print(allocator._applied, "|".join(notes) or "no-note")
"""


def _run(extra_env=None, code=PROBE, args=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(maxsplit=1) if code is QUANTIZE else out.stdout.split()


def test_applied_once_per_process_on_glibc():
    assert _run() == ["True", "True"]


def test_the_users_own_malloc_tuning_wins():
    assert _run({"MALLOC_TOP_PAD_": "0"}) == ["False", "False"]


def test_quantize_keeps_freed_memory_only_when_asked_and_says_so_in_the_report():
    applied, note = _run(code=QUANTIZE, args=["on"])
    assert applied == "True" and note.strip() == ("keep_freed_memory: in effect in this process "
                                                  "(glibc malloc keeps freed heap memory)")
    assert _run(code=QUANTIZE, args=["off"]) == ["None", "no-note\n"]  # the caller's process left as it was
    applied, note = _run({"MALLOC_TRIM_THRESHOLD_": "0"}, code=QUANTIZE, args=["on"])
    assert applied == "False" and "not applied" in note and "MALLOC_TRIM_THRESHOLD_" in note


def test_keep_freed_memory_must_be_a_bool_and_does_not_change_the_checkpoint_fingerprint():
    from esc_plugin import ConfigError, QuantConfig
    from esc_plugin.core.search_driver import NOT_IN_FINGERPRINT

    with pytest.raises(ConfigError, match="keep_freed_memory='yes' must be true or false"):
        QuantConfig(keep_freed_memory="yes")
    assert "keep_freed_memory" in NOT_IN_FINGERPRINT  # a run may resume with it on or off: same scales


def test_the_speechbrain_stage_passes_it_and_the_projects_recipes_set_it(tmp_path):
    import pathlib
    import re

    from esc_plugin.speechbrain.settings import read_settings

    settings = read_settings({"quantize": "esc", "output_folder": str(tmp_path),
                              "quantization": {"bits": 8, "keep_freed_memory": True}})
    assert settings.config.keep_freed_memory is True
    recipes = sorted((pathlib.Path(__file__).parents[1] / "recipes").glob("*/*/*/hparams/*.yaml"))
    assert recipes
    for path in recipes:  # the quantization block's text: loading a recipe's yaml builds its modules
        text = path.read_text()
        block = text[text.index("\nquantization:\n"):].split("\n\n")[0]
        assert re.search(r"^    keep_freed_memory: true\b", block, re.M), path
