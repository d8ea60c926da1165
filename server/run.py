"""The server's side of a run, round by round.

1. open the server's audit log and record the run's start (config and declaration hashes),
2. learn which sites are connected and their public manifests (a ``query`` message),
3. evaluate the run-level rules (lawful basis, Art. 9, transfers per site, DP offered,
   minimum sites); every decision is audited, denied sites are never sampled,
4. check, before any message leaves, that DP-SGD can train the model at all (fedmeta's
   ``check_dp_model`` and Opacus's ``ModuleValidator``): a model no site could train
   is refused and the run is not started,
5. run ``rounds`` rounds of the strategy (Reptile or the FedAvg baseline) through its
   Flower hooks (``configure_train``/``aggregate_train``); the strategy audits each
   round's start, the sites' receipts and its end and closes it with a signed audit
   checkpoint, whose head the next round sends to the sites. The loop is fedmeta's
   own (not ``Strategy.start``) so that a run can stop early and resume:
   ``fedmeta.failures.RunWatch`` stops a failing run, and every ``checkpoint-every``
   rounds theta and the strategy state are saved (``fedmeta.checkpoints``, hash in
   the log),
6. evaluate theta on held-out classes/tasks, one metrics line per round, handed to
   the round callbacks (``fedmeta.rounds``),
7. save the final model (only if some round was aggregated) and a summary whose
   ``status`` is ``completed`` or ``failed`` (with the reasons, one line per site).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from logging import INFO, WARNING, getLogger
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log as flwr_log
from pydantic import ValidationError

from fedmeta.audit import AuditLog
from fedmeta.audit.verify import read_log
from fedmeta.checkpoints import (
    CHECKPOINT_ACTION,
    RESUME_ACTION,
    Checkpoint,
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
)
from fedmeta.config import RunConfig, adapt_lr, build_task, run_declaration
from fedmeta.deploy.apphash import app_sha256, fab_hash_prefix
from fedmeta.deploy.binding import bind_site
from fedmeta.deploy.runner import end_line, progress_line
from fedmeta.deploy.runrecord import out_dir_for, record_for_sites
from fedmeta.deploy.serverkey import RUN_START_KEY, entry_line, federation_key
from fedmeta.deploy.templates import TRANSPORT_INSECURE, TRANSPORT_SECURE
from fedmeta.failures import RunWatch, one_line_error
from fedmeta.meta.adaptation import meta_evaluate
from fedmeta.meta.updates import model_digest
from fedmeta.metrics import (
    append_jsonl,
    save_model,
    write_json,
)
from fedmeta.paths import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DECISIONS_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SERVER_AUDIT_KEY,
    SERVER_AUDIT_LOG,
    SERVER_AUDIT_PUBKEY,
    SUMMARY_FILE,
    TRANSPORT_ENV,
)
from fedmeta.privacy.noise import noise_statement
from fedmeta.rounds import emit
from policies import (
    SiteManifest,
    check_min_sites,
    eligible_sites,
    evaluate_run,
)
from policies.validation import format_validation_error
from server.strategy.fedavg import FedAvgBaseline
from server.strategy.fomaml import FOMAML
from server.strategy.reptile import Reptile
from server.strategy.sites import RoundLog, SiteAwareMixin, digest

log = getLogger(__name__).log
EVAL_SEED_OFFSET = 10_007


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


SIMULATION = "simulation"
NOT_RECORDED = "not recorded"
TRANSPORTS = (SIMULATION, TRANSPORT_SECURE, TRANSPORT_INSECURE)


def stated_transport() -> str:
    """How sites are reached, as the ServerApp's launcher exported it (``FEDMETA_TRANSPORT``:
    ``tls+supernode-auth`` or ``insecure`` from fedmeta's start scripts, ``simulation``
    from ``fedmeta simulate``); ``not recorded`` when nothing says."""
    return os.environ.get(TRANSPORT_ENV) or NOT_RECORDED


def serverapp_tls(transport: str) -> bool | None:
    """Whether the ServerApp reached its SuperLink over TLS, from the stated transport
    (None: a simulation, which has no SuperLink, or a transport nobody stated)."""
    return {TRANSPORT_SECURE: True, TRANSPORT_INSECURE: False}.get(transport)


def discover_sites(
    grid: Grid, cfg: RunConfig, config: ConfigRecord
) -> tuple[dict[int, str], dict[str, SiteManifest], dict[str, str]]:
    """(node id -> site id, site id -> manifest, node/site -> why unusable)."""
    deadline = time.monotonic() + cfg.node_wait_s
    while len(list(grid.get_node_ids())) < cfg.sites and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
        for n in nodes
    ]
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
        except ValidationError as exc:
            problems[site_id] = f"unreadable manifest ({format_validation_error(exc, '')})"[:300]
            continue
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


def anchor_run_end(
    grid: Grid,
    site_of_node: dict[int, str],
    rounds: dict[int, RoundLog],
    config: ConfigRecord,
    head: str,
    timeout: float,
) -> dict[str, str]:
    """Send the server log's final head to every site that took part in a round; each
    logs it (``run.anchor``) in its own log, so the end of the run is anchored outside
    the server. Returns site -> the receipt of the site's anchor entry, or why none came
    back (a site that cannot be reached does not fail the finished run)."""
    sampled = {s for rl in rounds.values() for s in rl.sampled}
    nodes = {n: s for n, s in site_of_node.items() if s in sampled}
    if not nodes:
        return {}
    anchor = ConfigRecord({**config, "server-head": head})
    msgs = [
        Message(RecordDict({"config": anchor}), message_type=ANCHOR_MESSAGE, dst_node_id=n)
        for n in sorted(nodes)
    ]
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


# ---- set-up checks ------------------------------------------------------------------------
def example_input(task: Any, cfg: RunConfig) -> torch.Tensor | None:
    """One input of the task's shape, from public data only (an evaluation episode of the
    bundled task, or zeros of the agreed feature count); None when the server has none."""
    custom = getattr(task, "example_input", None)
    if callable(custom):
        return torch.as_tensor(custom())
    try:
        if task.server_eval:
            episode = task.eval_episode("test", np.random.default_rng(cfg.seed), 1, 1)
            return torch.from_numpy(np.ascontiguousarray(episode.support_x[:1]))
    except Exception as exc:  # noqa: BLE001 - no example: the sites still check
        log(WARNING, "no example input for the set-up model check (%s)", exc)
        return None
    if cfg.features > 0:
        return torch.zeros(1, cfg.features)
    return None


def model_problem(task: Any, cfg: RunConfig, model: torch.nn.Module) -> tuple[str | None, str]:
    """(why no site could train ``model`` under DP, or None; the clipping mode checked).

    fedmeta's own check (``check_dp_model``: buffers, loss, per-sample gradients of the
    clipping mode, the check every site repeats before charging its ledger), then
    Opacus's ``ModuleValidator``. Run once at set-up, before any message leaves."""
    if not cfg.dp:
        return None, "dp off"
    from opacus.validators import ModuleValidator

    from fedmeta.privacy.model_check import DPModelError, check_dp_model

    example = example_input(task, cfg)
    mode = "not checked (no example input)"
    if example is not None:
        try:
            mode = check_dp_model(model, task.loss_fn(), cfg.grad_sample_mode, example)
        except DPModelError as exc:
            return f"DP model check: {one_line_error(str(exc))}", cfg.grad_sample_mode
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        return (
            f"Opacus ModuleValidator: {one_line_error(str(errors[0]))}"
            f"{f' (+{len(errors) - 1} more)' if len(errors) > 1 else ''}"
        ), mode
    return None, mode


# ---- resume ------------------------------------------------------------------------------
class ResumePoint:
    """Where a stopped run continues: its run id, the verified checkpoint (or none: from
    the initial weights), and the next round number never used by this run."""

    def __init__(
        self,
        run_id: str,
        checkpoint: Checkpoint | None,
        next_round: int,
        last_started: int,
        start_entry: Any,
    ) -> None:
        self.run_id, self.checkpoint = run_id, checkpoint
        self.start_entry = start_entry  # the run's signed run.start (sites check it)
        self.next_round, self.last_started = next_round, last_started

    @property
    def checkpoint_round(self) -> int:
        return self.checkpoint.round if self.checkpoint else 0


def resume_point(out: Path) -> ResumePoint:
    """Read the server's audit log (verified) and the signed checkpoints of ``out``."""
    log_path = out / SERVER_AUDIT_LOG
    if not log_path.is_file():
        raise CheckpointError(f"{out}: no server audit log; nothing to resume here")
    entries, result = read_log(log_path)
    if not result.ok:
        raise CheckpointError(
            f"{log_path}: does not verify ({result.problem}); check it with "
            "`fedmeta audit verify` (a log cut by a kill: `fedmeta audit "
            "repair`) before resuming"
        )
    starts = [e for e in entries if e.action == "run.start"]
    if not starts:
        raise CheckpointError(f"{log_path}: no run was started in {out}")
    run_id = starts[-1].run_id
    mine = [e for e in entries if e.run_id == run_id]
    ends = [e for e in mine if e.action == "run.end"]
    if ends and ends[-1].details.get("status", "completed") == "completed":
        raise CheckpointError(f"{out}: run {run_id} finished all its rounds; nothing to resume")
    config_sha = _sha((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else ""
    if starts[-1].details.get("config_sha256") != config_sha:
        raise CheckpointError(
            f"{out / CONFIG_FILE}: differs from the config run {run_id} "
            "started with; a resumed run keeps its config"
        )
    signed = {
        str(e.details.get("file")): str(e.details.get("file_sha256"))
        for e in mine
        if e.action == CHECKPOINT_ACTION
    }
    last_started = max(
        (int(e.round) for e in mine if e.action == "round.start" and e.round), default=0
    )
    checkpoint = None
    for path in reversed(checkpoint_files(out)):
        if f"{CHECKPOINT_DIR}/{path.name}" in signed:
            checkpoint = load_checkpoint(path, signed[f"{CHECKPOINT_DIR}/{path.name}"])
            if checkpoint.run != run_id:
                raise CheckpointError(f"{path}: belongs to run {checkpoint.run}, not {run_id}")
            break
    k = checkpoint.round if checkpoint else 0
    return ResumePoint(run_id, checkpoint, max(k, last_started) + 1, last_started, starts[-1])


def strategy_state(strategy: SiteAwareMixin, watch: RunWatch) -> dict[str, Any]:
    state: dict[str, Any] = {
        "kind": type(strategy).__name__,
        "server_head": strategy.server_head,
        "rounds": {str(r): asdict(rl) for r, rl in strategy.rounds.items()},
        "watch": watch.state(),
    }
    momentum = getattr(strategy, "momentum_vector", None)
    if momentum is not None:
        state["momentum"] = {k: torch.as_tensor(a.numpy()) for k, a in momentum.items()}
    return state


def restore_strategy(strategy: SiteAwareMixin, watch: RunWatch, state: dict[str, Any]) -> None:
    if state.get("kind") not in (None, type(strategy).__name__):
        raise CheckpointError(
            f"the checkpoint holds a {state['kind']} strategy, the run "
            f"config asks for {type(strategy).__name__}"
        )
    strategy.server_head = str(state.get("server_head", ""))
    strategy.rounds.update({int(r): RoundLog(**rl) for r, rl in state.get("rounds", {}).items()})
    watch.restore(dict(state.get("watch", {})))
    if "momentum" in state:
        strategy.momentum_vector = ArrayRecord(state["momentum"])  # type: ignore[attr-defined]


def _lines_of(out: Path, run_id: str) -> list[dict[str, Any]]:
    path = out / METRICS_FILE
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            rec = json.loads(text)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("run") == run_id:
            lines.append(rec)
    return lines


# ---- the run ------------------------------------------------------------------------------
@dataclass
class ServerRun:
    """What every step of one run shares: its config, ids, directory and audit log."""

    cfg: RunConfig
    point: ResumePoint | None
    run_id: str
    out: Path
    started: float
    task: Any
    out_dim: int
    declaration: Any
    audit: AuditLog
    transport: str

    @property
    def declaration_json(self) -> str:
        return str(self.declaration.model_dump_json())


@dataclass
class Admission:
    """Which sites answered, what the run-level rules decided, and who may be sampled."""

    sites: dict[int, str]
    manifests: dict[str, SiteManifest]
    problems: dict[str, str]
    decisions: list[Any]
    eligible: set[str]
    denied: dict[str, str]
    min_sites: int


def run_server(
    grid: Grid, cfg: RunConfig, resume: bool = False, transport: str | None = None
) -> dict:
    """Run the whole federation from the server's side; returns the summary dict.

    ``resume``: continue the stopped run of ``cfg.out_dir`` from its last signed
    checkpoint, with the same run id (see ``resume_point``). ``transport``: how the
    sites are reached (``simulation``, ``tls+supernode-auth`` or ``insecure``), as the
    caller states it; None: as the launcher exported it (``stated_transport``)."""
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves cores to sites
    run = open_run(cfg, resume, transport or stated_transport())
    try:
        return _run(grid, run)
    except BaseException as exc:  # a callback, Ctrl-C: on record, then re-raised
        reason = f"interrupted: {type(exc).__name__}: {one_line_error(str(exc))}"
        with contextlib.suppress(Exception):
            run.audit.append(
                "run.stop",
                run_id=run.run_id,
                decision="deny",
                details={"reason": reason[:500], "resumable": True},
            )
        raise
    finally:
        run.audit.close()


def open_run(cfg: RunConfig, resume: bool, transport: str) -> ServerRun:
    """The run's id and directory (its config saved, an earlier model removed), its
    task and declaration, and the server's audit log, open."""
    point = resume_point(Path(cfg.out_dir)) if resume else None
    run_id = point.run_id if point else new_run_id()
    if point is None:
        # out-dir = ".../{run}": a directory of its own for every run (fedmeta.deploy.runrecord)
        cfg = cfg.model_copy(update={"out_dir": out_dir_for(cfg.out_dir, run_id)})
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if point is None:
        cfg.save(out / CONFIG_FILE)
        (out / MODEL_FILE).unlink(missing_ok=True)  # never leave an earlier run's model
    started = time.time()
    task = build_task(cfg)
    return ServerRun(
        cfg=cfg,
        point=point,
        run_id=run_id,
        out=out,
        started=started,
        task=task,
        out_dim=task.out_dim(cfg.strategy),
        declaration=run_declaration(cfg),
        audit=open_server_audit(out),
        transport=transport,
    )


def open_server_audit(out: Path) -> AuditLog:
    """The server's audit log; a deployment signs with the federation's one server key
    (pinned at every site), whose public half is written next to the log's key path."""
    audit = AuditLog.open(
        out / SERVER_AUDIT_LOG, federation_key() or out / SERVER_AUDIT_KEY, actor="server"
    )
    if federation_key() is not None:
        (out / SERVER_AUDIT_PUBKEY.parent).mkdir(parents=True, exist_ok=True)
        (out / SERVER_AUDIT_PUBKEY).write_bytes(audit.public_key_pem())
    return audit


def _run(grid: Grid, run: ServerRun) -> dict:
    round_config = record_start(run)
    model, refused = check_model(run)
    admission = admit_sites(grid, run, round_config, refused)
    strategy = build_strategy(run.cfg, admission, run.audit, run.run_id)
    watch = RunWatch(sorted(admission.eligible), run.cfg.max_failed_rounds)
    theta, first_round = restore_resumed(
        run, strategy, watch, admission, ArrayRecord(model.state_dict())
    )
    refuse_start(run, strategy, admission, refused)
    recorder = RoundRecorder(run, strategy, watch, admission)
    theta, last_round = round_loop(
        grid, run, strategy, watch, recorder, round_config, theta, first_round
    )
    return _finish(
        grid, run, strategy, watch, admission, theta, last_round, recorder.last_eval, round_config
    )


def record_start(run: ServerRun) -> ConfigRecord:
    """Audit the run's start (or its resumption) and an insecure transport, durable
    before any message leaves; returns the config every message to a site carries."""
    cfg, point, audit, transport = run.cfg, run.point, run.audit, run.transport
    if point is None:
        started_entry = audit.append(
            "run.start",
            run_id=run.run_id,
            details={
                "task": cfg.task,
                "strategy": cfg.strategy,
                "rounds": cfg.rounds,
                "dp": cfg.dp,
                "purpose": run.declaration.purpose,
                "config_sha256": _sha((run.out / CONFIG_FILE).read_text()),
                "declaration_sha256": run.declaration.sha256(),
                "transport": transport,
                "app_sha256": app_sha256(),
                "fab_hash_prefix": fab_hash_prefix(),
                "serverapp_tls": serverapp_tls(transport),
            },
        )
    else:
        started_entry = point.start_entry
        audit.append(
            RESUME_ACTION,
            run_id=run.run_id,
            round=point.next_round,
            details={
                "checkpoint_round": point.checkpoint_round,
                "checkpoint": str(point.checkpoint.path.name) if point.checkpoint else None,
                "rolled_back_rounds": point.last_started - point.checkpoint_round,
                "next_round": point.next_round,
                "transport": transport,
            },
        )
    if transport == TRANSPORT_INSECURE:  # durable before any message leaves
        log(WARNING, "INSECURE deployment: no TLS, no node authentication (asked for by name)")
        audit.append(
            "security.insecure",
            run_id=run.run_id,
            decision="allow",
            details={
                "transport": "insecure",
                "tls": False,
                "supernode_auth": False,
                "requested_by": "start-superlink.sh --insecure",
            },
        )
    return ConfigRecord(
        {
            **cfg.to_flat(),
            "run-id": run.run_id,
            "declaration-json": run.declaration_json,
            RUN_START_KEY: entry_line(started_entry),
        }
    )


def check_model(run: ServerRun) -> tuple[torch.nn.Module, str | None]:
    """Build the initial model and check that DP-SGD can train it, before any message
    leaves, so no site is asked to charge its ledger for a model it would refuse;
    returns (the model, why it is refused or None)."""
    torch.manual_seed(run.cfg.seed)
    model = run.task.build_model(run.out_dim)
    refused, mode = model_problem(run.task, run.cfg, model)
    run.audit.append(
        "model.check",
        run_id=run.run_id,
        decision="deny" if refused else "allow",
        rule_ids=["PRIV-MODEL"],
        details={"reason": (refused or "")[:500] or None, "grad_sample_mode": mode},
    )
    return model, refused


def admit_sites(
    grid: Grid, run: ServerRun, round_config: ConfigRecord, refused: str | None
) -> Admission:
    """Discover the connected sites (none when the model is refused), evaluate the
    run-level rules on their manifests, audit every decision and write the decisions
    file."""
    sites: dict[int, str] = {}
    manifests: dict[str, SiteManifest] = {}
    problems: dict[str, str] = {}
    decisions: list = []
    if not refused:
        sites, manifests, problems = discover_sites(grid, run.cfg, round_config)
        problems = {k: one_line_error(v) for k, v in problems.items()}
        known = run.transport if run.transport in TRANSPORTS else None
        # the DPIA gate judges the transport it was told about
        decisions = (
            evaluate_run(run.declaration, list(manifests.values()), transport=known)
            if manifests
            else []
        )
    audit_admission(run, problems, decisions)
    eligible = {m.site_id for m in eligible_sites(decisions, list(manifests.values()))}
    denied = {
        d.site_id: f"{d.rule_id}: {d.reason}"
        for d in decisions
        if d.denied and d.site_id and d.site_id not in eligible
    }
    admission = Admission(
        sites=sites,
        manifests=manifests,
        problems=problems,
        decisions=decisions,
        eligible=eligible,
        denied=denied,
        min_sites=max(run.cfg.min_sites, run.declaration.min_sites_per_round),
    )
    write_decisions(run, admission)
    return admission


def audit_admission(run: ServerRun, problems: dict[str, str], decisions: list[Any]) -> None:
    for name, reason in sorted(problems.items()):
        run.audit.append(
            "site.unusable",
            run_id=run.run_id,
            decision="deny",
            details={"site": name, "reason": reason},
        )
    for d in decisions:
        run.audit.append(
            "policy.run",
            run_id=run.run_id,
            decision=d.outcome.value,
            rule_ids=[d.rule_id],
            details={
                "site": d.site_id,
                "reason": d.reason[:500],
                "references": "; ".join(d.references)[:500],
                "conflict": d.conflict,
            },
        )


def write_decisions(run: ServerRun, admission: Admission) -> None:
    """The decisions file; a resumed run evaluates (and logs) the run-level rules again,
    so the file states every decision the log holds, the earlier ones first."""
    stated = [d.to_dict() for d in admission.decisions]
    unusable = dict(admission.problems)
    if run.point is not None and (run.out / DECISIONS_FILE).is_file():
        earlier = json.loads((run.out / DECISIONS_FILE).read_text())
        stated = list(earlier.get("decisions", [])) + stated
        unusable = {**dict(earlier.get("unusable", {})), **admission.problems}
    write_json(
        run.out / DECISIONS_FILE,
        {
            "run": run.run_id,
            "declaration": run.declaration.model_dump(mode="json"),
            "manifests": {k: m.model_dump(mode="json") for k, m in admission.manifests.items()},
            "decisions": stated,
            "unusable": unusable,
            "eligible": sorted(admission.eligible),
        },
    )


def build_strategy(
    cfg: RunConfig, admission: Admission, audit: AuditLog, run_id: str
) -> Reptile | FedAvgBaseline:
    """The config's strategy, set up to sample only the eligible sites."""
    strategy: Reptile | FedAvgBaseline
    if cfg.strategy in ("reptile", "fomaml"):
        meta = FOMAML if cfg.strategy == "fomaml" else Reptile
        strategy = meta(
            beta0=cfg.meta_lr,
            beta_final=cfg.meta_lr_final,
            num_rounds=cfg.rounds,
            fraction_train=cfg.fraction_train,
        )
    else:
        strategy = FedAvgBaseline(fraction_train=cfg.fraction_train)
    strategy.setup_sites(
        sites={n: s for n, s in admission.sites.items() if s in admission.eligible},
        seed=cfg.seed,
        min_sites=admission.min_sites,
        node_wait_s=cfg.node_wait_s,
        max_update_norm=cfg.max_update_norm,
        audit=audit,
        run_id=run_id,
    )
    return strategy


def restore_resumed(
    run: ServerRun, strategy: Any, watch: RunWatch, admission: Admission, initial: ArrayRecord
) -> tuple[ArrayRecord, int]:
    """(theta, first round): the initial weights from round 1, or for a resumed run the
    checkpoint's theta and strategy state and the rounds recorded after it."""
    point = run.point
    if point is None:
        return initial, 1
    theta = initial
    if point.checkpoint is not None:
        restore_strategy(strategy, watch, point.checkpoint.strategy)
        theta = ArrayRecord(point.checkpoint.theta)
    for rec in _lines_of(run.out, run.run_id):  # rounds after the checkpoint, as recorded
        r = int(rec.get("round", 0))
        if point.checkpoint_round < r < point.next_round:
            strategy.rounds[r] = RoundLog(
                **{k: rec[k] for k in RoundLog.__dataclass_fields__ if k in rec}
            )
    watch.sites = sorted(admission.eligible)
    return theta, point.next_round


def refuse_start(run: ServerRun, strategy: Any, admission: Admission, refused: str | None) -> None:
    """Stop the run before its first round when the model is refused or fewer sites
    than the minimum are eligible (audited as ``run.stop``)."""
    eligible, min_sites = admission.eligible, admission.min_sites
    if refused:
        strategy.stopped = (
            f"the model cannot be trained under DP; the run was not started ({refused})"
        )
    elif len(eligible) < min_sites:
        gate = check_min_sites(run.declaration, len(eligible))
        strategy.stopped = (
            f"{len(eligible)} eligible site(s), fewer than the declared minimum "
            f"of {min_sites}; the run was not started ({gate.rule_id})"
        )
        run_refusal = next((d for d in admission.decisions if d.denied and d.site_id is None), None)
        if run_refusal is not None:  # a run-level refusal (e.g. a gate): say which and why
            strategy.stopped = f"the run was refused: {run_refusal.rule_id}: {run_refusal.reason}"
    if strategy.stopped:
        log(WARNING, strategy.stopped)
        run.audit.append(
            "run.stop",
            run_id=run.run_id,
            decision="deny",
            rule_ids=["PRIV-MODEL" if refused else "PRIV-MIN-SITES"],
            details={"reason": strategy.stopped[:500]},
        )


class RoundRecorder:
    """Writes what a round leaves behind: its metrics line (evaluated when due, handed to
    the round callbacks) and its signed checkpoint."""

    def __init__(
        self, run: ServerRun, strategy: Any, watch: RunWatch, admission: Admission
    ) -> None:
        self.run, self.strategy, self.watch, self.admission = run, strategy, watch, admission
        self.last_eval: dict[str, Any] = {}
        point = run.point
        self.resumed_note = (
            None
            if point is None
            else {
                "checkpoint_round": point.checkpoint_round,
                "next_round": point.next_round,
                "rolled_back": list(range(point.checkpoint_round + 1, point.next_round)),
            }
        )

    def metrics_line(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        cfg, admission = self.run.cfg, self.admission
        rl = self.strategy.rounds.get(server_round, RoundLog(server_round))
        line: dict[str, Any] = {
            "run": self.run.run_id,
            "round": server_round,
            "strategy": cfg.strategy,
            "task": cfg.task,
            "model_sha256": model_digest({k: a.numpy() for k, a in arrays.items()}),
        }
        if server_round > 0:
            line.update({k: v for k, v in vars(rl).items() if k != "round"})
        else:
            line.update(
                {
                    "eligible": sorted(admission.eligible),
                    "denied": admission.denied,
                    "unusable": admission.problems,
                }
            )
        if self.resumed_note is not None:
            line["resumed"], self.resumed_note = self.resumed_note, None
        return line

    def eval_due(self, server_round: int, final: bool) -> bool:
        cfg, strategy = self.run.cfg, self.strategy
        due = server_round == 0 or final or (cfg.eval_every and server_round % cfg.eval_every == 0)
        return bool(
            due
            and self.run.task.server_eval
            and (not strategy.stopped or (server_round > 0 and self.watch.aggregated > 0))
        )

    def evaluation(self, arrays: ArrayRecord) -> dict[str, Any]:
        cfg, task = self.run.cfg, self.run.task
        res = meta_evaluate(
            task,
            _state(arrays),
            self.run.out_dim,
            split=cfg.eval_split,
            episodes=cfg.eval_episodes,
            shots=cfg.eval_shots,
            query=cfg.eval_query,
            steps=cfg.adapt_steps,
            lr=adapt_lr(cfg, task),
            seed=cfg.seed + EVAL_SEED_OFFSET,
        )
        return {
            "metric": res.metric,
            "adapted": res.adapted,
            "adapted_ci95": res.adapted_ci95,
            "unadapted": res.unadapted,
            "episodes": res.episodes,
            "shots": cfg.eval_shots,
            "n_way": task.meta_out_dim(),
        }

    def evaluate(self, server_round: int, arrays: ArrayRecord, final: bool) -> None:
        """The round's metrics line: appended, shown, and handed to the callbacks."""
        run = self.run
        line = self.metrics_line(server_round, arrays)
        if self.eval_due(server_round, final):
            line["eval"] = self.evaluation(arrays)
            self.last_eval.clear()
            self.last_eval.update(line["eval"])
        line["elapsed_s"] = round(time.time() - run.started, 3)
        append_jsonl(run.out / METRICS_FILE, line)
        if run.transport != SIMULATION and server_round > 0:  # `flwr run --stream` shows it
            print(progress_line(line, run.cfg.rounds), flush=True)
        emit(line)

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        run = self.run
        path, sha = save_checkpoint(
            run.out,
            run.run_id,
            server_round,
            _state(arrays),
            strategy_state(self.strategy, self.watch),
        )
        run.audit.append(
            CHECKPOINT_ACTION,
            run_id=run.run_id,
            round=server_round,
            model_out=digest(arrays),
            details={"file": f"{CHECKPOINT_DIR}/{path.name}", "file_sha256": sha},
        )


def round_loop(
    grid: Grid,
    run: ServerRun,
    strategy: Any,
    watch: RunWatch,
    recorder: RoundRecorder,
    round_config: ConfigRecord,
    theta: ArrayRecord,
    first_round: int,
) -> tuple[ArrayRecord, int]:
    """Rounds ``first_round``..``rounds`` through the strategy's Flower hooks, until the
    run stops; returns (theta, the last round run)."""
    cfg = run.cfg
    # Flower's own progress lines, as Strategy.start prints them (shown with --verbose)
    flwr_log(INFO, "Starting %s strategy:", type(strategy).__name__)
    log_strategy_start_info(cfg.rounds, theta, round_config, ConfigRecord())
    strategy.summary()
    if run.point is None:
        recorder.evaluate(0, theta, final=False)
    last_round = first_round - 1
    for server_round in range(first_round, cfg.rounds + 1):
        if strategy.stopped:
            break
        theta, reason = run_round(grid, run, strategy, watch, round_config, theta, server_round)
        last_round = server_round
        final = bool(reason) or server_round == cfg.rounds
        if final or (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0):
            # before the callbacks: a raising one resumes here
            recorder.checkpoint(server_round, theta)
        recorder.evaluate(server_round, theta, final)
    return theta, last_round


def run_round(
    grid: Grid,
    run: ServerRun,
    strategy: Any,
    watch: RunWatch,
    round_config: ConfigRecord,
    theta: ArrayRecord,
    server_round: int,
) -> tuple[ArrayRecord, str | None]:
    """One round: configure, send, aggregate, and judge whether the run must stop;
    returns (theta after the round, why the run stops or None)."""
    cfg = run.cfg
    flwr_log(INFO, "[ROUND %s/%s]", server_round, cfg.rounds)
    messages = list(strategy.configure_train(server_round, theta, round_config, grid))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s)) if messages else []
    new, _ = strategy.aggregate_train(server_round, replies)
    if new is not None:
        theta = new
    rl = strategy.rounds.setdefault(server_round, RoundLog(server_round))
    rl.lost = {s: one_line_error(r) for s, r in rl.lost.items()}
    reason = strategy.stopped
    if not reason:
        reason = watch.observe(
            rl.used if new is not None else [],
            rl.declined,
            rl.dropped,
            rl.lost,
            aggregated=new is not None,
        )
        if reason:
            strategy.stopped = rl.stopped = reason
            log(WARNING, "round %s: stopping the run: %s", server_round, reason)
            run.audit.append(
                "run.stop",
                run_id=run.run_id,
                round=server_round,
                decision="deny",
                details={"reason": reason[:500]},
            )
    return theta, reason


# ---- the end of the run -------------------------------------------------------------------
def _finish(
    grid: Grid,
    run: ServerRun,
    strategy: Any,
    watch: RunWatch,
    admission: Admission,
    theta: ArrayRecord,
    last_round: int,
    last_eval: dict[str, Any],
    round_config: ConfigRecord,
) -> dict:
    """Save the model (if trained), audit the run's end, anchor it at the sites and
    write the summary; returns the summary."""
    cfg = run.cfg
    trained = watch.aggregated > 0
    failure = run_failure(strategy, watch, admission, trained)
    status = "failed" if failure else "completed"
    model_path = None
    if trained:  # a run that aggregated nothing writes no model: nothing was trained
        model_path = save_model(
            run.out,
            _state(theta),
            task=cfg.task,
            strategy=cfg.strategy,
            out_dim=run.out_dim,
            run=run.run_id,
            rounds=last_round,
            aggregated_rounds=watch.aggregated,
            status=status,
        )
    # theta at the end, trained or not: the report checks this digest against the last
    # metrics line; only a trained theta is written as a model file
    digest_ = model_digest({k: a.numpy() for k, a in theta.items()})
    summary = run_summary(run, strategy, watch, admission, last_round, last_eval, failure, digest_)
    record_end(run, strategy, watch, failure, last_round, model_path, digest_)
    summary["audit_head"] = str(run.audit.checkpoint(run.run_id, None))
    summary["anchors"] = anchor_run_end(
        grid,
        strategy.site_of_node,
        strategy.rounds,
        ConfigRecord({**round_config, **record_for_sites(run.out)}),
        summary["audit_head"],
        cfg.round_timeout_s,
    )
    write_json(run.out / SUMMARY_FILE, summary)
    if run.transport != SIMULATION:  # read by `fedmeta run` for its exit code
        print(
            end_line(summary, str(run.out), sum(1 for rl in strategy.rounds.values() if rl.used)),
            flush=True,
        )
    return summary


def run_failure(
    strategy: Any, watch: RunWatch, admission: Admission, trained: bool
) -> dict[str, Any] | None:
    """Why the run failed (the reason and one line per site), or None."""
    if not (strategy.stopped or not trained):
        return None
    return {
        "reason": strategy.stopped or "no round aggregated an update",
        "sites": {
            **admission.problems,
            **{s: f"denied: {r}" for s, r in admission.denied.items()},
            **watch.problems(),
        },
    }


def run_summary(
    run: ServerRun,
    strategy: Any,
    watch: RunWatch,
    admission: Admission,
    last_round: int,
    last_eval: dict[str, Any],
    failure: dict[str, Any] | None,
    model_sha256: str,
) -> dict[str, Any]:
    """The summary (without the audit head and anchors, added once the end is logged)."""
    cfg = run.cfg
    trained = watch.aggregated > 0
    epsilon: dict[str, float] = {}
    declined: dict[str, int] = {}
    exclusions: dict[str, dict[str, int | str]] = {}
    for _, rl in sorted(strategy.rounds.items()):
        epsilon.update(rl.epsilon)
        exclusions.update(rl.exclusions)
        for site in rl.declined:
            declined[site] = declined.get(site, 0) + 1
    return {
        "run": run.run_id,
        "task": cfg.task,
        "strategy": cfg.strategy,
        "rounds": cfg.rounds,
        "sites": sorted(admission.sites.values()),
        "eligible": sorted(admission.eligible),
        "denied": admission.denied,
        "epsilon": epsilon,
        "declined_rounds": declined,
        "exclusions": exclusions,
        "dp": cfg.dp,
        "eval": last_eval,
        "stopped": strategy.stopped,
        "status": "failed" if failure else "completed",
        "failure": failure,
        "trained": trained,
        "aggregated_rounds": watch.aggregated,
        "last_round": last_round,
        "model_file": MODEL_FILE if trained else None,
        "noise": noise_statement(cfg.noise_source, run.transport) if cfg.dp else None,
        "model_sha256": model_sha256,
        "wall_s": round(time.time() - run.started, 2),
    }


def record_end(
    run: ServerRun,
    strategy: Any,
    watch: RunWatch,
    failure: dict[str, Any] | None,
    last_round: int,
    model_path: Path | None,
    model_sha256: str,
) -> None:
    """Audit the run's end, binding the model and metrics files the report shows."""
    trained = watch.aggregated > 0
    run.audit.append(
        "run.end",
        run_id=run.run_id,
        decision="allow" if not failure else "deny",
        model_out=model_sha256,
        details={
            "stopped": (strategy.stopped or "")[:500] or None,
            "status": "failed" if failure else "completed",
            "trained": trained,
            "aggregated_rounds": watch.aggregated,
            "last_round": last_round,
            "model_file_sha256": _file_sha(model_path) if model_path else None,
            "metrics_sha256": _file_sha(run.out / METRICS_FILE),
        },
    )
