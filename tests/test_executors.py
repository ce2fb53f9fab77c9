"""Scaling out the ESC search: the Ray executor and population batching (issue #12).

Real honk model and Speech Commands audio, a real local Ray runtime (2 CPUs)
and real actor processes (one is killed with SIGKILL); no mocks.
"""
import os
import platform
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import esc_plugin as esc
from esc_plugin.core.batching import BatchingError
from esc_plugin.core.errors import CalibrationError, ConfigError, ObjectiveError

ray = pytest.importorskip("ray")

# 3 generations: enough to diverge if anything differs; the start is the output-MSE init alone, so the
# driver makes exactly one objective call before the search (the call counts below rely on it)
SEARCH = dict(bits=8, budget=18, popsize=6, init="output_mse")


@pytest.fixture(scope="module")
def honk():
    from conftest import honk_task

    return honk_task()


@pytest.fixture(scope="module")
def undisturbed(honk):
    """The serial run the fault tests must reproduce (no selection guard: their objectives do not split)."""
    return _search(honk, selection_split=None)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the objectives below live in this test module, which the actors cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    from esc_plugin.core.executors.ray_actors import release_workers

    release_workers()
    ray.shutdown()


def _search(task, objective=None, **options):
    q = esc.quantize(task.model, esc.QuantConfig(**{**SEARCH, **options}), task.forward_loop,
                     objective if objective is not None else task.objective, progress=False)
    r = q.esc_report
    return np.array([layer.final for layer in r.layers]), [(h["loss"], h.get("selection")) for h in r.history]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("options, message", [
    ({"executor": "dask"}, "executor='dask': use one of 'ray', 'serial'"),
    ({"workers": 2}, "workers=2 needs executor='ray'"),
    ({"executor": "ray", "workers": 0}, "workers=0 must be >= 1"),
    ({"num_gpus_per_worker": 1}, "num_gpus_per_worker=1 needs executor='ray'"),
    ({"executor": "ray", "num_gpus_per_worker": -1}, "num_gpus_per_worker=-1 (int) must be a number >= 0"),
    ({"batch_candidates": 0}, "batch_candidates=0 must be >= 1"),
])
def test_execution_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        esc.QuantConfig(**options)


# ------------------------------------------------------------------ population batching


def test_batching_gives_the_scales_of_one_by_one_on_honk(honk):
    one_by_one = _search(honk)
    scales, history = _search(honk, batch_candidates=4)  # groups of 4 and 2 per generation
    assert np.array_equal(scales, one_by_one[0])
    assert history == one_by_one[1]


class TimeMajorNet(nn.Module):
    """Batch-first input, time-major Linear layers inside (their inputs are (T, B, D))."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x.transpose(0, 1)))
        return self.out(h).transpose(0, 1)


def test_batching_label_free_on_a_transformer():  # nn.MultiheadAttention runs time-major inside
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4)).eval()
    data = [torch.randn(5, 10, 8) * torch.linspace(0.1, 8, 8) for _ in range(2)]

    def loop(m):
        for x in data:
            m(x)

    def run(**kw):
        q = esc.quantize(model, esc.QuantConfig(bits=8, budget=12, popsize=4, **kw), loop, progress=False)
        return np.array([la.final for la in q.esc_report.layers]), [h["loss"] for h in q.esc_report.history]

    single, batched = run(), run(batch_candidates=4)
    assert np.array_equal(batched[0], single[0]) and batched[1] == single[1]


def _single_and_batched(model, data, k):
    def loop(m):
        for x in data:
            m(x)

    def run(**kw):
        q = esc.quantize(model, esc.QuantConfig(bits=8, budget=2 * k, popsize=k, init="output_mse", **kw), loop,
                         progress=False)
        return np.array([la.final for la in q.esc_report.layers]), [h["loss"] for h in q.esc_report.history]

    return run(), run(batch_candidates=k)


@pytest.mark.parametrize("k", [3, 5])
def test_batching_finds_the_rows_of_a_time_major_module(k):
    """Linear layers applied to (T, B, D) inside a batch-first model (as SpeechBrain's feed-forward
    modules are): the tiled batch is found in dim 1, so candidates' rows are not mixed."""
    torch.manual_seed(0)
    single, batched = _single_and_batched(TimeMajorNet().eval(), [torch.randn(4, 10, 8) * 3], k)
    assert np.array_equal(batched[0], single[0]) and batched[1] == single[1]


class AcrossBatchNet(TimeMajorNet):
    """Mixes the rows of the batch (centres over it, or pools it away before a quantized op)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h.mean(0)) if self.pool else self.out(h - h.mean(0, keepdim=True))


def test_batching_refuses_a_model_that_mixes_candidates():
    torch.manual_seed(0)
    data = [torch.randn(4, 10, 8) * 3]

    def loop(m):
        m(data[0])

    with pytest.raises(CalibrationError, match="batch_candidates=5"):  # shapes fit; the check sees the mixing
        esc.quantize(AcrossBatchNet(pool=False).eval(), esc.QuantConfig(budget=10, popsize=5, batch_candidates=5),
                     loop, progress=False)
    with pytest.raises(CalibrationError, match="does not hold 3 candidates"):
        esc.quantize(AcrossBatchNet(pool=True).eval(), esc.QuantConfig(budget=6, popsize=3, batch_candidates=3),
                     loop, progress=False)


def test_batching_needs_an_objective_that_declares_it(honk):
    def plain(m):
        return honk.objective(m)

    with pytest.raises(ConfigError, match="supports_candidate_batching = True"):
        _search(honk, objective=plain, batch_candidates=4)



def test_batching_refuses_an_objective_feeding_outputs_back():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))

    def autoregressive(m):  # the second call's input is computed from the first call's output
        first = m(x)
        return float(m(x + first.mean()).sum())

    autoregressive.supports_candidate_batching = True
    with pytest.raises(BatchingError, match="other inputs for candidate 2"):
        esc.quantize(model, esc.QuantConfig(budget=6, popsize=3, batch_candidates=3), lambda m: m(x),
                     autoregressive, progress=False)


# ------------------------------------------------------------------ Ray executor


def test_ray_workers_give_the_serial_scales_and_history(honk, ray_runtime):
    serial = _search(honk)
    for workers in (1, 2):
        scales, history = _search(honk, executor="ray", workers=workers)
        assert np.array_equal(scales, serial[0]), workers
        assert history == serial[1], workers
    scales, history = _search(honk, executor="ray", workers=2, batch_candidates=3)
    assert np.array_equal(scales, serial[0]) and history == serial[1]
    # the actors' processes kept freed memory (see core/allocator.py), with the same answer
    from esc_plugin.core.executors import ray_actors

    idle = [actor for pool in ray_actors._IDLE.values() for _, actor in pool]
    assert idle and ray.get([a.allocator.remote() for a in idle]) == [platform.libc_ver()[0] == "glibc"] * len(idle)


class StallOnce:
    """The task objective; the first actor to reach its ``nth`` call writes its pid and stalls
    (until the test kills it). Values are the task objective's."""

    def __init__(self, objective, claim, nth):
        self.objective, self.claim, self.nth, self.calls = objective, str(claim), nth, 0

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.nth:
            try:
                fd = os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(120)
        return self.objective(model)


def test_a_killed_worker_costs_only_its_candidates(honk, ray_runtime, undisturbed, tmp_path):
    claim = tmp_path / "stalled.pid"
    killed = []

    def killer():
        for _ in range(1200):
            if claim.exists() and claim.read_text():
                pid = int(claim.read_text())
                if pid == os.getpid():  # the stalling call ran in the driver: never kill the test itself
                    return
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    scales, history = _search(honk, objective=StallOnce(honk.objective, claim, nth=4), executor="ray", workers=2,
                              selection_split=None)
    thread.join(timeout=1)
    assert killed, "no actor reached the stalling call"
    assert np.array_equal(scales, undisturbed[0])
    assert history == undisturbed[1]


class FailAt:
    """The task objective, raising on its ``nth`` call while ``armed`` exists. The call count travels
    with the object: an actor's copy continues from the driver's count (the init's evaluation)."""

    def __init__(self, objective, nth, armed):
        self.objective, self.nth, self.armed, self.calls = objective, nth, str(armed), 0

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.nth and os.path.exists(self.armed):
            raise RuntimeError("decoder out of memory")
        return self.objective(model)


def test_worker_errors_and_driver_crash_resume(honk, ray_runtime, undisturbed, tmp_path):
    armed = tmp_path / "armed"
    armed.touch()
    # call 1 is the init (in the driver), call 9 the 8th candidate (2nd generation)
    with pytest.raises(ObjectiveError) as serial_error:
        _search(honk, objective=FailAt(honk.objective, 9, armed), selection_split=None)
    ckpt = tmp_path / "cma.ckpt"
    with pytest.raises(ObjectiveError) as ray_error:
        _search(honk, objective=FailAt(honk.objective, 9, armed), executor="ray", selection_split=None,
                checkpoint=str(ckpt))
    assert str(ray_error.value) == str(serial_error.value)
    assert "RuntimeError: decoder out of memory (evaluation 9)" in str(ray_error.value)
    # the run stopped in generation 2: its checkpoint holds generation 1; resuming on 2 actors ends
    # with the undisturbed run's scales
    armed.unlink()
    scales, history = _search(honk, executor="ray", workers=2, selection_split=None, checkpoint=str(ckpt))
    assert np.array_equal(scales, undisturbed[0])
    assert history == undisturbed[1]


def test_an_objective_that_cannot_be_pickled_names_the_fix(honk, ray_runtime):
    lock = threading.Lock()

    def objective(m):
        with lock:
            return honk.objective(m)

    with pytest.raises(ConfigError, match="(?s)cannot be pickled.*executor='serial'"):
        _search(honk, objective=objective, executor="ray", selection_split=None)


# ------------------------------------------------------------------ SpeechBrain stage


def test_speechbrain_stage_passes_the_options_and_names_unpicklable_recipe_objects(tmp_path):
    from test_speechbrain_stage import make_data, train

    from esc_plugin.speechbrain import quantize_brain
    from esc_plugin.speechbrain.settings import read_settings

    brain, hparams, _, out = train(tmp_path, "save")
    hparams.update(quantize="esc", quantization={"bits": 8, "budget": 6, "n_samples": 24,
                                                 "executor": "ray", "workers": 2, "batch_candidates": 3})
    config = read_settings(hparams).config
    assert (config.executor, config.workers, config.batch_candidates) == ("ray", 2, 3)
    # this Brain keeps a dataloader iterator from fit(): refused before any work, naming the path to it
    with pytest.raises(ConfigError, match="(?s)cannot be pickled.*brain.*executor='serial'"):
        quantize_brain(brain, hparams, calib_set=make_data(30, 4), loader_kwargs={"batch_size": 8}, progress=False)
    assert not (out / "quantized").exists()
