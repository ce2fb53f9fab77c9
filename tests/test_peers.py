"""The peer rows of the benchmarks, on real NNCF (nncf.quantize on torch models, accuracy control via OpenVINO)."""
import json
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


class Net(nn.Module):  # not nn.Sequential: NNCF adds a hook-storage child that Sequential would call
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8 * 10, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_nncf_peer_quantizes_a_copy_on_the_loops_inputs():
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    from peers import captured_inputs, nncf_quantize

    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(5, 4, 10) for _ in range(2)]

    def loop(m):
        for x in data:
            m(x)

    assert [a[0].shape for a in captured_inputs(model, loop)] == [torch.Size([5, 4, 10])] * 2
    q = nncf_quantize(model, loop)
    with torch.no_grad():
        ref, got = model(data[0]), q(data[0])
    assert not torch.equal(ref, got)  # fake-quantized
    assert torch.allclose(ref, got, atol=0.1 * float(ref.abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _EncoderDecoder(nn.Module):
    """Called the way the Whisper task calls its model: submodules with keywords, never the root."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_nncf_peer_quantizes_each_outermost_submodule_the_loop_calls():
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    from peers import captured_calls, nncf_quantize

    torch.manual_seed(0)
    model = _EncoderDecoder().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(5, 6) for _ in range(3)]
    state = {"seen": []}

    def loop(m):
        for x in data:
            h = m.encoder(input=x)
            m.decoder(h)
            state["seen"].append(1)

    calls = captured_calls(model, loop)
    assert sorted(calls) == ["decoder", "encoder"] and len(calls["encoder"]) == 3
    assert set(calls["encoder"][0]) == {"input"}  # positional and keyword calls alike, by parameter name
    q = nncf_quantize(model, loop)
    assert type(q) is _EncoderDecoder and q.encoder is not model.encoder
    with torch.no_grad():
        ref, got = model(data[0]), q(data[0])
    assert not torch.equal(ref, got) and torch.allclose(ref, got, atol=0.1 * float(ref.abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nncf_peer_quantizes_a_speechbrain_sequential_the_loop_calls():
    # SpeechBrain's Sequential is a ModuleDict whose forward runs every child: NNCF's hook storage
    # added as a child was called as a layer ("HookStorage is missing the required forward")
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    from speechbrain.nnet.containers import Sequential
    from speechbrain.nnet.linear import Linear

    from peers import nncf_quantize

    torch.manual_seed(0)
    model = nn.Module()
    model.enc = Sequential(Linear(n_neurons=8, input_size=6), nn.ReLU(), Linear(n_neurons=4, input_size=8))
    model = model.eval()
    data = [torch.randn(5, 6) for _ in range(3)]

    def loop(m):
        for x in data:
            m.enc(x)

    q = nncf_quantize(model, loop)
    with torch.no_grad():
        ref, got = model.enc(data[0]), q.enc(data[0])
    assert q.enc is not model.enc and not torch.equal(ref, got)
    assert torch.allclose(ref, got, atol=0.1 * float(ref.abs().max()))


def test_table_peer_rows_run_at_their_widths_after_the_presets(tmp_path):
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    from peers import PEERS, missing_peer_packages

    from esc_plugin.runner import run_table
    from esc_plugin.tasks import Task

    torch.manual_seed(0)
    model = _EncoderDecoder().eval()
    data = [torch.randn(4, 6) for _ in range(2)]
    ref = [model(x).detach() for x in data]

    def err(m):
        with torch.no_grad():
            return float(sum((m(x) - r).pow(2).mean() for x, r in zip(data, ref)))

    task = Task(name="toy", model=model, forward_loop=lambda m: [m(x) for x in data], objective=err,
                evaluate=lambda m: {"err": err(m)}, metric="err", higher_is_better=False)
    assert missing_peer_packages(PEERS) == ""
    rows = run_table(task, [8, 4], ["max"], str(tmp_path), progress=False, peers={"nncf": PEERS["nncf"]})
    assert [(r["config"], r["method"]) for r in rows] == [("FP32", "-"), ("W8A8", "max"), ("W8A8", "nncf"),
                                                          ("W4A4", "max")]
    nncf_row = rows[2]
    assert 0 < nncf_row["metrics"]["err"] < 0.01 and nncf_row["objective"] == nncf_row["metrics"]["err"]
    assert f"* nncf: {PEERS['nncf'].note}" in (tmp_path / "results.md").read_text()

    # a peer that cannot take the model is a failed row, not the end of the table
    by_parts = Task(name="toy", model=model, forward_loop=lambda m: [m.decoder(m.encoder(x)) for x in data],
                    objective=err, evaluate=lambda m: {"err": err(m)}, metric="err", higher_is_better=False)
    rows = run_table(by_parts, [8], ["max"], str(tmp_path), progress=False, peers={"nncf_ac": PEERS["nncf_ac"]})
    assert [r["method"] for r in rows] == ["-", "max"]
    failed = json.loads((tmp_path / "results.json").read_text())["failed"]
    assert failed[0]["method"] == "nncf_ac" and "not the model itself" in failed[0]["error"]


def test_a_peer_whose_package_is_missing_is_named_with_its_install_command():
    from peers import Peer, missing_peer_packages

    absent = Peer(None, (8,), "n/a", "no_such_package_xyz", "pip install no-such-package")
    assert missing_peer_packages({"x": absent}) == "x needs no_such_package_xyz: pip install no-such-package"


def test_nncf_accuracy_control_runs_through_openvino_within_the_allowed_drop():
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    pytest.importorskip("openvino", reason="OpenVINO is an extra: pip install -e '.[openvino]'")
    import nncf

    from peers import OpenVinoModule, nncf_accuracy_control

    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(6, 4, 10) for _ in range(3)]
    ref = [model(x).detach() for x in data]

    def objective(m):  # lower is better, like every esc_plugin objective
        return float(sum((m(x) - r).pow(2).mean() for x, r in zip(data, ref)))

    with pytest.raises(nncf.UnsupportedBackendError):  # why the peer goes through OpenVINO
        nncf.quantize_with_accuracy_control(model, nncf.Dataset(data), nncf.Dataset(data),
                                            validation_fn=lambda m, d: -objective(m))
    q = nncf_accuracy_control(model, lambda m: [m(x) for x in data], objective, max_drop=1e-3)
    assert isinstance(q, OpenVinoModule)
    assert objective(q) <= objective(model) + 1e-3 + 1e-6  # NNCF's promise, on the validation batches
    assert q(data[0]).shape == ref[0].shape
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match="not the model itself"):
        nncf_accuracy_control(_EncoderDecoder(), lambda m: m.encoder(torch.randn(2, 6)), objective)
