"""The integration-neutral copy / rebind helpers (esc_plugin.binding) and the import graph of
esc_plugin.nemo: every module imports on its own in a fresh process, and the module-level
imports between its modules form no circle."""
import ast
import copy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from esc_plugin import binding

REPO = Path(__file__).resolve().parents[1]
NEMO_PKG = REPO / "esc_plugin" / "nemo"


def test_binding_imports_no_toolkit():
    code = ("import sys, esc_plugin.binding; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'speechbrain', 'nemo', 'lightning'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", sorted(p.stem for p in NEMO_PKG.glob("*.py")))
def test_each_nemo_module_imports_alone(module):
    name = "esc_plugin.nemo" + ("" if module == "__init__" else "." + module)
    run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]


def _sibling_imports(path):
    """Modules of esc_plugin.nemo imported at module level (not inside functions) by ``path``."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found


def test_nemo_module_level_imports_have_no_circle():
    graph = {p.stem: _sibling_imports(p) for p in NEMO_PKG.glob("*.py") if p.stem != "__init__"}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import circle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
    assert graph["model"] <= {"errors"}  # the quantized class is the bottom layer
    assert "quantize" not in graph["save_restore"] | graph["export"]


def test_old_import_paths_still_work():
    from esc_plugin.nemo._modules import evaluation_mode, rebind_copied_forwards, without_training_state
    from esc_plugin.nemo.quantize import QuantizedASRModel, is_quantized_asr_model
    from esc_plugin.speechbrain.binding import bound_modules, module_map
    from esc_plugin.nemo.model import QuantizedASRModel as Model
    assert QuantizedASRModel is Model and bound_modules is binding.bound_modules
    assert evaluation_mode is binding.evaluation_mode and module_map is binding.module_map
    assert rebind_copied_forwards is binding.rebind_copied_forwards
    assert callable(without_training_state) and callable(is_quantized_asr_model)


def test_bound_modules_repoints_dict_hparams_and_restores_on_error():
    mods = torch.nn.ModuleDict({"enc": torch.nn.Sequential(torch.nn.Linear(2, 2))})
    owner = types.SimpleNamespace(mods=mods, hparams={"inner": mods["enc"][0], "other": 3})
    other = copy.deepcopy(mods)
    with pytest.raises(RuntimeError):
        with binding.bound_modules(owner, other, attr="mods"):
            assert owner.hparams["inner"] is other["enc"][0] and owner.mods is other
            raise RuntimeError
    assert owner.hparams["inner"] is mods["enc"][0] and owner.mods is mods


def test_detached_attributes_removes_instrumentation_for_the_copy():
    class Model(torch.nn.Linear):
        def training_step(self):
            return "class"

    m = Model(2, 2)
    m.__dict__["training_step"] = lambda: "wrapped"  # what telemetry installs on the instance
    m.__dict__["_trainer"] = object()
    with binding.detached_attributes(m, ["_trainer"]):
        c = copy.deepcopy(m)
    assert c.training_step() == "class" and c.__dict__["_trainer"] is None
    assert m.training_step() == "wrapped" and m.__dict__["_trainer"] is not None
