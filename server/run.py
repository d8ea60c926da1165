"""The server's side of a run, round by round.

1. open the server's audit log and record the run's start (config and declaration hashes),
2. learn which sites are connected and their public manifests (a ``query`` message),
3. evaluate the run-level rules (lawful basis, Art. 9, transfers per site, DP offered,
   minimum sites); every decision is audited, denied sites are never sampled,
4. hand over to the strategy (Reptile or the FedAvg baseline) for ``rounds`` rounds;
   the strategy audits each round's start, the sites' receipts and its end and closes
   it with a signed checkpoint, whose head the next round sends to the sites,
5. evaluate theta on held-out classes/tasks, one metrics line per round,
6. save the final model and a summary.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from logging import WARNING, getLogger
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmeta.audit import AuditLog
from fedmeta.config import RunConfig, adapt_lr, build_task, run_declaration
from fedmeta.deploy.binding import bind_site
from fedmeta.meta.adaptation import meta_evaluate
from fedmeta.meta.updates import model_digest
from fedmeta.metrics import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    append_jsonl,
    save_model,
    write_json,
)
from fedmeta.privacy.noise import noise_statement
from policies import (
    SiteManifest,
    check_min_sites,
    eligible_sites,
    evaluate_run,
)
from server.strategy.fedavg import FedAvgBaseline
from server.strategy.fomaml import FOMAML
from server.strategy.reptile import Reptile
from server.strategy.sites import RoundLog

log = getLogger(__name__).log
RoundCallback = Callable[[dict[str, Any]], None]
EVAL_SEED_OFFSET = 10_007
SERVER_AUDIT_LOG = Path("audit") / "server-audit-log.jsonl"
SERVER_AUDIT_KEY = Path("keys") / "server-audit-signing.pem"
DECISIONS_FILE = "policy-decisions.json"
TRANSPORT_ENV = "FEDMETA_TRANSPORT"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def transport_mode(grid: Grid) -> str:
    """How sites are reached: set by fedmeta's start scripts (``FEDMETA_TRANSPORT``:
    ``tls+supernode-auth`` or ``insecure``); an in-memory grid is a simulation."""
    if type(grid).__name__ == "InMemoryGrid":
        return "simulation"
    return os.environ.get(TRANSPORT_ENV, "not recorded")


def discover_sites(grid: Grid, cfg: RunConfig, config: ConfigRecord
                   ) -> tuple[dict[int, str], dict[str, SiteManifest], dict[str, str]]:
    """(node id -> site id, site id -> manifest, node/site -> why unusable)."""
    deadline = time.monotonic() + cfg.node_wait_s
    while len(list(grid.get_node_ids())) < cfg.sites and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY,
                    dst_node_id=n) for n in nodes]
    sites: dict[int, str] = {}
    manifests: dict[str, SiteManifest] = {}
    problems: dict[str, str] = {}
    # replies come as soon as every node answered; a cold node may need long to start
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error() or "site" not in reply.content.config_records:
            reason = reply.error.reason if reply.has_error() else "no site record"
            problems[f"node-{node}"] = f"did not identify itself ({reason})"[:300]
            log(WARNING, "node %s did not identify itself", node)
            continue
        info = reply.content["site"]
        site_id, refused = bind_site(node, str(info["site-id"]))  # registry, not the claim
        if site_id is None:
            problems[f"node-{node}"] = refused
            log(WARNING, "node %s refused: %s", node, refused)
            continue
        try:
            manifest = SiteManifest.model_validate_json(str(info.get("manifest-json", "")))
        except ValueError as exc:
            problems[site_id] = f"unreadable manifest ({str(exc).splitlines()[0]})"[:300]
            continue
        if manifest.site_id != site_id or site_id in manifests:
            problems[site_id] = "manifest site id differs from the node's or is duplicated"
            continue
        sites[node] = site_id
        manifests[site_id] = manifest
    return sites, manifests, problems


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


ANCHOR_MESSAGE = "query.runend"


def anchor_run_end(grid: Grid, site_of_node: dict[int, str], rounds: dict[int, RoundLog],
                   config: ConfigRecord, head: str, timeout: float) -> dict[str, str]:
    """Send the server log's final head to every site that took part in a round; each
    logs it (``run.anchor``) in its own log, so the end of the run is anchored outside
    the server. Returns site -> the receipt of the site's anchor entry, or why none came
    back (a site that cannot be reached does not fail the finished run)."""
    sampled = {s for rl in rounds.values() for s in rl.sampled}
    nodes = {n: s for n, s in site_of_node.items() if s in sampled}
    if not nodes:
        return {}
    anchor = ConfigRecord({**config, "server-head": head})
    msgs = [Message(RecordDict({"config": anchor}), message_type=ANCHOR_MESSAGE,
                    dst_node_id=n) for n in sorted(nodes)]
    out = {s: "no reply" for s in nodes.values()}
    try:
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            site = nodes.get(reply.metadata.src_node_id)
            if site is None:
                continue
            if reply.has_error() or "info" not in reply.content.config_records:
                reason = reply.error.reason if reply.has_error() else "no receipt"
                out[site] = f"not anchored ({reason})"[:200]
                continue
            out[site] = str(reply.content["info"].get("receipt", ""))[:200]
    except Exception as exc:  # the run is finished and saved: never fail it here
        log(WARNING, "could not anchor the end of the run at the sites: %s", exc)
    return out


def run_server(grid: Grid, cfg: RunConfig, on_round: RoundCallback | None = None) -> dict:
    """Run the whole federation from the server's side; returns the summary dict."""
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves cores to sites
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG_FILE)
    run_id = new_run_id()
    started = time.time()
    task = build_task(cfg)
    out_dim = task.out_dim(cfg.strategy)
    declaration = run_declaration(cfg)
    declaration_json = declaration.model_dump_json()
    audit = AuditLog.open(out / SERVER_AUDIT_LOG, out / SERVER_AUDIT_KEY, actor="server")
    transport = transport_mode(grid)
    audit.append("run.start", run_id=run_id, details={
        "task": cfg.task, "strategy": cfg.strategy, "rounds": cfg.rounds, "dp": cfg.dp,
        "purpose": declaration.purpose, "config_sha256": _sha((out / CONFIG_FILE).read_text()),
        "declaration_sha256": declaration.sha256(), "transport": transport,
        "serverapp_tls": None if transport == "simulation" else "--insecure" not in sys.argv})
    if transport == "insecure":  # durable before any message leaves
        log(WARNING, "INSECURE deployment: no TLS, no node authentication (asked for by name)")
        audit.append("security.insecure", run_id=run_id, decision="allow", details={
            "transport": "insecure", "tls": False, "supernode_auth": False,
            "requested_by": "start-superlink.sh --insecure"})
    round_config = ConfigRecord({**cfg.to_flat(), "run-id": run_id,
                                 "declaration-json": declaration_json})

    sites, manifests, problems = discover_sites(grid, cfg, round_config)
    for name, reason in sorted(problems.items()):
        audit.append("site.unusable", run_id=run_id, decision="deny",
                     details={"site": name, "reason": reason})
    decisions = evaluate_run(declaration, list(manifests.values())) if manifests else []
    for d in decisions:
        audit.append("policy.run", run_id=run_id, decision=d.outcome.value,
                     rule_ids=[d.rule_id], details={
                         "site": d.site_id, "reason": d.reason[:500],
                         "references": "; ".join(d.references)[:500],
                         "conflict": d.conflict})
    eligible = {m.site_id for m in eligible_sites(decisions, list(manifests.values()))}
    denied = {d.site_id: f"{d.rule_id}: {d.reason}" for d in decisions
              if d.denied and d.site_id and d.site_id not in eligible}
    min_sites = max(cfg.min_sites, declaration.min_sites_per_round)
    write_json(out / DECISIONS_FILE, {
        "run": run_id, "declaration": declaration.model_dump(mode="json"),
        "manifests": {k: m.model_dump(mode="json") for k, m in manifests.items()},
        "decisions": [d.to_dict() for d in decisions], "unusable": problems,
        "eligible": sorted(eligible)})

    if cfg.strategy in ("reptile", "fomaml"):
        meta = FOMAML if cfg.strategy == "fomaml" else Reptile
        strategy: Reptile | FedAvgBaseline = meta(
            beta0=cfg.meta_lr, beta_final=cfg.meta_lr_final, num_rounds=cfg.rounds,
            fraction_train=cfg.fraction_train)
    else:
        strategy = FedAvgBaseline(fraction_train=cfg.fraction_train)
    strategy.setup_sites(sites={n: s for n, s in sites.items() if s in eligible}, seed=cfg.seed,
                         min_sites=min_sites, node_wait_s=cfg.node_wait_s,
                         max_update_norm=cfg.max_update_norm, audit=audit, run_id=run_id)
    gate = check_min_sites(declaration, len(eligible))
    if len(eligible) < min_sites:
        strategy.stopped = (f"{len(eligible)} eligible site(s), fewer than the declared minimum "
                            f"of {min_sites}; the run was not started ({gate.rule_id})")
        log(WARNING, strategy.stopped)
        audit.append("run.stop", run_id=run_id, decision="deny", rule_ids=[gate.rule_id],
                     details={"reason": strategy.stopped[:500]})

    torch.manual_seed(cfg.seed)
    model = task.build_model(out_dim)
    initial = ArrayRecord(model.state_dict())
    last_eval: dict[str, Any] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rl = strategy.rounds.get(server_round, RoundLog(server_round))
        line: dict[str, Any] = {"run": run_id, "round": server_round, "strategy": cfg.strategy,
                                "task": cfg.task, "model_sha256": model_digest(
                                    {k: a.numpy() for k, a in arrays.items()})}
        if server_round > 0:
            line.update({k: v for k, v in vars(rl).items() if k != "round"})
        else:
            line.update({"eligible": sorted(eligible), "denied": denied,
                         "unusable": problems})
        due = (server_round == 0 or server_round == cfg.rounds
               or (cfg.eval_every and server_round % cfg.eval_every == 0))
        metrics = None
        if due and task.server_eval and not (strategy.stopped
                                             and server_round not in (0, cfg.rounds)):
            res = meta_evaluate(task, _state(arrays), out_dim, split=cfg.eval_split,
                                episodes=cfg.eval_episodes, shots=cfg.eval_shots,
                                query=cfg.eval_query, steps=cfg.adapt_steps,
                                lr=adapt_lr(cfg, task), seed=cfg.seed + EVAL_SEED_OFFSET)
            line["eval"] = {"metric": res.metric, "adapted": res.adapted,
                            "adapted_ci95": res.adapted_ci95, "unadapted": res.unadapted,
                            "episodes": res.episodes, "shots": cfg.eval_shots,
                            "n_way": task.meta_out_dim()}
            last_eval.clear()
            last_eval.update(line["eval"])
            metrics = MetricRecord(res.as_metrics())
        line["elapsed_s"] = round(time.time() - started, 3)
        append_jsonl(out / METRICS_FILE, line)
        if on_round:
            on_round(line)
        return metrics

    try:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds,
                                timeout=cfg.round_timeout_s, train_config=round_config,
                                evaluate_fn=evaluate)
        final = result.arrays if len(result.arrays) else initial
        model_path = save_model(out, _state(final), task=cfg.task, strategy=cfg.strategy,
                                out_dim=out_dim, run=run_id)
        epsilon: dict[str, float] = {}
        declined: dict[str, int] = {}
        exclusions: dict[str, dict[str, int | str]] = {}
        for rl in strategy.rounds.values():
            epsilon.update(rl.epsilon)
            exclusions.update(rl.exclusions)
            for site in rl.declined:
                declined[site] = declined.get(site, 0) + 1
        summary = {
            "run": run_id, "task": cfg.task, "strategy": cfg.strategy, "rounds": cfg.rounds,
            "sites": sorted(sites.values()), "eligible": sorted(eligible), "denied": denied,
            "epsilon": epsilon, "declined_rounds": declined, "exclusions": exclusions,
            "dp": cfg.dp, "eval": last_eval, "stopped": strategy.stopped,
            "noise": noise_statement(cfg.noise_source, transport) if cfg.dp else None,
            "model_sha256": model_digest({k: a.numpy() for k, a in final.items()}),
            "wall_s": round(time.time() - started, 2),
        }
        audit.append("run.end", run_id=run_id, decision="allow" if not strategy.stopped
                     else "deny", model_out=summary["model_sha256"],
                     details={"stopped": (strategy.stopped or "")[:500] or None,
                              # the files the report shows, bound to this signed entry
                              "model_file_sha256": _file_sha(model_path),
                              "metrics_sha256": _file_sha(out / METRICS_FILE)})
        summary["audit_head"] = str(audit.checkpoint(run_id, None))
        summary["anchors"] = anchor_run_end(grid, strategy.site_of_node, strategy.rounds,
                                            round_config, summary["audit_head"],
                                            cfg.round_timeout_s)
        write_json(out / SUMMARY_FILE, summary)
        return summary
    finally:
        audit.close()
