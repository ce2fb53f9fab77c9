"""Scoped, per-thread routing of F.linear / SDPA / the MHA fast-path switch, and lazy weight quantizers
of functional modules. Real torch, SpeechBrain and modelopt objects; no mocks."""
import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import esc_plugin as esc

ORIG_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear is when nothing patches it
ORIG_SDPA = torch._C._nn.scaled_dot_product_attention
ORIG_FASTPATH_GETTER = torch.backends.mha.get_fastpath_enabled
D, REPEATS = 32, 25


class MHANet(nn.Module):
    """Linear -> torch MultiheadAttention (F.linear on raw parameters) -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, D)
        self.mha = nn.MultiheadAttention(D, 4, batch_first=True)
        self.out = nn.Linear(D, 5)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h)


class RelPosNet(nn.Module):
    """Linear -> SpeechBrain RelPosMHAXL (F.linear on ``in_proj_weight``; ``pos_bias_u/v`` are 2-D
    parameters that are not F.linear weights) -> Linear."""

    def __init__(self):
        super().__init__()
        from speechbrain.nnet.attention import RelPosEncXL, RelPosMHAXL
        self.inp = nn.Linear(12, D)
        self.pos = RelPosEncXL(D)
        self.att = RelPosMHAXL(D, 4)
        self.out = nn.Linear(D, 5)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.att(h, h, h, pos_embs=self.pos(h))
        return self.out(h)


def _encoder():
    layer = nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def _data(seed, shape=(2, 9, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 3 for _ in range(3)]


def _quantize(model, data, **options):
    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    return esc.quantize(model, esc.QuantConfig(bits=8, method="max", **options), loop, progress=False)


def _fresh(cls, seed):
    torch.manual_seed(seed)
    return cls().eval()


@pytest.fixture
def racy():
    """One intra-op thread (bit-exact reductions) and a tiny GIL switch interval (many interleavings)."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def _sequential(fn, data):
    with torch.no_grad():
        return [fn(data[i % len(data)]) for i in range(REPEATS)]


def _concurrently(*jobs):
    """Run each ``(fn, data)`` job REPEATS times in its own thread, all started together."""
    barrier = threading.Barrier(len(jobs))
    outputs = [[] for _ in jobs]
    errors = []

    def work(j):
        fn, data = jobs[j]
        try:
            barrier.wait()
            with torch.no_grad():
                for i in range(REPEATS):
                    outputs[j].append(fn(data[i % len(data)]))
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outputs


def _assert_identical(got, ref):
    wrong = sum(not torch.equal(a, b) for a, b in zip(got, ref))
    assert len(got) == len(ref) and wrong == 0, f"{wrong}/{len(ref)} calls differ from the sequential run"


def _assert_nothing_patched():
    assert F.linear is ORIG_LINEAR
    assert torch.nn.functional.scaled_dot_product_attention is ORIG_SDPA
    assert torch.backends.mha.get_fastpath_enabled is ORIG_FASTPATH_GETTER


def _other_model(kind):
    """The second quantized model of the two-thread tests: RelPosMHAXL if SpeechBrain is here."""
    if kind == "relpos":
        pytest.importorskip("speechbrain")
        data = _data(2)
        return _quantize(_fresh(RelPosNet, 2), data), data
    data = _data(3, (2, 9, D))
    return _quantize(_fresh(_encoder, 3), data, quantize_attention=True), data


@pytest.mark.parametrize("other", ["relpos", "sdpa_encoder"])
def test_two_quantized_models_in_two_threads_match_sequential_runs(racy, other):
    data_a = _data(1)
    qa = _quantize(_fresh(MHANet, 1), data_a)
    qb, data_b = _other_model(other)
    ref_a, ref_b = _sequential(qa, data_a), _sequential(qb, data_b)
    got_a, got_b = _concurrently((qa, data_a), (qb, data_b))
    _assert_identical(got_a, ref_a)
    _assert_identical(got_b, ref_b)
    _assert_nothing_patched()


def test_one_quantized_model_shared_by_two_threads(racy):
    """Two threads on one model while its quantized-weight caches are dropped under them."""
    pytest.importorskip("speechbrain")
    data = _data(4)
    q = _quantize(_fresh(RelPosNet, 4), data)
    ref = _sequential(q, data)

    def dropping_caches(x):  # what whoever changes a weight scale must do (see _CachedWeight)
        for m in q.modules():
            m.__dict__.get("_esc_qweight_cache", {}).clear()
        return q(x)

    got_a, got_b = _concurrently((q, data), (dropping_caches, data))
    _assert_identical(got_a, ref)
    _assert_identical(got_b, ref)


def test_fp32_model_in_another_thread_is_bit_identical(racy):
    data = _data(5)
    fp32 = _fresh(MHANet, 5)
    q = _quantize(fp32, data)
    enc = _fresh(_encoder, 6)
    enc_data = _data(6, (2, 9, D))
    qenc = _quantize(enc, enc_data, quantize_attention=True)
    ref_fp32, ref_enc = _sequential(fp32, data), _sequential(enc, enc_data)
    got_q, got_fp32, got_qenc, got_enc = _concurrently((q, data), (fp32, data), (qenc, enc_data), (enc, enc_data))
    _assert_identical(got_fp32, ref_fp32)  # incl. torch's fused MHA / transformer fast path
    _assert_identical(got_enc, ref_enc)
    assert not torch.equal(got_q[0], ref_fp32[0])  # while the quantized copy really quantizes
    _assert_nothing_patched()


def test_everything_is_restored_after_a_forward_even_one_that_raises():
    data = _data(7, (2, 9, D))
    q = _quantize(_fresh(_encoder, 7), data, quantize_attention=True)
    qm = _quantize(_fresh(MHANet, 7), _data(7))
    with torch.no_grad():
        q(data[0])
        qm(_data(7)[0])
    _assert_nothing_patched()
    bad = torch.randn(2, 9, D + 1)  # wrong feature size: raises inside the quantized forward
    for call in (lambda: q(bad), lambda: qm.mha(bad, bad, bad)):
        with pytest.raises((RuntimeError, AssertionError)):
            call()
        _assert_nothing_patched()
    with torch.no_grad():  # and the next forward still quantizes
        torch.testing.assert_close(q(data[0]), q(data[0]), rtol=0, atol=0)


@pytest.mark.parametrize("user_value", [True, False])
def test_mha_fastpath_flag_keeps_the_users_value(user_value):
    data = _data(8, (2, 9, D))
    q = _quantize(_fresh(_encoder, 8), data)
    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def probe(module, args):  # runs inside the quantized layer, in the quantizing thread
        seen["quantized thread"] = torch.backends.mha.get_fastpath_enabled()
        inside.set()
        checked.wait(10)

    def other_thread():
        inside.wait(10)
        seen["other thread"] = torch.backends.mha.get_fastpath_enabled()
        checked.set()

    previous = ORIG_FASTPATH_GETTER()
    torch.backends.mha.set_fastpath_enabled(user_value)
    try:
        handle = q.layers[0].linear1.register_forward_pre_hook(probe)
        t = threading.Thread(target=other_thread)
        t.start()
        with torch.no_grad():
            q(data[0])
        t.join()
        handle.remove()
        with pytest.raises((RuntimeError, AssertionError)), torch.no_grad():
            q(torch.randn(2, 9, D + 1))
        assert seen == {"quantized thread": False, "other thread": user_value}
        assert torch.backends.mha.get_fastpath_enabled() is user_value
        _assert_nothing_patched()
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# ------------------------------------------------------------- weight quantizers of F.linear modules

def test_relpos_only_linear_weights_get_weight_quantizers(tmp_path):
    pytest.importorskip("speechbrain")
    data = _data(9)
    fp32 = _fresh(RelPosNet, 9)
    seen = []

    def loop(m):
        with torch.no_grad():
            for x in data:
                seen.append(m(x))

    q = esc.quantize(fp32, esc.QuantConfig(bits=8, method="max"), loop, progress=False)
    assert set(q.att.esc_weight_quantizers) == {"in_proj_weight"}  # not pos_bias_u / pos_bias_v
    for name in ("pos_bias_u", "pos_bias_v"):
        assert torch.equal(q.att.get_parameter(name), fp32.att.get_parameter(name))
    plan_quantizers = q.esc_plan.weight_quantizers()
    assert q.att.esc_weight_quantizers["in_proj_weight"] in plan_quantizers
    with torch.no_grad():  # the statistics pass ran in FP32: lazily made weight quantizers were off
        for x, out in zip(data, seen):
            assert torch.equal(out, fp32(x))
        ref = q(data[0])
        assert not torch.equal(ref, fp32(data[0]))
        again = esc.load(fp32, esc.save(q, tmp_path / "q.pt"))
        assert set(again.att.esc_weight_quantizers) == {"in_proj_weight"}
        torch.testing.assert_close(again(data[0]), ref, rtol=0, atol=0)
