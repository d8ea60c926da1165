"""Tasks: bundled ones (digits-fewshot, sine, breast-cancer-sites, tabular-csv, image-sites)
and plug-ins found by ``registry`` (entry points ``fedmeta.tasks``, ``module:Class``)."""

from fedmeta.data.tasks.base import Episode, Pool, Task, TaskError
from fedmeta.data.tasks.registry import TASKS, get_task

__all__ = ["Episode", "Pool", "Task", "TaskError", "TASKS", "get_task"]
