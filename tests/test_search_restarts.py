"""IPOP restarts inside the fixed budget Γ (QuantConfig(restarts=k))."""
import numpy as np
import pytest
import torch
from torch import nn

import esc_plugin as esc
from esc_plugin.core.errors import ConfigError
from esc_plugin.core.search import ScaleSearch


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.fc(x))))


@pytest.fixture(scope="module")
def kws():
    from conftest import loop_and_output_error

    torch.manual_seed(0)
    model = _Net().eval()
    data = [torch.randn(4, 12) * torch.linspace(0.1, 20, 12) for _ in range(3)]
    loop, objective = loop_and_output_error(model, data)
    return model, loop, objective


def _sphere(cands, target=0.3):
    return [float(np.sum((np.log(c) - target) ** 2)) for c in cands]


def _run(search, record=None):
    while not search.done:
        c = search.ask()
        losses = _sphere(c)
        if record is not None:
            record.append((c, losses))
        search.tell(c, losses)
    return search


def test_restart_spends_exactly_the_budget_with_a_doubled_population():
    s = _run(ScaleSearch(np.ones(6), 0.1, budget=60, popsize=6, seed=2, restarts=1))
    assert s.evaluations == 60 and s.run == 1
    runs = np.array([h["run"] for h in s.history])
    assert (runs == 0).sum() == 20 and (runs == 1).sum() == 40  # shares proportional to λ·2^r
    assert s.es.popsize == 12


def test_restart_starts_from_the_best_sample_so_far():
    s = ScaleSearch(np.ones(4), 0.1, budget=30, popsize=5, seed=0, restarts=1)
    while s.run == 0:
        c = s.ask()
        s.tell(c, _sphere(c))
    np.testing.assert_allclose(s._to_amax(np.asarray(s.es.mean)), s.best_amax, rtol=1e-12)


def test_no_restart_is_the_single_run():
    a = _run(ScaleSearch(np.ones(5), 0.1, budget=24, popsize=6, seed=3))
    b = _run(ScaleSearch(np.ones(5), 0.1, budget=24, popsize=6, seed=3, restarts=0))
    np.testing.assert_array_equal(a.mean_amax(), b.mean_amax())
    assert {h["run"] for h in a.history} == {0}


def test_restarted_search_replays_exactly():
    """What a checkpoint relies on: a new search told the recorded losses gets the same candidates,
    across the restart too, whatever the caller's global RNG does."""
    record = []
    a = _run(ScaleSearch(np.ones(6), 0.1, budget=40, popsize=4, seed=5, restarts=2), record)
    b = ScaleSearch(np.ones(6), 0.1, budget=40, popsize=4, seed=5, restarts=2)
    np.random.seed(7)
    for cands, losses in record:
        assert np.array_equal(np.stack(b.ask()), np.stack(cands))
        b.tell(cands, losses)
    np.testing.assert_array_equal(a.mean_amax(), b.mean_amax())


@pytest.mark.parametrize("space", ["log", "range"])
def test_restarts_through_quantize(kws, space):
    """With restarts the report's history covers Γ, and the guard still picks among the candidates."""
    model, loop, objective = kws
    cfg = esc.QuantConfig(bits=4, budget=24, seed=1, restarts=1, search_space=space)
    q = esc.quantize(model, cfg, loop, objective, progress=False)
    history = q.esc_report.history
    assert len(history) == 24 and {h["run"] for h in history} == {0, 1}
    assert np.isfinite(q.esc_report.objective["chosen"])


def test_bad_restarts_are_refused_before_work():
    with pytest.raises(ConfigError, match="restarts"):
        esc.QuantConfig(restarts=-1)
    with pytest.raises(ConfigError, match="fewer than 2 evaluations"):
        ScaleSearch(np.ones(3), 0.1, budget=4, popsize=2, restarts=3)
