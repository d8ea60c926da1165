"""The ``fedmeta`` command: simulate, evaluate, ledger, audit, keys, report.

Every user error (bad option, bad config value, unreadable ledger or run
directory) ends with one red line naming what is wrong and exit code 2, never
a traceback.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmeta.cli_common import choice, choices_help, err_console, fail, one_of
from fedmeta.config import BACKENDS, choices, default
from fedmeta.data.task_names import task_names
from fedmeta.meta.protocol import grid_text
from fedmeta.offline import no_call_home

no_call_home()

app = typer.Typer(
    help="Privacy-preserving federated meta-learning (Reptile + Opacus DP + "
    "GDPR/DPDP policies + tamper-evident audit log).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ledger_app = typer.Typer(help="Inspect a site's durable privacy ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
console = Console(highlight=False)
__all__ = ["app", "fail", "main"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedmeta.checkpoints import CheckpointError
    from fedmeta.config import ConfigError
    from fedmeta.data.tasks.base import TaskError
    from fedmeta.meta.curve import CurveError
    from fedmeta.privacy.ledger import LedgerError
    from fedmeta.simulation import RunDirError
    from fedmeta.tracking import TrackingError
    from policies import DeclarationError

    return (
        ConfigError,
        TaskError,
        RunDirError,
        LedgerError,
        CurveError,
        DeclarationError,
        FileNotFoundError,
        CheckpointError,
        TrackingError,
    )


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise fail(f"option '--set': expected KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _load_config_file(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"{path}: cannot read config file ({exc})") from None


# ---------------------------------------------------------------------------- simulate
@app.command()
def simulate(
    task: Annotated[
        str | None,
        typer.Option(
            help=f"what the sites learn: {one_of(task_names())} (bundled tasks, then plug-ins "
            "installed under the entry point group fedmeta.tasks), or package.module:Class",
            show_default=str(default("task")),
            callback=choice(
                "--task",
                "task",
                task_names,
                also=lambda v: ":" in v,
                also_text="package.module:Class",
            ),
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help=choices_help(
                "server strategy (fedavg: the transfer-learning baseline; fomaml: "
                "with --no-dp only)",
                choices("strategy"),
            ),
            show_default=str(default("strategy")),
            callback=choice("--strategy", "strategy", lambda: choices("strategy")),
        ),
    ] = None,
    sites: Annotated[
        int | None,
        typer.Option(help="number of simulated sites", show_default=str(default("sites"))),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="federated rounds", show_default=str(default("rounds")))
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="seed: same seed, same metrics", show_default=str(default("seed"))),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="run directory ({run} is replaced by the run id)",
            show_default=str(default("out-dir")),
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="TOML/JSON file of config keys (`fedmeta config --toml` writes one)"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE for any config key, e.g. --set inner-steps=10 (every key, "
            "its default and range: `fedmeta config`)",
        ),
    ] = None,
    no_dp: Annotated[
        bool,
        typer.Option(
            "--no-dp", help="turn differential privacy OFF (explicit; reported in the run)"
        ),
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto (cuda if available) | cpu | cuda | cuda:N",
            show_default=str(default("device")),
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="reuse a run directory")] = False,
    verbose: Annotated[
        bool, typer.Option(help="also show Flower's INFO lines and fedmeta's own")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            help=choices_help(
                "ray: Flower's simulation engine, one Ray actor per site; inline: "
                "every site in this process, no Ray (fast; same metrics for the "
                "same seed)",
                BACKENDS,
            ),
            callback=choice("--backend", "backend", lambda: BACKENDS),
        ),
    ] = "ray",
    resume: Annotated[
        Path | None,
        typer.Option(
            help="continue the stopped run in this run directory from its last checkpoint "
            "(same run id, config, ledgers and logs)"
        ),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            help="write per-round metrics to TensorBoard in this directory "
            "(pip install 'fedmeta\\[tensorboard]')"
        ),
    ] = None,
    mlflow: Annotated[
        str | None,
        typer.Option(
            help="log per-round metrics to MLflow at this tracking URI, e.g. sqlite:///mlflow.db "
            "(pip install 'fedmeta\\[mlflow]')"
        ),
    ] = None,
) -> None:
    """Run a federation on this machine (Flower's simulation engine, or in-process).

    Exit code 0: the run completed; 1: the run failed (no usable replies, every site
    lost, declined or out of budget, a model no site could train), with a summary of
    the reasons; 2: a user error. A stopped run continues with --resume RUN_DIR."""
    from fedmeta.netns import confine_command

    confine_command(backend, mlflow)  # without root; only while no thread is started
    from fedmeta.config import RunConfig
    from fedmeta.logs import configure

    if resume is not None:
        given = (
            [
                name
                for name, val in (
                    ("--task", task),
                    ("--strategy", strategy),
                    ("--sites", sites),
                    ("--rounds", rounds),
                    ("--seed", seed),
                    ("--out", out),
                    ("--config", config),
                    ("--set", set_),
                    ("--device", device),
                )
                if val
            ]
            + (["--no-dp"] if no_dp else [])
            + (["--overwrite"] if overwrite else [])
        )
        if given:
            raise fail(
                f"option '--resume': a resumed run keeps its own config; drop {', '.join(given)}"
            )
        _simulate_resume(resume, backend, verbose, tensorboard, mlflow)
        return

    values: dict[str, Any] = {}
    if config:
        values.update(_load_config_file(config))
    values.update(_parse_set(set_ or []))
    for key, val in (
        ("task", task),
        ("strategy", strategy),
        ("sites", sites),
        ("rounds", rounds),
        ("seed", seed),
        ("device", device),
    ):
        if val is not None:
            values[key] = val
    if out is not None:
        values["out-dir"] = str(out)
    if no_dp:
        values["dp"] = False
    try:
        cfg = RunConfig.from_flat(values, source="fedmeta simulate")
        from fedmeta.config import build_task, run_declaration

        task_obj = build_task(cfg)
        if task_obj.server_eval:
            task_obj.site_records(0)  # fail fast on impossible task settings
        run_declaration(cfg)
        from fedmeta.simulation import prepare_run_dir

        prepare_run_dir(cfg, overwrite)
        trackers = _trackers(tensorboard, mlflow)
    except _user_errors() as exc:
        raise fail(str(exc)) from None
    configure(verbose)
    if not cfg.dp:
        err_console.print(
            "warning: differential privacy is OFF for this run (--no-dp); "
            "the run's metrics and summary record it",
            style="yellow",
        )
    elif cfg.noise_source != "site-csprng":
        err_console.print(
            "note: DP noise is seeded from the run seed (same seed, same "
            "metrics): for experiments only, no guarantee against the "
            "coordinator; deployed sites use their own CSPRNG",
            style="yellow",
        )
    _run_with_progress(cfg, backend, False, trackers)


def _trackers(tensorboard: Path | None, mlflow: str | None) -> list[Any]:
    from fedmeta.tracking import MLflowTracker, TensorBoardTracker

    out: list[Any] = []
    if tensorboard is not None:
        out.append(TensorBoardTracker(tensorboard))
    if mlflow is not None:
        out.append(MLflowTracker(tracking_uri=mlflow))
    return out


def _simulate_resume(
    run_dir: Path, backend: str, verbose: bool, tensorboard: Path | None, mlflow: str | None
) -> None:
    from fedmeta.logs import configure
    from fedmeta.simulation import load_run_config

    try:
        cfg = load_run_config(run_dir)
        trackers = _trackers(tensorboard, mlflow)
    except _user_errors() as exc:
        raise fail(str(exc)) from None
    configure(verbose)
    _run_with_progress(cfg, backend, True, trackers)


def _fmt(value: Any, spec: str = ".3f") -> str:
    """A number for people: NaN, infinities and missing values read as 'n/a'."""
    import math

    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "n/a"


def _run_with_progress(cfg: Any, backend: str, resume: bool, trackers: list[Any]) -> None:
    from fedmeta.paths import METRICS_FILE
    from fedmeta.simulation import simulate as run_sim

    def on_round(metrics: Any) -> None:
        for tracker in trackers:
            tracker(metrics)

    metrics_path = Path(cfg.out_dir) / METRICS_FILE
    skip = len(metrics_path.read_text().splitlines()) if resume and metrics_path.exists() else 0
    stop = threading.Event()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    seen = [skip]

    def catch_up(bar: Any) -> None:
        """Show the metrics lines written since the last look (whole lines only)."""
        if not metrics_path.exists():
            return
        lines = metrics_path.read_text().split("\n")[:-1]  # a line being written waits
        for line in lines[seen[0] :]:
            rec = json.loads(line)
            status = ""
            if isinstance(rec.get("eval"), dict):
                e = rec["eval"]
                status = f"{e.get('metric')} adapted {_fmt(e.get('adapted'))}"
            if rec.get("declined"):
                status += f"  declined {len(rec['declined'])}"
            progress.update(bar, completed=rec["round"], status=status)
        seen[0] = len(lines)

    def follow(bar: Any) -> None:
        while not stop.wait(0.3):
            catch_up(bar)

    with progress:
        bar = progress.add_task(
            f"{cfg.strategy} on {cfg.task}", total=cfg.rounds, status="starting"
        )
        watcher = threading.Thread(target=follow, args=(bar,), daemon=True)
        watcher.start()
        try:
            summary = run_sim(
                cfg,
                overwrite=True,
                backend=backend,
                resume=resume,
                on_round=on_round if trackers else None,
            )
        except _user_errors() as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail(
                f"interrupted; the run stopped and is recorded as such in the server's "
                f"audit log; continue it with: fedmeta simulate --resume {cfg.out_dir}",
                code=130,
            ) from None
        finally:
            stop.set()
            watcher.join()
            catch_up(bar)  # the last rounds' lines, after the watcher stopped
            for tracker in trackers:
                tracker.close()
    _print_summary(summary, cfg.out_dir)
    if summary.get("status") == "failed":
        from fedmeta.failures import failure_text

        err_console.print(failure_text(summary), style="bold red", markup=False)
        if summary.get("last_round"):
            err_console.print(
                f"after fixing the cause, continue it with: fedmeta simulate "
                f"--resume {cfg.out_dir}",
                markup=False,
            )
        raise typer.Exit(1)


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    table = Table(title=f"run {summary['run']} ({summary['strategy']} on {summary['task']})")
    table.add_column("site")
    table.add_column("epsilon spent", justify="right")
    table.add_column("declined rounds", justify="right")
    for site in summary["sites"]:
        eps = summary["epsilon"].get(site)
        table.add_row(
            site,
            "DP off" if not summary["dp"] else ("-" if eps is None else _fmt(eps)),
            str(summary["declined_rounds"].get(site, 0)),
        )
    console.print(table)
    ev = summary.get("eval") or {}
    if ev:
        console.print(
            f"{ev.get('n_way')}-way {ev.get('shots')}-shot {ev.get('metric')} on "
            f"held-out data: adapted {_fmt(ev.get('adapted'))} ± "
            f"{_fmt(ev.get('adapted_ci95'))}, un-adapted {_fmt(ev.get('unadapted'))}"
            f"  ({ev.get('episodes')} episodes)"
        )
    if summary.get("stopped"):
        console.print(f"[bold red]stopped:[/] {summary['stopped']}")
    console.print(f"run directory: {out_dir}  ({_fmt(summary.get('wall_s'), '.0f')} s)")


# ---------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="run directories (one per strategy: reptile, fomaml, fedavg)"),
    ],
    shots: Annotated[str, typer.Option(help="comma-separated shots per class")] = "1,5,10,20",
    episodes: Annotated[int, typer.Option(help="test episodes per point")] = 100,
    val_episodes: Annotated[
        int,
        typer.Option(
            help="validation episodes per learning rate tried (the same for every method)"
        ),
    ] = 100,
    steps: Annotated[int | None, typer.Option(help="adaptation steps (default: run's)")] = None,
    lr_grid: Annotated[
        str,
        typer.Option(
            help="adaptation learning rates tried on validation classes, per method and shot "
            "count (kept: the smallest within one standard error of the best)"
        ),
    ] = grid_text(),
    prototypes: Annotated[
        bool, typer.Option(help="also prototype classifiers on each federated model's embedding")
    ] = True,
    shift: Annotated[
        bool, typer.Option(help="new sites with their own acquisition shift (digits-fewshot runs)")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="output prefix (writes .json and .png)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the evaluation episodes")] = 0,
) -> None:
    """Accuracy at a new site against labelled examples, every method with its CI."""
    from fedmeta.meta.curve import LABELS, plot_curve, shots_curve
    from fedmeta.paths import RunPaths

    try:
        shot_list = [int(s) for s in shots.split(",") if s.strip()]
        grid = [float(s) for s in lr_grid.split(",") if s.strip()]
        if not shot_list or min(shot_list) < 1 or not grid or min(grid) <= 0:
            raise ValueError
    except ValueError:
        raise fail(
            "options '--shots'/'--lr-grid': expected comma-separated positive numbers"
        ) from None
    if episodes < 2 or val_episodes < 2:
        raise fail(
            "options '--episodes'/'--val-episodes': need at least 2 episodes "
            "for a confidence interval"
        )
    try:
        curve = shots_curve(
            run_dirs,
            shot_list,
            episodes=episodes,
            val_episodes=val_episodes,
            steps=steps,
            lr_grid=grid,
            seed=seed,
            prototypes=prototypes,
            shift=shift,
        )
    except (*_user_errors(), KeyError) as exc:
        raise fail(str(exc)) from None
    prefix = out or RunPaths(run_dirs[0]).shots_curve.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(curve, indent=2) + "\n")
    png = plot_curve(curve, prefix.with_suffix(".png"))
    table = Table(
        title=f"{curve['task']}: {curve['n_way']}-way, {curve['steps']} steps, "
        f"{episodes} episodes (mean ± 95% CI; cosine-decayed steps; lr chosen on "
        f"{val_episodes} validation episodes, one-standard-error rule)"
    )
    table.add_column("method")
    for k in shot_list:
        table.add_column(f"{k}-shot", justify="right")
    methods = dict.fromkeys(p["method"] for p in curve["points"])
    for m in methods:
        row = {p["shots"]: p for p in curve["points"] if p["method"] == m}
        label = LABELS.get(m) or row[shot_list[0]].get("label") or m
        table.add_row(
            label,
            *[
                f"{row[k]['mean']:.3f} ± {row[k]['ci95']:.3f}"
                + (f" (lr {row[k]['lr']:g})" if row[k]["lr"] else "")
                for k in shot_list
            ],
        )
    console.print(table)
    console.print(f"wrote {json_path} and {png}")


# ---------------------------------------------------------------------------- ledger
@ledger_app.command("show")
def ledger_show(
    site_dir: Annotated[Path, typer.Argument(help="a site's state directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print a site's privacy ledger and its cumulative epsilon."""
    from fedmeta.paths import LEDGER_FILE
    from fedmeta.privacy.ledger import LedgerError, PrivacyLedger

    path = site_dir / LEDGER_FILE
    if not path.exists():
        raise fail(f"{path}: no privacy ledger here (is {site_dir} a site directory?)")
    try:
        summary = PrivacyLedger.read(path).summary()
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(
        title=f"privacy ledger of {summary['site']} ({summary['accountant']}, "
        f"delta={summary['delta']:g}, per {summary['privacy_unit']})"
    )
    for col in ("run", "round", "noise_multiplier", "sample_rate", "steps", "epsilon_after"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for e in summary["entries"]:
        table.add_row(
            e["run"],
            str(e["round"]),
            f"{e['noise_multiplier']:.4g}",
            f"{e['sample_rate']:.4g}",
            str(e["steps"]),
            f"{e['epsilon_after']:.4f}",
        )
    console.print(table)
    console.print(
        f"epsilon spent {summary['epsilon']:.4f} of {summary['epsilon_max']:g} "
        f"(per {summary['privacy_unit']})"
    )


def _mount_audit() -> None:
    from fedmeta.audit.cli import audit_app, keys_app

    app.add_typer(audit_app, name="audit")
    app.add_typer(keys_app, name="keys")


_mount_audit()


def _mount_report() -> None:
    from fedmeta.report.cli import report_command
    from fedmeta.report.notice import notice_command
    from fedmeta.report.rights import rights_command

    app.command("report")(report_command)
    app.command("notice")(notice_command)
    app.command("rights")(rights_command)
    from fedmeta.incidents.cli import incident_app  # incidents with legal clocks

    app.add_typer(incident_app, name="incident")


_mount_report()


def _mount_deploy() -> None:
    from fedmeta.deploy.cli import evidence_app, node_app, provision, registry_app, run_command

    app.command("provision")(provision)
    app.command("run")(run_command)
    app.add_typer(node_app, name="node")
    app.add_typer(evidence_app, name="evidence")
    app.add_typer(registry_app, name="registry")


_mount_deploy()


def _mount_newsite() -> None:
    from fedmeta.newsite.cli import adapt_command, predict_command

    app.command("adapt")(adapt_command)
    app.command("predict")(predict_command)


_mount_newsite()


def _mount_config() -> None:
    from fedmeta.config_help import config_command

    app.command("config")(config_command)


_mount_config()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
