"""Plug-in tasks and models from an installed package (examples/plugin): named by entry
point (group ``fedmeta.tasks``) and by ``package.module:Class``, with a ``--model``
factory; resolved the same way by the server, the inline and Ray simulations, a deployed
site's ClientApp (the code a SuperNode runs) and `flwr run` (test_flwr_run.py runs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import (
    FEDMETA,
    MODEL,
    ROOT,
    TASK_EP,
    example_site_on_bundled_data,
    fedmeta,
    install_example_plugin,
    run_inline,
)
from netcheck import (
    ADDRESSED,
    CAN_ADDRESS,
    NETWORK_MARK,
    NO_SYS_ADMIN,
    Watched,
    root_only,
    watch_run,
)

from fedmeta.approvals import approve
from fedmeta.config import RunConfig, build_task, run_declaration
from fedmeta.data.tasks import TaskError, get_task
from fedmeta.paths import ALLOW_NETWORK_ENV, SitePaths

TASK_PATH = "fedmeta_example_plugin.blobs:BlobsFewShot"


@pytest.fixture(scope="module", autouse=True)
def plugin_installed() -> None:
    install_example_plugin()


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


@pytest.fixture(scope="module")
def ray_plugin_run(tmp_path_factory: pytest.TempPathFactory, plugin_installed: None) -> Watched:
    """A real Ray simulation of the plug-in through the CLI; as root, without
    CAP_SYS_ADMIN (what an unprivileged user has) in a namespace of the test's own that
    looks like a networked machine, its listening sockets listed while it runs."""
    out = tmp_path_factory.mktemp("ray-plugin") / "run"
    args = [
        "simulate",
        "--task",
        TASK_EP,
        "--sites",
        "2",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--set",
        "fraction-train=1.0",
        "--set",
        "eval-episodes=3",
        "--set",
        f"model={MODEL}",
    ]
    if CAN_ADDRESS:
        return watch_run(
            [*ADDRESSED, *NO_SYS_ADMIN, *FEDMETA, *args], {ALLOW_NETWORK_ENV: "0"}, cwd=ROOT
        )
    return Watched(fedmeta(*args, timeout=400), set(), set(), set())


@pytest.mark.slow
def test_entry_point_task_in_ray_workers(ray_plugin_run: Watched):
    """The run-time failure of the issue: Ray site processes must resolve the task too."""
    res = ray_plugin_run.res
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = Path(res.args[res.args.index("--out") + 1])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["epsilon"]) == {"site-0", "site-1"} and not summary["declined_rounds"]


@root_only
@pytest.mark.slow
def test_without_cap_sys_admin_the_ray_run_listens_on_loopback_only(ray_plugin_run: Watched):
    """Without CAP_SYS_ADMIN the whole command runs in a user namespace of its own, and Ray
    in a loopback-only network namespace in it (as root: the suite's shared Ray run,
    test_simulation.py; README: what a simulation exposes)."""
    res, exposed, seen, userns = ray_plugin_run
    assert res.returncode == 0, res.stderr[-3000:]
    names = " ".join(seen)
    assert "gcs_server" in names and "raylet" in names, f"the check saw no Ray: {seen}"
    assert not exposed, f"listening on a non-loopback address: {sorted(exposed)}"
    # and confined: a Ray component binding 0.0.0.0 would be reachable on loopback only
    assert not [x for x in seen if x.endswith(NETWORK_MARK)], sorted(seen)
    assert "open in this machine's network" not in res.stderr
    ours = os.readlink("/proc/self/ns/user")
    assert userns - {ours} == userns and userns, userns
