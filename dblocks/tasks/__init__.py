"""Task registry. Each task lives in one module, which registers its class with `@register`; `get_task(config)`
imports only the module of the task it builds."""
import importlib

from dblocks.tasks.base import TASKS, Task, Unit, register  # noqa: F401

# Every task, by name, and the module that defines it. A new task adds its line here.
TASK_MODULES = {"dit": "dblocks.tasks.dit", "vit": "dblocks.tasks.vit", "mdm": "dblocks.tasks.mdm",
                "ar": "dblocks.tasks.lm.ar", "recurrent": "dblocks.tasks.lm.recurrent"}
TASK_NAMES = tuple(TASK_MODULES)


def get_task(config) -> Task:
    if config.task not in TASK_MODULES:
        raise ValueError(f"unknown task {config.task!r}; choose one of {TASK_NAMES}")
    importlib.import_module(TASK_MODULES[config.task])
    return TASKS[config.task](config)
