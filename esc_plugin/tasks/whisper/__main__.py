"""FP32 check of the Whisper task from the command line (``python -m esc_plugin.tasks.whisper``)."""
import time

import torch

from .objectives import OBJECTIVES
from .task import CALIB_SOURCES, build_whisper_task


def _main(argv=None):
    """FP32 check: ``python -m esc_plugin.tasks.whisper [--calib librispeech] [--n-calib N] [--device cuda]``.

    Prints the FP32 transcripts of the evaluation clips, the FP32 WER and the
    time of one objective call.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m esc_plugin.tasks.whisper", description=_main.__doc__)
    p.add_argument("--calib", choices=CALIB_SOURCES, default="transcribed")
    p.add_argument("--n-calib", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: unchanged)")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--objectives", nargs="+", default=["wer+ce"], choices=OBJECTIVES)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    task = build_whisper_task(n_calib=args.n_calib, calib=args.calib, device=args.device,
                              decode_threads=args.decode_threads, batch_size=args.batch_size,
                              objective=args.objectives[0])
    print(f"build {time.perf_counter() - t0:.1f} s ({task.info['build_timings']}), "
          f"{torch.get_num_threads()} threads, device {args.device}\n"
          f" calib ({task.info['n_calib']}) {task.info['calib_ids']}\n eval ({task.info['n_eval']}) "
          f"{task.info['eval_ids']}", flush=True)
    if "pseudo_labels" in task.info:
        print(f" FP32 pseudo-labels: {task.info['pseudo_labels']}")
    t0 = time.perf_counter()
    res = task.evaluate(task.model)
    print(f"FP32 WER on the {res['n']} evaluation clips: {res['wer']:.2f} % "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    for obj in args.objectives:
        t = task if obj == args.objectives[0] else build_whisper_task(
            n_calib=args.n_calib, calib=args.calib, device=args.device, decode_threads=args.decode_threads,
            batch_size=args.batch_size, objective=obj)
        t0 = time.perf_counter()
        val = t.objective(t.model)
        print(f"objective[{obj}] = {val:.4f} ({time.perf_counter() - t0:.2f} s/call)", flush=True)
    t0 = time.perf_counter()
    task.forward_loop(task.model)
    print(f"forward_loop {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    _main()
