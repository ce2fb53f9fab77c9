"""The NNCF peer row of the benchmarks, on real NNCF (nncf.quantize on a torch model)."""
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_nncf_peer_quantizes_a_copy_on_the_loops_inputs():
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    from peers import captured_inputs, nncf_quantize

    class Net(nn.Module):  # not nn.Sequential: NNCF adds a hook-storage child that Sequential would call
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8 * 10, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

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
