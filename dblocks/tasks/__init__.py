"""Task registry: each task module registers itself with `@register`; `get_task(config)` builds one."""
import importlib

from dblocks.tasks.base import TASKS, Task, Unit, register  # noqa: F401

# Modules that define tasks. A new task adds its module here.
TASK_MODULES = ("dit", "vit", "mdm", "ar", "recurrent")


def load_tasks() -> dict:
    for name in TASK_MODULES:
        try:
            importlib.import_module(f"dblocks.tasks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dblocks.tasks.{name}":  # only a task module not written yet is skipped
                raise
    return TASKS


def get_task(config) -> Task:
    load_tasks()
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose one of {sorted(TASKS)}")
    return TASKS[config.task](config)
