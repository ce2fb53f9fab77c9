"""End-to-end checks of the task builders on the real shared data.

Skipped when the shared folder (``$ESC_SHARED`` or ``<repo>/../shared``) is
missing. Kept to ~30 s on 2 CPU cores: the honk evaluation uses a 300-clip
subset and Whisper transcribes a single clip.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esc_plugin.tasks import audio, honk  # noqa: E402
from esc_plugin.tasks.base import Task  # noqa: E402


@pytest.fixture(scope="module")
def shared_dir():
    try:
        root = audio.resolve_shared_root()
    except FileNotFoundError as e:
        pytest.skip(f"shared data not available ({e})")
    if not (root / "data").is_dir() or not (root / "models").is_dir():
        pytest.skip(f"shared folder {root} lacks data/ or models/; set {audio.SHARED_ENV}")
    return root


def test_missing_shared_root_names_env_var(tmp_path):
    with pytest.raises(FileNotFoundError, match=audio.SHARED_ENV):
        audio.resolve_shared_root(tmp_path / "nope")


def test_pad_or_trim():
    assert audio.pad_or_trim(torch.ones(10), 16).tolist() == [1.0] * 10 + [0.0] * 6
    assert audio.pad_or_trim(torch.ones(2, 20), 16).shape == (2, 16)


def test_mfcc_shape():
    feats = honk.compute_mfcc(0.1 * torch.randn(12000))  # short clip -> padded to 1 s
    assert feats.shape == (1, 101, 40)
    assert torch.isfinite(feats).all()
    assert honk.compute_mfcc(torch.zeros(3, 16000)).shape == (3, 101, 40)


@pytest.fixture(scope="module")
def honk_task(shared_dir):
    return honk.build_honk_task(shared_dir, eval_limit=300)


def test_honk_fp32(honk_task):
    task = honk_task
    assert isinstance(task, Task) and task.metric == "accuracy" and task.higher_is_better
    assert task.info["n_calib"] == 100 and task.info["n_eval"] == 300
    res = task.evaluate(task.model)
    print(f"honk res8-narrow FP32 accuracy on {res['n']} eval clips: {res['accuracy']:.1f} %")
    assert res["n"] == 300 and res["accuracy"] > 75.0
    assert abs(res["accuracy"] + res["error"] - 100.0) < 1e-6
    obj = task.objective(task.model)
    assert 0.0 <= obj < 0.3
    task.forward_loop(task.model)


def test_honk_split_is_speaker_disjoint(shared_dir):
    clips = honk.list_clips(shared_dir / "data" / "speech_commands")
    calib, evalc, _ = honk.speaker_split(clips, 100, seed=0)
    assert len(calib) == 100 and len(calib) + len(evalc) == len(clips)
    spk_c = {honk.speaker_of(p) for p, _ in calib}
    spk_e = {honk.speaker_of(p) for p, _ in evalc}
    assert not spk_c & spk_e
    # the hex speaker id, also for `_unknown_/<word>_<id>_nohash_<n>` clips
    assert honk.speaker_of(Path("_unknown_/bed_0ea0e2f4_nohash_1.wav.flac")) == "0ea0e2f4"
    hex_ids = lambda clips: {p.name.split("_nohash_")[0][-8:] for p, _ in clips if "_nohash_" in p.name}
    assert not hex_ids(calib) & hex_ids(evalc)
    assert honk.speaker_split(clips, 100, seed=0)[0] == calib  # deterministic
    assert honk.speaker_split(clips, 100, seed=1)[0] != calib


def test_res8_scales_folded_exactly(shared_dir):
    ckpt = shared_dir / "models" / "honk" / "res8.pt"
    sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    folded = honk.load_res8(ckpt, 45)
    plain = honk.load_res8(ckpt, 45, fold_scales=False)
    x = torch.randn(4, 101, 40)

    def with_scales(x):  # reference: apply scale{i} after bn{i}
        x = x.unsqueeze(1)
        for i in range(7):
            y = torch.relu(getattr(plain, f"conv{i}")(x))
            if i == 0:
                y = plain.pool(y)
                old = y
            x = y + old if i > 0 and i % 2 == 0 else y
            if i > 0 and i % 2 == 0:
                old = x
            if i > 0:
                x = getattr(plain, f"bn{i}")(x)
                if f"scale{i}.scale" in sd:
                    x = x * sd[f"scale{i}.scale"].view(1, -1, 1, 1)
        return plain.output(x.flatten(2).mean(2))

    with torch.no_grad():
        torch.testing.assert_close(folded(x), with_scales(x), rtol=1e-4, atol=1e-4)


def test_whisper_fp32_one_clip(shared_dir):
    from esc_plugin.tasks import whisper

    model, fe, tok = whisper.load_whisper(shared_dir)
    clips = {c["id"]: c for c in whisper.load_clips(shared_dir)}
    assert len(clips) == 18
    clip = clips["spk1_snt1"]
    hyp = whisper.transcribe(model, tok, whisper.log_mel(fe, [clip["wav"]]), decode_threads=1)[0]
    from esc_plugin.metrics.text import word_error_rate

    wer = word_error_rate([clip["ref"]], [hyp])
    print(f"whisper FP32: REF {clip['ref']!r} HYP {hyp!r} WER {100 * wer:.1f} %")
    assert wer < 0.30


def test_whisper_split_and_objective(shared_dir):
    from esc_plugin.tasks import whisper

    # decode_threads=1: robust to other processes sharing the 2 CI cores.
    task = whisper.build_whisper_task(shared_dir, n_calib=2, decode_threads=1)
    assert task.metric == "wer" and not task.higher_is_better
    assert not set(task.info["calib_ids"]) & set(task.info["eval_ids"])
    assert task.info["n_calib"] + task.info["n_eval"] == 18
    # The decoder must run through the modules' forward (quantization wrappers).
    calls = {"proj_out": 0, "fc1": 0, "conv1": 0}
    hooks = [mod.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, mod in (("proj_out", task.model.proj_out), ("fc1", task.model.model.decoder.layers[0].fc1),
                            ("conv1", task.model.model.encoder.conv1))]
    obj = task.objective(task.model)  # wer + 0.01 * ce on 2 clips
    assert 0.0 < obj < 0.35
    assert calls["conv1"] == 1 and calls["proj_out"] > 5 and calls["fc1"] == calls["proj_out"]
    task.forward_loop(task.model)
    for h in hooks:
        h.remove()
    full = whisper.split_clips(whisper.load_clips(shared_dir), None, 0)
    assert [len(s) for s in full] == [9, 9]


def test_whisper_librispeech_calibration(shared_dir):
    from esc_plugin.tasks import whisper

    # Two untranscribed LibriSpeech utterances, labelled by the FP32 model itself.
    task = whisper.build_whisper_task(shared_dir, calib="librispeech", n_calib=2, decode_threads=1)
    info = task.info
    assert info["n_calib"] == 2 and info["n_eval"] == 18 and info["calib"] == "librispeech"
    assert len(set(info["calib_speakers"])) == 2  # round-robin over the 10 speakers
    assert not set(info["calib_speakers"]) & set(info["eval_speakers"])
    assert not set(info["calib_ids"]) & set(info["eval_ids"])
    assert all(r.strip() for r in info["refs"]["calib"]) and info["pseudo_labels"]["hit_cap"] == 0
    # FP32 agrees with its own transcripts: WER 0, only the small CE term remains.
    assert 0.0 < task.objective(task.model) < 0.01
    with pytest.raises(ValueError, match="calib must be one of"):
        whisper.build_whisper_task(shared_dir, calib="libri")


def test_run_table_writes_each_row_and_keeps_going(tmp_path):
    import json

    from esc_plugin.runner import run_table

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 3:  # FP32, max, then the third evaluation (mse) fails
            raise RuntimeError("planted failure")
        return {"err": sum(float((m(x) - model(x)).abs().mean()) for x in data), "n": 2}

    task = Task(name="toy", model=model, forward_loop=lambda m: [m(x) for x in data],
                objective=lambda m: 0.0, evaluate=evaluate,
                metric="err", higher_is_better=False)
    seen = []
    rows = run_table(task, [8], ["max", "mse", "entropy"], str(tmp_path), progress=False, keep_going=True,
                     on_row=lambda r: seen.append((len(r), json.loads((tmp_path / "results.json").read_text()))))
    assert [r["method"] for r in rows] == ["-", "max", "entropy"]
    assert [n for n, _ in seen] == [1, 2, 2, 3]  # FP32, max, mse (failed), entropy
    assert [len(res["rows"]) for _, res in seen] == [1, 2, 2, 3]  # results.json rewritten after every row
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["failed"] == [{"config": "W8A8", "method": "mse", "error": "RuntimeError: planted failure"}]
    calls.clear()
    with pytest.raises(RuntimeError, match="planted"):
        run_table(task, [8], ["max", "mse"], None, progress=False)
