"""``esc-quantize``: quantize a task with ESC or a baseline calibrator.

Examples
--------
    esc-quantize demo --out runs/demo                      # built-in default, no data needed
    esc-quantize run --task honk --bits 4 --method esc --out runs/honk-w4a4
    esc-quantize run --task honk --bits 4 --method esc_paper --out runs/honk-w4a4-paper
    esc-quantize run --task mypkg.tasks:build --bits 8 --out runs/mine
    esc-quantize export runs/honk-w8 --format openvino --check   # -> runs/honk-w8/model.xml (+ .bin)
    esc-quantize run --task demo --bits 8 --out runs/demo-w8 --export qdq-onnx

Every option is checked before any work: the quantization config is built
first, then ``--out`` (and ``--checkpoint``'s folder) must be creatable and
writable, and only then is the task (model, data) built.
"""
import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import tempfile

from esc_plugin.core.errors import ConfigError, QuantizationError

# esc_plugin.export.artifacts.FORMATS / esc_plugin.export.MODES (a test keeps them equal), spelled out
# here so that parsing the command line does not import torch.
FORMATS = ("qdq-onnx", "openvino", "tensorrt")
MODES = ("qdq", "simulation", "weight_only")
from esc_plugin.core.presets import config_for, preset_names
from esc_plugin.core.registry import calibrator_names, get_calibrator


EXPORT_HELP = """Export a quantized result to a deployment artifact.

    esc-quantize export runs/demo-w8                             # QDQ ONNX, ONNX Runtime
    esc-quantize export runs/demo-w8 --format openvino --check   # OpenVINO IR, int8 kernels checked
    esc-quantize export runs/demo-w4 --mode simulation           # W4A4 as float ONNX ops
    esc-quantize export model_w8a8.nemo --format qdq-onnx --check

Everything (source, format, mode, runtimes, output path) is checked before any
model is built; an existing artifact is replaced only with --overwrite, and
files are written beside their target and renamed into place. --format
tensorrt writes the QDQ ONNX and builds the engine where TensorRT is
installed; where it is not, it says so, prints the trtexec command to run
where it is, and exits with status 3.
"""


def _methods_help():
    lines = [f"  {name:14s}{get_calibrator(name).summary} (objective: {get_calibrator(name).objective})"
             for name in calibrator_names()]
    lines += [f"  {name:14s}{config_for(name).method} with options {_preset_options(name)}"
              for name in preset_names() if name not in calibrator_names()]
    return "calibrators (--method / --methods):\n" + "\n".join(lines)


def _preset_options(name):
    from esc_plugin.core.presets import preset_options

    return {k: v for k, v in preset_options(name).items() if k != "method"}


def _common(p):
    p.add_argument("--out", default=None, help="output folder (report.json, plots, quantized.pt, results)")
    p.add_argument("--budget", type=int, default=100, help="ESC: CMA-ES objective evaluations Γ (default 100)")
    p.add_argument("--sigma0", type=float, help="ESC: initial step size (default: QuantConfig's, 0.3; "
                                                "the paper's 0.1 is --method esc_paper)")
    p.add_argument("--popsize", type=int, default=None, help="ESC: CMA-ES population (default 4+3 ln N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser():
    names = list(preset_names())
    parser = argparse.ArgumentParser(prog="esc-quantize", description=__doc__, epilog=_methods_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small keyword model on synthesised audio, quantize it "
                                       "with every calibrator at W8A8 and W4A4, print the table",
                          epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(demo)
    demo.add_argument("--methods", nargs="+", default=list(calibrator_names()), choices=names,
                      help="calibrators / presets (default: every calibrator)")
    demo.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[4, 8])

    run = sub.add_parser("run", help="quantize one task with one configuration",
                         epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--task", required=True, help="demo | honk | whisper | package.module:function")
    run.add_argument("--method", default="esc", choices=names, help="calibrator or preset (default esc)")
    run.add_argument("--bits", type=int, default=8, choices=[4, 8])
    run.add_argument("--weight-bits", type=int, default=None, choices=[4, 8])
    run.add_argument("--act-bits", type=int, default=None, choices=[4, 8])
    run.add_argument("--n-samples", type=int, default=None,
                     help="calibration samples, for tasks whose builder takes n_calib (demo, honk, whisper); "
                          "default: the task's own calibration set")
    run.add_argument("--shared", default=None, help="folder with real data/models (default $ESC_SHARED or ../shared)")
    run.add_argument("--checkpoint", default=None, help="ESC: CMA-ES state file; rerun to resume")
    run.add_argument("--export", default=None, choices=FORMATS,
                     help="then export the quantized model to <out>/model.onnx | model.xml | model.engine "
                          "and check it (as esc-quantize export --check); needs --out")
    run.add_argument("--export-mode", default="qdq", choices=MODES, help="--export's mode (default qdq)")
    run.add_argument("--overwrite", action="store_true", help="--export may replace an existing artifact")

    exp = sub.add_parser("export", help="write a quantized result as QDQ ONNX, OpenVINO IR or a TensorRT "
                                        "engine, and check it against the fake-quantized model",
                         description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("source", help="an esc-quantize run --out folder (or its quantized.pt), or a quantized .nemo")
    exp.add_argument("--format", default="qdq-onnx", choices=FORMATS, help="artifact (default qdq-onnx)")
    exp.add_argument("--out", default=None, help="artifact path (default: model.onnx | model.xml | model.engine "
                                                 "beside quantized.pt; <name>.onnx|.xml|.engine beside a .nemo)")
    exp.add_argument("--mode", default="qdq", choices=MODES,
                     help="qdq: int8 Q/DQ (default); simulation: the fake quantization as float ops (any "
                          "bit width, W4A4 included); weight_only: only the weights' Q/DQ")
    exp.add_argument("--check", action="store_true",
                     help="run the artifact on the calibration inputs: agreement with the fake-quantized "
                          "PyTorch model, the int8 kernels the runtime ran, the task metric")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    exp.add_argument("--threads", type=int, default=1, help="runtime threads for --check (default 1)")
    exp.add_argument("--task", default=None, help="the task that made the result, when its folder has no "
                                                  "task.json (or for a package.module:function builder)")
    exp.add_argument("--shared", default=None, help="folder with real data/models, if it moved since the run")
    exp.add_argument("--clip-activations", action="store_true",
                     help="Clip before each activation QuantizeLinear (the graph then matches the "
                          "narrow-range simulation exactly)")
    exp.add_argument("--max-audio-seconds", type=float, default=None,
                     help="a .nemo Conformer: size the positional-encoding table for inputs up to this "
                          "long (NeMo's table covers pos_emb_max_len frames, often most of an int8 file); "
                          "longer inputs then fail in the runtime")
    exp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def check_writable_folder(path, what="--out"):
    """Create ``path`` if needed and check a file can be written in it; a
    :class:`ConfigError` naming the path otherwise (before any work is done)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".esc-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path!r} is not a writable folder ({e.strerror or e}): "
                          "choose another path.") from None


def task_builder(name):
    """The builder function of a task name (``demo``, ``honk``, ``whisper`` or
    ``package.module:function``), without calling it."""
    from esc_plugin.tasks import BUILDERS

    if name in BUILDERS:
        module, func = BUILDERS[name]
    elif ":" in name:
        module, func = name.split(":", 1)
    else:
        raise ConfigError(f"--task {name!r} is unknown: use one of {', '.join(sorted(BUILDERS))} "
                          "or 'package.module:function'.")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--task {name!r}: cannot load {module}:{func} ({type(e).__name__}: {e}).") from None


def _takes(builder, parameter):
    try:
        return parameter in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def _task_kwargs(args, builder):
    kwargs = {}
    for value, option, parameter in ((args.n_samples, "--n-samples", "n_calib"),
                                     (args.shared, "--shared", "shared_root")):
        if value is None:
            continue
        if not _takes(builder, parameter):
            what = "has its own calibration set" if parameter == "n_calib" else "reads no shared data folder"
            raise ConfigError(f"{option}: task {args.task!r} {what} (its builder takes no {parameter} "
                              f"argument); drop {option}.")
        kwargs[parameter] = value
    return kwargs


def _with_task_calibration(cfg, task, given):
    """Record the number of calibration samples the task really uses."""
    n = task.info.get("n_calib") if isinstance(task.info, dict) else None
    if given:
        return cfg
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        print(f"Calibration: the task's own calibration set ({n} samples).", flush=True)
        return dataclasses.replace(cfg, n_samples=n)
    print("Calibration: the task's own calibration set (size not reported by the task; "
          f"the config's n_samples={cfg.n_samples} is not used).", flush=True)
    return cfg


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(parser, args)
    command = sys.argv if argv is None else ["esc-quantize", *argv]
    search = dict(budget=args.budget, popsize=args.popsize, seed=args.seed)
    if args.sigma0 is not None:  # otherwise the preset's / QuantConfig's
        search["sigma0"] = args.sigma0
    try:
        if args.command == "demo":
            from esc_plugin.runner import table_configs

            table_configs(args.bits, args.methods, **search)  # every config, before any work
            out = args.out or os.path.join("runs", "demo")
            check_writable_folder(out)
        else:
            options = dict(bits=args.bits, weight_bits=args.weight_bits, act_bits=args.act_bits,
                           checkpoint=args.checkpoint, **search)
            if args.n_samples is not None:
                options["n_samples"] = args.n_samples
            cfg = config_for(args.method, **options)
            builder = task_builder(args.task)
            kwargs = _task_kwargs(args, builder)
            if args.out:
                check_writable_folder(args.out)
            if args.checkpoint:
                check_writable_folder(os.path.dirname(os.path.abspath(args.checkpoint)), "--checkpoint's folder")
            export_request = _run_export_request(args, cfg, kwargs)
    except ConfigError as e:
        parser.error(str(e))

    import torch

    from esc_plugin.core.presets import label_of
    from esc_plugin.runner import markdown_table, quantize_task, run_table
    from esc_plugin.tasks import get_task

    from esc_plugin.core.allocator import keep_freed_memory

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    keep_freed_memory()  # this command's own process: repeated evaluations reuse their memory
    progress = not args.no_progress
    if args.command == "demo":
        print("Building the demo task (synthesised keywords, small Conv+attention model)...", flush=True)
        task = get_task("demo", seed=args.seed)
        n = task.info.get("n_calib")
        rows = run_table(task, args.bits, args.methods, out, progress=progress, command=command,
                         task_spec=("demo", {"seed": args.seed}),
                         **search, **({"n_samples": n} if isinstance(n, int) and n >= 1 else {}))
        print("\n" + markdown_table(task, rows))
        print(f"\nReports, plots and quantized states under {out}/")
        return 0

    task = get_task(args.task, **kwargs)
    cfg = _with_task_calibration(cfg, task, given=args.n_samples is not None)
    with torch.no_grad():
        fp32 = task.evaluate(task.model)
    qmodel, metrics, seconds = quantize_task(task, cfg, args.out, progress, command=command,
                                             task_spec=(args.task, _recorded(kwargs)))
    print(qmodel.esc_report.summary())
    print(f"{task.name}: FP32 {task.metric}={fp32[task.metric]:.3f}  "
          f"W{cfg.weight_bits}A{cfg.act_bits} {label_of(cfg)} {task.metric}={metrics[task.metric]:.3f}  "
          f"({seconds:.1f} s)")
    if args.out:
        print(f"outputs in {args.out}/")
    if export_request is None:
        return 0
    from esc_plugin.export.command import export_task_model

    try:
        result = export_task_model(task, qmodel, export_request, check=True, progress=progress)
    except QuantizationError as e:
        print(f"esc-quantize: error: {e}", file=sys.stderr)
        return 1
    return _report_export(export_request, result)


def _recorded(task_kwargs):
    """Builder arguments as task.json records them: a shared folder as an absolute path."""
    return {k: os.path.abspath(v) if k == "shared_root" else v for k, v in task_kwargs.items()}


def _run_export_request(args, cfg, task_kwargs):
    """``run --export``: the export's checks (format vs bit widths, runtimes, output path), before work."""
    if args.export is None:
        for flag, used in (("--overwrite", args.overwrite), ("--export-mode", args.export_mode != "qdq")):
            if used:
                raise ConfigError(f"{flag} applies to --export: add --export qdq-onnx|openvino|tensorrt or drop {flag}.")
        return None
    from esc_plugin.export.command import plan_run_export

    return plan_run_export(args.out, args.export, args.export_mode, args.overwrite, cfg, args.task, task_kwargs)


def _export(parser, args):
    from esc_plugin.export.command import export_result, plan_export

    try:
        request = plan_export(args.source, args.format, args.out, args.mode, args.overwrite, args.check,
                              args.task, args.shared, args.clip_activations, args.threads,
                              args.max_audio_seconds)
    except ConfigError as e:
        parser.error(str(e))
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        result = export_result(request, check=args.check, progress=not args.no_progress)
    except QuantizationError as e:
        print(f"esc-quantize: error: {e}", file=sys.stderr)
        return 1
    return _report_export(request, result)


def _report_export(request, result):
    """Print what was written; exit status 3 when the TensorRT engine could not be built here."""
    for path in result["files"]:
        print(f"wrote {path}")
    found = result.get("fusion_barriers")
    if found and found["barriers"]:
        print(f"OpenVINO fused {len(found['barriers'])} quantizer(s) wrongly on the calibration inputs "
              f"(relative L2 to the Q/DQ graph {found['distance']:.3g}); the IR keeps them unfused as extra "
              f"outputs ({', '.join(found['barriers'])}; OpenVinoRunner returns the model's own outputs), "
              f"which brings it to {found['fixed_distance']:.3g}.")
    elif found and not found["agrees"]:
        print(f"warning: OpenVINO's compiled model differs from the Q/DQ graph (relative L2 "
              f"{found['distance']:.3g}) and no fusion barrier fixes it.")
    if request.fmt == "tensorrt" and result.get("artifact") is None:
        from esc_plugin.export.tensorrt import INSTALL_HINT

        print(f"TensorRT engine not built: {INSTALL_HINT}\nOn a machine with TensorRT 10+ and an NVIDIA GPU, "
              f"build it from the QDQ ONNX written above with (optimization profile: batch 1 to 2x, other "
              f"dynamic axes 1/8 to 4x the calibration input's; adjust to yours):\n  {result['trtexec']}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
