import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", module="modelopt")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def shared_root():
    return Path(os.environ.get("ESC_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared():
    root = shared_root()
    if not (root / "data").is_dir():
        pytest.skip(f"real data not found at {root}: set ESC_SHARED to the shared/ folder")
    return root


def honk_task(n_calib=24, eval_limit=20):
    """The real honk res8-narrow task on a few clips (skips when ../shared is absent)."""
    root = shared_root()
    if not (root / "data").is_dir():
        pytest.skip(f"real data not found at {root}: set ESC_SHARED to the shared/ folder")
    from esc_plugin.tasks import get_task

    return get_task("honk", shared_root=root, n_calib=n_calib, eval_limit=eval_limit)


def loop_and_output_error(model, data):
    """``(forward_loop, objective)`` over ``data``: the objective is the summed output MSE to the FP32
    model's outputs (recorded now), the simplest real calibration objective."""
    with torch.no_grad():
        refs = [model(x) for x in data]

    def loop(m):
        for x in data:
            m(x)

    def objective(m):
        with torch.no_grad():
            return sum(float(((m(x) - r) ** 2).mean()) for x, r in zip(data, refs))

    return loop, objective


def fails_fast(argv, capsys, match, limit=2.0):
    """``esc-quantize argv`` exits with status 2 and a message matching ``match`` within ``limit`` s
    (bad input is refused before any model is built)."""
    import re
    import time

    from esc_plugin import cli

    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    seconds = time.perf_counter() - t
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert re.search(match, err), err
    assert seconds < limit, f"{argv} took {seconds:.1f} s to fail"
    return err


def int8_parity(distance, tolerance, what="int8 runtime vs the simulation"):
    """Assert ``distance <= tolerance`` where the CPU's fused int8 kernels are exact (VNNI, AMX,
    ARM); on x86 CPUs with AVX2 and no VNNI, ONNX Runtime's and OpenVINO's u8 x s8 products
    saturate int16 pair sums (see ``esc_plugin.export.int8_kernels_exact``), so no such bound
    holds there: the distance is reported as a warning instead. Returns whether it was asserted."""
    from esc_plugin.export import int8_kernels_exact

    if int8_kernels_exact():
        assert distance <= tolerance, f"{what}: relative L2 {distance:.3g} > {tolerance}"
        return True
    warnings.warn(f"{what}: relative L2 {distance:.3g} (bound {tolerance} not asserted: this CPU "
                  "has no VNNI, its int8 kernels saturate)")
    return False


needs_exact_int8 = pytest.mark.skipif(
    "not __import__('esc_plugin.export', fromlist=['x']).int8_kernels_exact()",
    reason="this CPU has AVX2 and no VNNI: the fused int8 kernels saturate (export.int8_kernels_exact)")
