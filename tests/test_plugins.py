"""Plug-in tasks and models from an installed package (examples/plugin): named by entry
point (group ``fedmeta.tasks``) and by ``package.module:Class``, with a ``--model``
factory; resolved the same way by the server, the inline and Ray simulations, a deployed
site's ClientApp (the code a SuperNode runs) and `flwr run`."""

from __future__ import annotations

import importlib
import json
import os
import signal
import site
import subprocess
import sys
import sysconfig
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import (
    ROOT,
    copy_project,
    example_site_on_bundled_data,
    fedmeta,
    loopback_only,
    processes_with_env,
    run_inline,
    shadowing_project,
    shadows_in,
)

from fedmeta.approvals import approve
from fedmeta.config import RunConfig, build_task, run_declaration
from fedmeta.data.tasks import TaskError, get_task
from fedmeta.offline import OFFLINE_ENV
from fedmeta.paths import SitePaths

PLUGIN = ROOT / "examples" / "plugin"
TASK_EP = "blobs-fewshot"
TASK_PATH = "fedmeta_example_plugin.blobs:BlobsFewShot"
MODEL = "fedmeta_example_plugin.models:wide_mlp"


@pytest.fixture(scope="module", autouse=True)
def plugin_installed() -> None:
    """pip-install the example plug-in (editable, no dependencies) into this venv once."""
    if not any(ep.name == TASK_EP for ep in entry_points(group="fedmeta.tasks")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(PLUGIN),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        site.addsitedir(sysconfig.get_paths()["purelib"])  # this process: run the new .pth
        importlib.invalidate_caches()
    assert any(ep.name == TASK_EP for ep in entry_points(group="fedmeta.tasks"))


def test_entry_point_task_with_a_model_factory_trains_inline(tmp_path):
    summary = run_inline(
        tmp_path / "run",
        task=TASK_EP,
        model=MODEL,
        sites=3,
        rounds=2,
        fraction_train=1.0,
        eval_every=0,
        eval_episodes=5,
    )
    assert set(summary["epsilon"]) == {"site-0", "site-1", "site-2"}
    assert not summary["declined_rounds"] and summary["eval"]["metric"] == "accuracy"
    state = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["state_dict"]
    assert state["features.2.weight"].shape == (64, 64)  # the factory's model, not the task's


def test_module_path_task_trains_inline(tmp_path):
    summary = run_inline(
        tmp_path / "run",
        task=TASK_PATH,
        sites=2,
        rounds=1,
        fraction_train=1.0,
        eval_every=0,
        eval_episodes=3,
    )
    assert set(summary["epsilon"]) == {"site-0", "site-1"} and not summary["declined_rounds"]


def test_bad_specs_fail_in_one_line():
    for spec, text in (
        ("no-such-task", "unknown task 'no-such-task'"),
        ("nowhere.mod:Task", "cannot import 'nowhere.mod'"),
        ("fedmeta_example_plugin.blobs:Missing", "has no 'Missing'"),
        ("fedmeta_example_plugin.models:wide_mlp", "not a subclass"),
    ):
        with pytest.raises(TaskError, match=text):
            get_task(spec)
    with pytest.raises(TaskError, match="installed plug-in \\['blobs-fewshot'\\]"):
        get_task("no-such-task")
    task = get_task("sine", model="fedmeta_example_plugin.models:wide_mlp")
    assert task.build_model(1).head.in_features == 64  # a factory for a bundled task


SITE = "site-plugin-01"


def deployed_message(cfg: RunConfig, run: str) -> Message:
    theta = build_task(cfg).build_model(5).state_dict()
    config = {
        **cfg.to_flat(),
        "run-id": run,
        "server-round": 1,
        "server-head": "",
        "declaration-json": run_declaration(cfg).model_dump_json(),
    }
    return Message(
        RecordDict({"arrays": ArrayRecord(theta), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize("task", [TASK_EP, TASK_PATH])
def test_a_deployed_site_resolves_the_plugin_and_reads_its_own_npz(tmp_path, task):
    """The ClientApp a SuperNode runs, with a deployed site's node config: its own
    directory (manifest, approval) and its data where it keeps it (``data=...``)."""
    from clients.app import make_client_app
    from fedmeta.data.tasks.digits import _all_digits, class_split

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = RunConfig(sites=3, inner_steps=2, task=task, model=MODEL)
    site_dir = tmp_path / SITE
    site_dir.mkdir()
    SitePaths(site_dir).manifest.write_text(example_site_on_bundled_data())
    approve(site_dir, run_declaration(cfg))
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-dir": str(site_dir), "site-id": SITE},
        state=RecordDict(),
        run_config={},
    )
    reply = make_client_app()(deployed_message(cfg, "run-plugin"), ctx)
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["declined"] == 0, dict(reply.content["info"])
    assert reply.content["arrays"]["features.2.weight"].numpy().shape == (64, 64)

    # the same node on the bundled digits task, its records in an npz outside its directory
    x, y = _all_digits()
    keep = np.isin(y, class_split()["train"][:6])
    npz = tmp_path / "elsewhere" / "scans.npz"
    npz.parent.mkdir()
    np.savez(
        npz,
        train_images=(x[keep][:, 0] * 255).astype(np.uint8),
        train_labels=y[keep].reshape(-1, 1),
    )
    digits = RunConfig(sites=3, inner_steps=2)
    approve(site_dir, run_declaration(digits))
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-dir": str(site_dir), "site-id": SITE, "data": str(npz)},
        state=RecordDict(),
        run_config={},
    )
    reply = make_client_app()(deployed_message(digits, "run-npz"), ctx)
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["declined"] == 0, dict(reply.content["info"])
    assert not list(site_dir.glob("*.npz")) and not (site_dir / "images").exists()
    from fedmeta.site import Site

    records = Site(SITE, 0, site_dir, digits, simulated=False, data_path=npz).records
    assert len(records) == int(keep.sum()) and records.record_ids[0] == "train-0"


@pytest.mark.parametrize(
    "option, spec",
    [
        ("model", "os:getcwd"),
        ("task", "subprocess:Popen"),
        ("model", "fedmeta.audit.keys:create_key"),
    ],
)
def test_a_deployed_site_refuses_code_it_did_not_install(tmp_path, option, spec):
    """The coordinator names the task and model; a deployed site imports only what it
    installed as a fedmeta plug-in, and declines anything else on record."""
    from clients.app import make_client_app
    from fedmeta.audit import verify_log
    from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = RunConfig(sites=3, inner_steps=2)
    site_dir = tmp_path / SITE
    site_dir.mkdir()
    SitePaths(site_dir).manifest.write_text(example_site_on_bundled_data())
    approve(site_dir, run_declaration(cfg))
    msg = deployed_message(cfg, "run-evil")
    msg.content["config"][option] = spec
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-dir": str(site_dir), "site-id": SITE},
        state=RecordDict(),
        run_config={},
    )
    reply = make_client_app()(msg, ctx)
    assert not reply.has_error(), reply.error
    info = dict(reply.content["info"])
    assert reply.content["metrics"]["declined"] == 1
    assert f"option '{option}'" in info["reason"] and "installed" in info["reason"]
    last = json.loads((site_dir / AUDIT_LOG).read_text().splitlines()[-1])
    assert last["rule_ids"] == ["SITE-CONFIG"] and spec in last["details"]["reason"]
    assert verify_log(site_dir / AUDIT_LOG).ok


@pytest.mark.slow
def test_entry_point_task_in_ray_workers(tmp_path):
    """The run-time failure of the issue: Ray site processes must resolve the task too."""
    res = fedmeta(
        "simulate",
        "--task",
        TASK_EP,
        "--sites",
        "2",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "fraction-train=1.0",
        "--set",
        "eval-episodes=3",
        "--set",
        f"model={MODEL}",
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["epsilon"]) == {"site-0", "site-1"} and not summary["declined_rounds"]


def _flwr_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def stop_local_superlink(home: Path) -> None:
    for pid in processes_with_env("FLWR_HOME", str(home)):
        os.kill(pid, signal.SIGTERM)


def run_flwr(
    app: Path, cwd: Path, run_config: str, home: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`flwr run APP` from ``cwd``; the ServerApp's relative out-dir is relative to ``cwd``."""
    runs = cwd / "runs" / "flwr"  # out-dir = "runs/flwr/{run}": a directory per run
    try:
        res = subprocess.run(
            [*loopback_only(), "flwr", "run", str(app), "--stream", "--run-config", run_config],
            cwd=cwd,
            env=_flwr_env(home),
            capture_output=True,
            text=True,
            timeout=400,
        )
        deadline = time.monotonic() + 60
        while not list(runs.glob("*/summary.json")) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        stop_local_superlink(home)
    found = list(runs.glob("*/summary.json"))
    return res, found[0] if len(found) == 1 else runs / "(no single run)" / "summary.json"


@pytest.mark.slow
def test_plugin_through_flwr_run_from_a_directory_with_its_own_modules(tmp_path):
    """`flwr run APP` of a plug-in task, from a directory whose ``server.py``, ``clients/``
    and ``policies/`` would shadow fedmeta's (test_working_directory.py): the ServerApp and
    ClientApps resolve the plug-in and import fedmeta's own packages, never the user's."""
    app = copy_project(tmp_path / "app")
    user_dir = shadowing_project(tmp_path / "my-flower-project")
    res, summary = run_flwr(
        app,
        user_dir,
        f'rounds=1 eval-episodes=3 task="{TASK_EP}" model="{MODEL}"',
        tmp_path / "flwr-home",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(summary.read_text())
    assert data["task"] == TASK_EP and set(data["epsilon"]) == {"site-0", "site-1"}
    assert summary.is_relative_to(user_dir)  # Flower runs the app in the caller's cwd
    assert shadows_in(user_dir)
