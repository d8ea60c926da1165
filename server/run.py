"""The server's side of a run, round by round (DESIGN.md "One round, as data flows").

1. learn which sites are connected (a ``query`` message: site ids, nothing else),
2. build theta from the task's model and the seed,
3. hand over to the strategy (Reptile or the FedAvg baseline) for ``rounds`` rounds,
   evaluating theta on held-out classes/tasks and writing one metrics line per round,
4. save the final model and a summary.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmeta.config import RunConfig, adapt_lr, build_task
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
from server.strategy.fedavg import FedAvgBaseline
from server.strategy.reptile import Reptile
from server.strategy.sites import RoundLog

RoundCallback = Callable[[dict[str, Any]], None]
EVAL_SEED_OFFSET = 10_007


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def discover_sites(grid: Grid, cfg: RunConfig, run_id: str) -> dict[int, str]:
    """node id -> site id for the connected nodes (bounded wait for ``cfg.sites``)."""
    deadline = time.monotonic() + cfg.node_wait_s
    while len(list(grid.get_node_ids())) < cfg.sites and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"run-id": run_id})}),
                    message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    sites: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=cfg.node_wait_s):
        if reply.has_error() or "site" not in reply.content.config_records:
            log(WARNING, "node %s did not identify itself", reply.metadata.src_node_id)
            continue
        sites[reply.metadata.src_node_id] = str(reply.content["site"]["site-id"])
    return sites


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


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

    sites = discover_sites(grid, cfg, run_id)
    if cfg.strategy == "reptile":
        strategy: Reptile | FedAvgBaseline = Reptile(
            beta0=cfg.meta_lr, beta_final=cfg.meta_lr_final, num_rounds=cfg.rounds,
            fraction_train=cfg.fraction_train)
    else:
        strategy = FedAvgBaseline(fraction_train=cfg.fraction_train)
    strategy.setup_sites(sites=sites, seed=cfg.seed, min_sites=cfg.min_sites,
                         node_wait_s=cfg.node_wait_s, max_update_norm=cfg.max_update_norm)
    if len(sites) < cfg.min_sites:
        strategy.stopped = (f"{len(sites)} site(s) identified, fewer than the declared minimum "
                            f"of {cfg.min_sites}; the run was not started")
        log(WARNING, strategy.stopped)

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
        due = (server_round == 0 or server_round == cfg.rounds
               or (cfg.eval_every and server_round % cfg.eval_every == 0))
        metrics = None
        if due and not (strategy.stopped and server_round not in (0, cfg.rounds)):
            res = meta_evaluate(task, _state(arrays), out_dim, split="test",
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

    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.round_timeout_s,
        train_config=ConfigRecord({**cfg.to_flat(), "run-id": run_id}),
        evaluate_fn=evaluate,
    )
    final = result.arrays if len(result.arrays) else initial
    save_model(out, _state(final), task=cfg.task, strategy=cfg.strategy, out_dim=out_dim,
               run=run_id)
    epsilon: dict[str, float] = {}
    declined: dict[str, int] = {}
    for rl in strategy.rounds.values():
        epsilon.update(rl.epsilon)
        for site in rl.declined:
            declined[site] = declined.get(site, 0) + 1
    summary = {
        "run": run_id, "task": cfg.task, "strategy": cfg.strategy, "rounds": cfg.rounds,
        "sites": sorted(sites.values()), "epsilon": epsilon, "declined_rounds": declined,
        "dp": cfg.dp, "eval": last_eval, "stopped": strategy.stopped,
        "model_sha256": model_digest({k: a.numpy() for k, a in final.items()}),
        "wall_s": round(time.time() - started, 2),
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary
