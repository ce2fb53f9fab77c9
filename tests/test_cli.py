"""The ``esc-quantize`` CLI, in-process: bad input fails at once (before the task
is built), and a run records what it really did (calibration set, provenance,
evaluation count)."""
import json
import re
import sys
import textwrap

import pytest

from conftest import fails_fast
from esc_plugin import cli
from esc_plugin.core.presets import preset_names
from esc_plugin.core.registry import transform_names

# Load the registries (their built-ins import torch and modelopt, seconds) before the timed calls:
# what is timed is the CLI's own checking, which must come before any task building.
transform_names()

TOY_TASK = textwrap.dedent('''
    import torch
    from esc_plugin.tasks import Task

    BUILT = []

    def _task(n):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
        data = [torch.randn(4, 8) for _ in range(2)]
        ref = [model(x).detach() for x in data]

        def err(m):
            with torch.no_grad():
                return float(sum((m(x) - r).pow(2).mean() for x, r in zip(data, ref)))

        return Task(name="toy", model=model, forward_loop=lambda m: [m(x) for x in data], objective=err,
                    evaluate=lambda m: {"err": err(m)}, metric="err", higher_is_better=False,
                    info={"n_calib": n})

    def build_fixed():
        BUILT.append({})
        return _task(8)

    def build_sized(n_calib=8):
        BUILT.append({"n_calib": n_calib})
        return _task(n_calib)
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_cli_task.py").write_text(TOY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_cli_task", None)
    import toy_cli_task

    return toy_cli_task


@pytest.fixture
def no_task_building(monkeypatch):
    """Fail the test if the CLI gets as far as building a task."""
    import esc_plugin.tasks

    def refuse(*a, **k):
        raise AssertionError("the task was built before the bad input was reported")

    monkeypatch.setattr(esc_plugin.tasks, "get_task", refuse)




@pytest.mark.parametrize("argv, match", [
    (["run", "--task", "demo", "--budget", "0"], r"budget=0 must be >= 1"),
    (["run", "--task", "demo", "--n-samples", "0"], r"n_samples=0 must be >= 1"),
    (["run", "--task", "demo", "--sigma0", "-1"], r"sigma0"),
    (["run", "--task", "demo", "--popsize", "1"], r"popsize=1"),
    (["demo", "--budget", "0"], r"budget=0"),
    (["demo", "--methods", "max", "esc_initbest", "--seed", "-3"], r"seed=-3"),
    (["run", "--task", "no_such_task"], r"--task 'no_such_task' is unknown"),
    (["run", "--task", "no_such_module_xyz:build"], r"cannot load no_such_module_xyz:build"),
    (["run", "--task", "demo", "--method", "esc+best"], r"invalid choice"),
])
def test_bad_input_fails_before_the_task_is_built(argv, match, capsys, no_task_building):
    fails_fast(argv, capsys, match)


def test_unwritable_out_is_named_before_any_work(tmp_path, capsys, no_task_building):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for sub in (["run", "--task", "demo"], ["demo"]):
        err = fails_fast(sub + ["--out", str(blocker / "out")], capsys, r"--out .* is not a writable folder")
        assert str(blocker / "out") in err
    err = fails_fast(["run", "--task", "demo", "--checkpoint", str(blocker / "cma.ckpt")], capsys,
                     r"--checkpoint's folder .* is not a writable folder")
    assert str(blocker) in err


def test_n_samples_and_shared_only_go_to_tasks_that_take_them(toy, capsys):
    fails_fast(["run", "--task", "toy_cli_task:build_fixed", "--n-samples", "5"], capsys,
               r"--n-samples: task 'toy_cli_task:build_fixed' has its own calibration set")
    fails_fast(["run", "--task", "toy_cli_task:build_fixed", "--shared", "/nowhere"], capsys,
               r"--shared: .* reads no shared data folder")
    assert toy.BUILT == []


def test_run_records_the_task_calibration_set_and_provenance(toy, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--task", "toy_cli_task:build_fixed", "--method", "esc", "--budget", "6", "--no-progress",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "the task's own calibration set (8 samples)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["n_samples"] == 8 and report["config"]["budget"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == "esc"
    prov = metrics["provenance"]
    assert prov["command"] == ["esc-quantize", *argv]
    assert prov["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
    assert prov["dirty"] in (True, False, None)


def test_run_passes_n_samples_to_a_builder_that_takes_it(toy, tmp_path, capsys):
    argv = ["run", "--task", "toy_cli_task:build_sized", "--method", "esc_initbest", "--budget", "4",
            "--n-samples", "5", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert toy.BUILT == [{"n_calib": 5}]
    assert "esc_initbest" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "report.json").read_text())["config"]
    assert config["n_samples"] == 5 and config["method"] == "esc" and config["init"] == "best"


def test_choices_come_from_the_presets():
    text = cli.build_parser().format_help()
    for name in preset_names():
        assert name in text
    assert "esc_initbest" in preset_names()


def test_provenance_is_dirty_for_code_changes_not_for_results(tmp_path, monkeypatch):
    import subprocess

    from esc_plugin import runner

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("| row |\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    monkeypatch.setattr(runner, "_REPO", str(tmp_path))
    assert runner.provenance(["x"])["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("| row |\n| 1 |\n")
    assert runner.provenance(["x"])["dirty"] is False  # a table being filled is not a code change
    (tmp_path / "code.py").write_text("a = 2\n")
    assert runner.provenance(["x"])["dirty"] is True
