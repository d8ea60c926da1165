"""Task specs -> task objects: bundled tasks, installed plug-ins, ``module:Class`` paths.

A run names its task with one string (``task`` in the run config), which
travels with every round's config, so the server, Ray workers, ``flwr run``
processes and deployed SuperNodes all resolve it the same way:

* a bundled name: ``digits-fewshot``, ``sine``, ``breast-cancer-sites``, ``tabular-csv``;
* the name of an entry point in the group ``fedmeta.tasks`` of an installed
  package (``[project.entry-points."fedmeta.tasks"] blobs = "pkg.tasks:Blobs"``);
* a path ``package.module:Class`` to a :class:`~fedmeta.data.tasks.base.Task`
  subclass importable where the site runs (installed, or on ``PYTHONPATH``).

A model factory (``model`` in the run config, ``package.module:factory``)
replaces the task's own model for any task: it is called as
``factory(out_dim, task)`` and returns an ``nn.Module`` whose last layer is an
``nn.Linear`` named ``head`` (the rest named ``features`` for prototype heads).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from fedmeta.data.task_names import BUNDLED_TASKS, ENTRY_POINT_GROUP, installed_tasks
from fedmeta.data.tasks.base import Task, TaskError


def _bundled() -> dict[str, type[Task]]:
    out: dict[str, type[Task]] = {}
    for name, path in BUNDLED_TASKS.items():
        module, _, attr = path.partition(":")
        out[name] = getattr(importlib.import_module(module), attr)
    return out


TASKS: dict[str, type[Task]] = _bundled()
"""The bundled tasks, from :data:`fedmeta.data.task_names.BUNDLED_TASKS` (plug-ins are
found through ``task_class``)."""

ModelFactory = Callable[[int, Task], nn.Module]


def plugin_packages() -> set[str]:
    """Top-level packages that provide an installed ``fedmeta.tasks`` entry point."""
    return {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_site_imports(task: str, model: str = "") -> None:
    """A deployed site's guard against a coordinator naming code for it to run.

    The run config is the coordinator's; a deployed site imports only bundled tasks,
    installed ``fedmeta.tasks`` entry points and ``module:attr`` paths inside the
    packages that provide them (plug-ins the site itself installed). Raises a one-line
    ConfigError, which the site declines on record.
    """
    from fedmeta.config import ConfigError

    allowed = plugin_packages()
    for option, spec in (("task", task.strip()), ("model", model.strip())):
        if not spec or (option == "task" and (spec in TASKS or spec in installed_tasks())):
            continue
        if ":" in spec and spec.split(":")[0].split(".")[0] in allowed:
            continue
        raise ConfigError(
            f"option '{option}': {spec!r} is neither bundled nor part of a fedmeta plug-in "
            f"installed at this site (installed: {sorted(allowed) or 'none'}); a deployed "
            "site runs only code it installed itself"
        )


def _choices() -> str:
    return (
        f"choose from {sorted(TASKS)}, an installed plug-in "
        f"{sorted(installed_tasks()) or '(none installed)'} or package.module:Class"
    )


def load_object(spec: str, option: str) -> Any:
    """The object named by ``package.module:attr`` (one-line TaskError naming ``option``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(f"option '{option}': {spec!r} is not of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the plug-in's own import-time failure
        raise TaskError(
            f"option '{option}': cannot import {module_name!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); install the package where "
            "the server and every site run, or put it on PYTHONPATH"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"option '{option}': module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def task_class(spec: str) -> type[Task]:
    """The Task subclass a spec names (bundled name, entry point, or module:Class)."""
    spec = spec.strip()
    if spec in TASKS:
        return TASKS[spec]
    if ":" in spec:
        obj = load_object(spec, "task")
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        if not found:
            raise TaskError(f"option 'task': unknown task {spec!r}; {_choices()}")
        try:
            obj = found[0].load()
        except Exception as exc:
            raise TaskError(
                f"option 'task': plug-in {spec!r} ({found[0].value}) failed to "
                f"load: {type(exc).__name__}: {exc}".splitlines()[0]
            ) from None
    if not (inspect.isclass(obj) and issubclass(obj, Task)):
        raise TaskError(
            f"option 'task': {spec!r} is not a subclass of fedmeta's Task "
            "(fedmeta.data.tasks.base.Task); see docs/plugins.md"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise TaskError(f"option 'task': {spec!r} does not implement {missing}")
    return obj


def model_factory(spec: str) -> ModelFactory:
    """The callable ``package.module:factory`` names (one-line TaskError otherwise)."""
    obj = load_object(spec.strip(), "model")
    if not callable(obj):
        raise TaskError(f"option 'model': {spec!r} is not callable")
    return obj


def _with_model(task: Task, spec: str) -> Task:
    """``task`` whose ``build_model`` is the factory's (checked to return an nn.Module)."""
    factory = model_factory(spec)

    def build_model(out_dim: int) -> nn.Module:
        model = factory(out_dim, task)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"option 'model': {spec} returned {type(model).__name__}, not a torch nn.Module"
            )
        return model

    task.build_model = build_model  # type: ignore[method-assign]
    task.model_spec = spec
    return task


def get_task(
    name: str,
    n_way: int = 5,
    pool_per_class: int = 40,
    num_sites: int = 10,
    num_features: int = 0,
    num_classes: int = 2,
    model: str = "",
    data_dir: str = "",
    image_size: int = 28,
    channels: int = 1,
) -> Task:
    """Build the task ``name`` (see the module docstring for what a name may be).

    Settings a task's constructor does not take are not passed (a plug-in may
    accept only ``n_way``, ``pool_per_class`` and ``num_sites``, or none).
    """
    cls = task_class(name)
    offered: dict[str, Any] = {
        "n_way": n_way,
        "pool_per_class": pool_per_class,
        "num_sites": num_sites,
        "num_features": num_features,
        "num_classes": num_classes,
        "data_dir": data_dir,
        "image_size": image_size,
        "channels": channels,
    }
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    try:
        task = cls(**kwargs)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            f"option 'task': {name!r} could not be built: {type(exc).__name__}: {exc}".splitlines()[
                0
            ]
        ) from None
    task.spec = name
    return _with_model(task, model) if model else task
