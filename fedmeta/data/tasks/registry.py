"""Task names -> task classes (one file per task beside this one)."""

from __future__ import annotations

from fedmeta.data.tasks.base import Task, TaskError
from fedmeta.data.tasks.breast_cancer import BreastCancerSites
from fedmeta.data.tasks.digits import DigitsFewShot
from fedmeta.data.tasks.sine import Sine
from fedmeta.data.tasks.tabular import TabularCsv

TASKS: dict[str, type[Task]] = {
    DigitsFewShot.name: DigitsFewShot,
    Sine.name: Sine,
    BreastCancerSites.name: BreastCancerSites,
    TabularCsv.name: TabularCsv,
}


def get_task(name: str, n_way: int = 5, pool_per_class: int = 40, num_sites: int = 10,
             num_features: int = 0, num_classes: int = 2) -> Task:
    """Build the task ``name``; one-line TaskError naming the choices if unknown."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise TaskError(
            f"option 'task': unknown task {name!r}; choose from {sorted(TASKS)}") from None
    if cls is TabularCsv:
        return TabularCsv(n_way, pool_per_class, num_sites, num_features, num_classes)
    return cls(n_way=n_way, pool_per_class=pool_per_class, num_sites=num_sites)
