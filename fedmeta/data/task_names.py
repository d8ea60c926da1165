"""The names a run's ``task`` may take, known without importing any task (no torch).

The bundled tasks are listed here, once, by name and ``module:Class``;
:mod:`fedmeta.data.tasks.registry` imports them from this table. Installed plug-ins
are the entry points of the group ``fedmeta.tasks``. The command line lists both in
its help and names them when a task is unknown.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "fedmeta.tasks"

BUNDLED_TASKS: dict[str, str] = {
    "digits-fewshot": "fedmeta.data.tasks.digits:DigitsFewShot",
    "sine": "fedmeta.data.tasks.sine:Sine",
    "breast-cancer-sites": "fedmeta.data.tasks.breast_cancer:BreastCancerSites",
    "tabular-csv": "fedmeta.data.tasks.tabular:TabularCsv",
    "image-sites": "fedmeta.data.tasks.images:ImageSites",
}
"""Bundled task name -> ``module:Class``."""


def installed_tasks() -> dict[str, str]:
    """Entry-point name -> ``module:attr`` for every installed ``fedmeta.tasks`` plug-in."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Every task a run may name by a plain name: the bundled ones, then the plug-ins."""
    return [*BUNDLED_TASKS, *sorted(set(installed_tasks()) - set(BUNDLED_TASKS))]
