"""Task registry. A task named N lives in module dblocks.tasks.N and registers itself with `@register`;
`get_task(config)` imports only the module of the task it builds."""
import importlib

from dblocks.tasks.base import TASKS, Task, Unit, register  # noqa: F401

# Every task, by name (= its module under dblocks/tasks/). A new task adds its name here.
TASK_NAMES = ("dit", "vit", "mdm", "ar", "recurrent")


def get_task(config) -> Task:
    if config.task not in TASK_NAMES:
        raise ValueError(f"unknown task {config.task!r}; choose one of {TASK_NAMES}")
    importlib.import_module(f"dblocks.tasks.{config.task}")
    return TASKS[config.task](config)
