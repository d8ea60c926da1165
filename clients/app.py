"""Flower ClientApp (``clients.app:app``): one institution's node.

Thin wiring: find the site (simulation: ``partition-id``; deployment:
``--node-config 'site-dir="..."'``), hand the round to ``fedmeta.site.Site``,
turn its answer into a reply every strategy can handle (same metric keys on
every reply, declines included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.config import ConfigError, RunConfig
from fedmeta.deploy.runrecord import RECORD_FILES
from fedmeta.netns import ray_on_loopback
from fedmeta.offline import no_call_home
from fedmeta.paths import simulated_site_id
from fedmeta.site_files import load_manifest, simulation_site_dir, site_audit_log
from policies import RunDeclaration

if TYPE_CHECKING:  # a deployed node starts a process per message: only training imports
    import torch  # torch and Opacus (fedmeta.site), which take seconds

    from fedmeta.site import Site, SiteReply

no_call_home()
# `flwr run` (local simulation): Flower's flwr-simulation process loads this module, then
# starts Ray in the same thread: Ray reads this when imported and binds 127.0.0.1 only
ray_on_loopback()
SERVER_KEYS = {
    "server-round",
    "run-id",
    "beta",
    "declaration-json",
    "server-head",
    "server-entry",
    "server-run-start",
    *RECORD_FILES,
}
_SITES: dict[tuple[str, str], Site] = {}


def site_identity(context: Context, cfg_out_dir: str) -> tuple[str, int, Path]:
    """(site id, index of its bundled-data partition, state directory)."""
    nc = context.node_config
    if "site-dir" in nc:
        site_dir = Path(str(nc["site-dir"]))
        return str(nc.get("site-id", site_dir.name)), int(nc.get("site-index", 0)), site_dir
    index = int(nc["partition-id"])
    return simulated_site_id(index), index, simulation_site_dir(cfg_out_dir, index)


def get_site(context: Context, cfg: RunConfig) -> Site:
    from fedmeta.site import Site

    site_id, index, site_dir = site_identity(context, cfg.out_dir)
    key = (str(site_dir), cfg.model_dump_json())
    if key not in _SITES:
        # a node with a site-dir is deployed: its own files decide, whatever the config says
        simulated = "site-dir" not in context.node_config
        data = context.node_config.get("data")  # where the site keeps its data, if elsewhere
        _SITES[key] = Site(
            site_id,
            index,
            site_dir,
            cfg,
            simulated=simulated,
            data_path=str(data) if data else None,
        )
    return _SITES[key]


def reply_record(reply: SiteReply) -> RecordDict:
    """Every field that leaves the site (docs/threat-model.md says why each is safe).

    No un-noised statistic of the private batch: the training loss stays in the
    site's own log, exclusion counts are already suppressed below the site's
    minimum cohort size ("<k"), and the total counts only released counts.
    """
    released = sum(v for v in reply.excluded.values() if isinstance(v, int))
    metrics = MetricRecord(
        {
            "num-examples": reply.num_examples,
            "declined": int(reply.declined),
            "steps": reply.steps,
            "epsilon-round": float(reply.epsilon_round),
            "epsilon-total": float(reply.epsilon_total),
            "dp": int(reply.dp),
            "excluded": int(released),
        }
    )
    arrays = ArrayRecord(reply.state) if reply.state is not None else ArrayRecord()
    info = ConfigRecord(
        {
            "site-id": reply.site_id,
            "reason": reply.reason,
            "exclusions": json.dumps(reply.excluded, sort_keys=True),
            "receipt": reply.receipt,
        }
    )
    return RecordDict({"arrays": arrays, "metrics": metrics, "info": info})


def server_round_refused(
    site: Site, sent, declaration: RunDeclaration | None, theta: dict[str, torch.Tensor]
) -> SiteReply | None:
    """A deployed site's check that the round is signed by the federation's pinned server
    key (fedmeta.deploy.serverkey); the refusal, if any, is audited at the site."""
    from fedmeta.deploy.serverkey import check_round, decline_round
    from fedmeta.meta.updates import model_digest

    run_id, server_round = str(sent["run-id"]), int(sent["server-round"])
    problem = check_round(
        site.site_dir,
        sent,
        run_id,
        server_round,
        declaration.sha256() if declaration is not None else None,
        model_digest({k: v.detach().cpu().numpy() for k, v in theta.items()}),
    )
    if problem is None:
        return None
    return decline_round(site.site_dir, site.site_id, run_id, server_round, problem)


def log_app_once(
    site: Site, context: Context, run_id: str, declaration: RunDeclaration | None
) -> None:
    """Once per run, the site logs which code it runs and which declaration (``run.app``)."""
    if "fedmeta-app" in context.state.config_records:
        return
    from fedmeta.deploy.apphash import app_sha256, fab_hash_prefix

    with site.audit_log() as log:
        log.append(
            "run.app",
            run_id=run_id,
            details={
                "app_sha256": app_sha256(),
                "fab_hash_prefix": fab_hash_prefix(),
                "declaration_sha256": declaration.sha256() if declaration is not None else None,
            },
        )
    context.state["fedmeta-app"] = ConfigRecord({"logged": run_id})


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp; ``cfg`` fixes the run config (simulate), else it comes with each message."""
    app = ClientApp()

    def run_config(msg: Message) -> RunConfig:
        sent = msg.content["config"]
        return cfg or RunConfig.from_flat(
            {k: v for k, v in sent.items() if k not in SERVER_KEYS}, source="round config"
        )

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        """Who this site is and its (public) manifest, for the server's run-level rules."""
        run_cfg = run_config(msg)
        site_id, index, site_dir = site_identity(context, run_cfg.out_dir)
        manifest = load_manifest(site_dir, site_id, run_cfg)
        record = RecordDict(
            {
                "site": ConfigRecord(
                    {
                        "site-id": site_id,
                        "site-index": index,
                        # json.dumps keeps an unlimited budget (epsilon_max = inf) as Infinity
                        "manifest-json": json.dumps(manifest.model_dump(mode="json")),
                    }
                )
            }
        )
        return Message(record, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fedmeta.data.tasks.registry import check_site_imports
        from fedmeta.site import decline_unreadable_round

        torch.set_num_threads(1)
        sent = msg.content["config"]
        try:
            round_cfg = run_config(msg)
            if "site-dir" in context.node_config:  # deployed: only plug-ins it installed
                check_site_imports(round_cfg.task, round_cfg.model)
        except ConfigError as exc:
            if "site-dir" not in context.node_config:
                raise
            # a deployed site refuses, on record, a round config it cannot accept
            site_id, _, site_dir = site_identity(context, "")
            reply = decline_unreadable_round(
                site_dir,
                site_id,
                str(sent.get("run-id", "-")) or "-",
                int(sent.get("server-round", 0)),
                f"round config refused: {exc}",
            )
            return Message(reply_record(reply), reply_to=msg)
        site = get_site(context, round_cfg)
        declaration = None
        if sent.get("declaration-json"):
            declaration = RunDeclaration.model_validate_json(str(sent["declaration-json"]))
        theta = msg.content["arrays"].to_torch_state_dict()
        if "site-dir" in context.node_config:  # the round must be the pinned server's
            refused = server_round_refused(site, sent, declaration, theta)
            if refused is not None:
                return Message(reply_record(refused), reply_to=msg)
            log_app_once(site, context, str(sent["run-id"]), declaration)
        reply = site.train_round(
            theta,
            str(sent["run-id"]),
            int(sent["server-round"]),
            declaration,
            str(sent.get("server-head", "")),
        )
        return Message(reply_record(reply), reply_to=msg)

    @app.query("runend")
    def anchor_run_end(msg: Message, context: Context) -> Message:
        """Log the server's final head (``run.anchor``) so that the end of the run is
        anchored in this site's own log; reply with the receipt of that entry."""
        from fedmeta.audit import Receipt

        sent = msg.content["config"]
        head = Receipt.parse(str(sent.get("server-head", "")))  # one-line error if malformed
        site_id, _, site_dir = site_identity(context, run_config(msg).out_dir)
        with site_audit_log(site_dir, site_id) as log:
            entry = log.append(
                "run.anchor", run_id=str(sent["run-id"]), details={"server_head": str(head)}
            )
            if "site-dir" in context.node_config:  # keep the run's public record
                from fedmeta.deploy.runrecord import keep_run_record

                keep_run_record(site_dir, str(sent["run-id"]), head, sent, log)
        return Message(
            RecordDict(
                {"info": ConfigRecord({"site-id": site_id, "receipt": str(entry.receipt())})}
            ),
            reply_to=msg,
        )

    return app


app = make_client_app()
