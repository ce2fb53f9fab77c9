"""Ready-made tasks (model + calibration data + objective + evaluation).

``get_task("honk")`` etc.; or ``get_task("my_module:build")`` for a user's own
builder returning a :class:`~esc_plugin.tasks.base.Task`.
"""
import importlib

from .base import Task

BUILDERS = {
    "demo": ("esc_plugin.tasks.demo", "build_demo_task"),
    "honk": ("esc_plugin.tasks.honk", "build_honk_task"),
    "whisper": ("esc_plugin.tasks.whisper", "build_whisper_task"),
}


def get_task(name, **kwargs):
    """Build a task by registered name or ``package.module:function``."""
    if name in BUILDERS:
        module, func = BUILDERS[name]
    elif ":" in name:
        module, func = name.split(":", 1)
    else:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(BUILDERS)} or 'package.module:function'.")
    builder = getattr(importlib.import_module(module), func)
    task = builder(**kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"{name} returned {type(task).__name__}, expected esc_plugin.tasks.Task.")
    return task


__all__ = ["Task", "get_task", "BUILDERS"]
