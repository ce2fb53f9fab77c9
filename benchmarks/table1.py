"""Paper Table 1 on real models: FP32 vs W8A8 / W4A4 x every calibrator and preset.

``--methods`` takes preset names (:func:`esc_plugin.core.presets.preset_names`:
the registered calibrators and named variants such as ``esc_initbest``, ESC
started from the best of its init and the baselines' scales) and peer names
(``benchmarks/peers.py``'s ``PEERS``: Intel NNCF's ``nncf.quantize``, INT8
rows only, needs ``pip install -e ".[peers]"``); the default is all of them.
The old spelling ``esc+best`` is accepted as a deprecated alias of
``esc_initbest``.

Calibration uses the task's calibration split (100 clips for honk; for
Whisper 9 of the 18 transcribed clips by default, or with
``--whisper-calib librispeech`` 100 untranscribed LibriSpeech utterances
scored against the FP32 model's own transcripts), the metric the disjoint
evaluation split. Writes results.json and results.md per task, rewritten
after every row.

    python benchmarks/table1.py --task honk --out benchmarks/results/honk
    python benchmarks/table1.py --task whisper --out benchmarks/results/whisper
    python benchmarks/table1.py --task whisper --whisper-calib librispeech --device cuda --bits 8 \
        --methods max esc mse percentile entropy --keep-going --out runs/whisper_ls
"""
import argparse
import os
import sys
import tarfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import PEERS, missing_peer_packages  # noqa: E402
from esc_plugin.core.io import atomic_path
from esc_plugin.core.presets import preset_names
from esc_plugin.cli import check_writable_folder
from esc_plugin.core.errors import ConfigError
from esc_plugin.runner import markdown_table, run_table, table_configs
from esc_plugin.tasks import get_task


def archive_folder(folder, path):
    """Write ``folder`` as a .tar.gz at ``path``, atomically (one file to
    fetch from a machine that returns only a few files)."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=os.path.basename(os.path.normpath(folder)))


DEPRECATED = {"esc+best": "esc_initbest"}


def method_names():
    """Every row name --methods takes: the presets, then the peers."""
    return tuple(preset_names()) + tuple(PEERS)


def resolve_methods(methods):
    """Row names, with deprecated spellings mapped (and a printed note), duplicates dropped."""
    names, resolved = method_names(), []
    for m in methods:
        if m in DEPRECATED:
            print(f"note: --methods {m} is deprecated; it is {DEPRECATED[m]} (rows and folders use that name)",
                  flush=True)
            m = DEPRECATED[m]
        if m not in names:
            raise SystemExit(f"--methods: {m!r} is unknown; choose from {', '.join(names)}")
        if m not in resolved:
            resolved.append(m)
    return resolved


def task_kwargs(args):
    """Builder arguments from --task-arg KEY=VALUE, --whisper-calib, --device."""
    kwargs = {}
    for kv in args.task_arg:
        if "=" not in kv:
            raise SystemExit(f"--task-arg expects KEY=VALUE, got {kv!r}")
        key, value = kv.split("=", 1)
        kwargs[key] = int(value) if value.isdigit() else value
    if args.task == "whisper":
        kwargs.setdefault("calib", args.whisper_calib)
        kwargs.setdefault("device", args.device)
    elif args.whisper_calib != "transcribed":
        raise SystemExit("--whisper-calib applies to --task whisper only")
    elif args.device != "cpu":
        raise SystemExit(f"--device {args.device}: only the whisper task takes a device "
                         "(pass --task-arg device=... to a builder of your own that accepts one)")
    return kwargs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="honk | whisper | demo | package.module:function")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    p.add_argument("--methods", nargs="+", default=list(method_names()),
                   help=f"calibrators / presets / peers: {', '.join(method_names())} (default: all)")
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whisper-calib", choices=("transcribed", "librispeech"), default="transcribed",
                   help="whisper: calibrate on 9 of the 18 transcribed clips (default) or on 100 "
                        "LibriSpeech utterances against the FP32 transcripts (evaluation: all 18 clips)")
    p.add_argument("--device", default="cpu", help="whisper: cpu | cuda | cuda:N")
    p.add_argument("--keep-going", action="store_true",
                   help="a method that fails is listed under 'failed' in results.json; the table goes on")
    p.add_argument("--progress", action="store_true", help="progress bars (e.g. ESC's CMA-ES evaluations)")
    p.add_argument("--archive", default=None, metavar="PATH.tar.gz",
                   help="after every row, also write the whole --out folder to this archive")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument, e.g. --task-arg variant=res8")
    args = p.parse_args(argv)
    command = sys.argv if argv is None else ["benchmarks/table1.py", *argv]
    methods = resolve_methods(args.methods)
    peers = {m: PEERS[m] for m in methods if m in PEERS}
    methods = [m for m in methods if m not in PEERS]
    missing = missing_peer_packages(peers)
    if missing:
        raise SystemExit(f"error: {missing}")
    try:
        table_configs(args.bits, methods, budget=args.budget, seed=args.seed)  # every config, before any work
        check_writable_folder(args.out)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    torch.set_num_threads(args.threads)
    kwargs = task_kwargs(args)
    t_start = time.time()
    task = get_task(args.task, **kwargs)
    print(f"built {task.name} in {time.time() - t_start:.1f} s: {task.info}", flush=True)

    def on_row(rows):
        print(f"[{time.time() - t_start:.0f} s] {len(rows)} row(s) done", flush=True)
        if args.archive:
            archive_folder(args.out, args.archive)

    rows = run_table(task, args.bits, methods, args.out, progress=args.progress, on_row=on_row,
                     keep_going=args.keep_going, command=command, peers=peers, budget=args.budget, seed=args.seed)
    print(markdown_table(task, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
