"""``quantize: nncf``: Intel NNCF as the recipe's stage, on a real Brain, evaluated like the calibrators."""
import json
import os

import pytest
import torch
import speechbrain as sb

from esc_plugin.core.errors import ConfigError
from esc_plugin.speechbrain import quantize_brain
from test_speechbrain_stage import ToyBrain, _batch, checkpoint_digests, make_data, train


class PerUtteranceBrain(ToyBrain):
    """Calls its model once per utterance, as ECAPA embeds the utterances of a trial batch: the number
    of module calls differs from batch to batch."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        x, _ = batch.feats
        return torch.cat([self.modules.model(self.modules.norm(row.unsqueeze(0))) for row in x])


@pytest.fixture
def trained(tmp_path):
    return train(tmp_path, "save")


def test_nncf_runs_as_the_stage_and_keeps_fp32(trained):
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # its C++ build is slow on a loaded CI box
    brain, hparams, test, out = trained
    before = checkpoint_digests(out / "save")
    fp32_state = {k: v.clone() for k, v in brain.modules.state_dict().items()}
    # ESC-only options of the recipe's block are accepted and do not apply to the peer
    hparams.update(quantize="nncf", quantization={"n_samples": 24, "budget": 6})
    result = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                            loader_kwargs={"batch_size": 8}, progress=False)

    folder = out / "quantized" / "nncf_w8a8"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"] == "nncf" and metrics["bits"] == "W8A8" and result.report is None
    assert metrics["fp32"]["accuracy"] == pytest.approx(brain.test_stats["accuracy"])
    assert metrics["quantized"]["accuracy"] >= 0.9
    assert set(metrics["calibration_objective"]) == {"fp32", "quantized"}
    assert "compute_forward" not in brain.__dict__  # the Brain's own method again
    with torch.no_grad():
        fp = brain.compute_forward(_batch(test), sb.Stage.TEST)
        with result.applied(brain):
            q = brain.compute_forward(_batch(test), sb.Stage.TEST)
    assert not torch.equal(q, fp) and torch.allclose(q, fp, atol=0.2 * float(fp.abs().max()))
    assert checkpoint_digests(out / "save") == before
    assert all(torch.equal(v, brain.modules.state_dict()[k]) for k, v in fp32_state.items())


@pytest.mark.parametrize("block, message", [
    ({"bits": 4}, "INT8 default preset"),
    ({"budjet": 3}, "unknown option"),
])
def test_nncf_stage_bad_input_fails_before_any_work(trained, block, message):
    brain, hparams, test, out = trained
    hparams.update(quantize="nncf", quantization=block)
    with pytest.raises(ConfigError, match=message):
        quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test, progress=False)
    assert not (out / "quantized").exists()


def test_nncf_quantizes_the_modules_a_per_utterance_loop_calls(trained):
    # NNCF names traced ops by call order: tracing the loop itself gives a graph sized by the batch it
    # traced, so an utterance beyond that count meets no quantizer; the stage quantizes each called
    # module on its own calls instead, and every utterance of any batch runs through the same quantizers
    pytest.importorskip("nncf", reason="NNCF is a benchmark extra: pip install -e '.[peers]'")
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    brain, hparams, test, out = trained
    brain.__class__ = PerUtteranceBrain
    hparams.update(quantize="nncf", quantization={"n_samples": 30})
    result = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                            loader_kwargs={"batch_size": 4}, progress=False)  # 4 calls a batch, then 2
    metrics = json.loads((out / "quantized" / "nncf_w8a8" / "metrics.json").read_text())
    assert metrics["quantized"]["accuracy"] >= 0.9
    assert "each module compute_forward calls" in " ".join(metrics["notes"])
    batch = _batch(test)  # 8 utterances: more calls than any calibration batch made
    x, _ = batch.feats
    with torch.no_grad():
        fp = brain.compute_forward(batch, sb.Stage.TEST)
        with result.applied(brain):
            q = brain.compute_forward(batch, sb.Stage.TEST)
            one_by_one = torch.cat([brain.compute_forward(_one(test, i), sb.Stage.TEST) for i in range(len(x))])
    assert not torch.equal(q, fp) and torch.allclose(q, fp, atol=0.2 * float(fp.abs().max()))
    assert torch.equal(q, one_by_one)  # the 8th utterance is quantized exactly as the 1st


def _one(ds, i):
    from speechbrain.dataio.batch import PaddedBatch
    return PaddedBatch([ds[i]])
