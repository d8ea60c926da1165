"""Bundled tasks (no downloads): digits-fewshot, sine, breast-cancer-sites."""

from fedmeta.data.tasks.base import Episode, Pool, Task, TaskError
from fedmeta.data.tasks.registry import TASKS, get_task

__all__ = ["Episode", "Pool", "Task", "TaskError", "TASKS", "get_task"]
