"""The ``fedmeta`` command: simulate, evaluate, ledger, audit, keys, report.

Every user error (bad option, bad config value, unreadable ledger or run
directory) ends with one red line naming what is wrong and exit code 2, never
a traceback.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmeta.offline import no_call_home

no_call_home()

app = typer.Typer(help="Privacy-preserving federated meta-learning (Reptile + Opacus DP + "
                       "GDPR/DPDP policies + tamper-evident audit log).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
ledger_app = typer.Typer(help="Inspect a site's durable privacy ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"error: {message}", style="bold red", markup=False)
    return typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedmeta.config import ConfigError
    from fedmeta.data.tasks.base import TaskError
    from fedmeta.meta.curve import CurveError
    from fedmeta.privacy.ledger import LedgerError
    from fedmeta.simulation import RunDirError
    from policies import DeclarationError

    return (ConfigError, TaskError, RunDirError, LedgerError, CurveError, DeclarationError,
            FileNotFoundError)


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
    task: Annotated[str | None, typer.Option(
        help="digits-fewshot | sine | breast-cancer-sites")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="reptile | fomaml | fedavg (baseline)")] = None,
    sites: Annotated[int | None, typer.Option(help="number of simulated sites")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    seed: Annotated[int | None, typer.Option(help="seed: same seed, same metrics")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON file of config keys")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE for any config key "
                                                   "(e.g. --set inner-steps=10)")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="turn differential privacy OFF "
                                        "(explicit; reported in the run)")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    overwrite: Annotated[bool, typer.Option(help="reuse a run directory")] = False,
    verbose: Annotated[bool, typer.Option(help="also show Flower's INFO lines and fedmeta's "
                                          "own")] = False,
    backend: Annotated[str, typer.Option(help="ray: Flower's simulation engine, one Ray actor "
                                         "per site | inline: every site in this process, no "
                                         "Ray (fast; same metrics for the same seed)")] = "ray",
) -> None:
    """Run a federation on this machine (Flower's simulation engine, or in-process)."""
    from fedmeta.config import RunConfig
    from fedmeta.logs import configure
    from fedmeta.metrics import METRICS_FILE
    from fedmeta.simulation import BACKENDS

    if backend not in BACKENDS:
        raise fail(f"option '--backend': expected one of {' | '.join(BACKENDS)}, got {backend!r}")

    values: dict[str, Any] = {}
    if config:
        values.update(_load_config_file(config))
    values.update(_parse_set(set_ or []))
    for key, val in (("task", task), ("strategy", strategy), ("sites", sites),
                     ("rounds", rounds), ("seed", seed), ("device", device)):
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
        from fedmeta.simulation import simulate as run_sim

        prepare_run_dir(cfg, overwrite)
    except _user_errors() as exc:
        raise fail(str(exc)) from None
    configure(verbose)
    if not cfg.dp:
        err_console.print("warning: differential privacy is OFF for this run (--no-dp); "
                          "the run's metrics and summary record it", style="yellow")
    elif cfg.noise_source != "site-csprng":
        err_console.print("note: DP noise is seeded from the run seed (same seed, same "
                          "metrics): for experiments only, no guarantee against the "
                          "coordinator; deployed sites use their own CSPRNG", style="yellow")
    metrics_path = Path(cfg.out_dir) / METRICS_FILE
    stop = threading.Event()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                        console=console, transient=False)

    def follow(bar: Any) -> None:
        seen = 0
        while not stop.is_set():
            if metrics_path.exists():
                lines = metrics_path.read_text().splitlines()
                for line in lines[seen:]:
                    rec = json.loads(line)
                    status = ""
                    if "eval" in rec:
                        e = rec["eval"]
                        status = f"{e['metric']} adapted {e['adapted']:.3f}"
                    if rec.get("declined"):
                        status += f"  declined {len(rec['declined'])}"
                    progress.update(bar, completed=rec["round"], status=status)
                seen = len(lines)
            stop.wait(0.3)

    with progress:
        bar = progress.add_task(f"{cfg.strategy} on {cfg.task}", total=cfg.rounds,
                                status="starting")
        watcher = threading.Thread(target=follow, args=(bar,), daemon=True)
        watcher.start()
        try:
            summary = run_sim(cfg, overwrite=True, backend=backend)
        except _user_errors() as exc:
            raise fail(str(exc)) from None
        finally:
            time.sleep(0.4)
            stop.set()
            watcher.join()
    _print_summary(summary, cfg.out_dir)


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    table = Table(title=f"run {summary['run']} ({summary['strategy']} on {summary['task']})")
    table.add_column("site")
    table.add_column("epsilon spent", justify="right")
    table.add_column("declined rounds", justify="right")
    for site in summary["sites"]:
        eps = summary["epsilon"].get(site)
        table.add_row(site, "DP off" if not summary["dp"] else
                      ("-" if eps is None else f"{eps:.3f}"),
                      str(summary["declined_rounds"].get(site, 0)))
    console.print(table)
    ev = summary.get("eval") or {}
    if ev:
        console.print(f"{ev['n_way']}-way {ev['shots']}-shot {ev['metric']} on held-out data: "
                      f"adapted {ev['adapted']:.3f} ± {ev['adapted_ci95']:.3f}, "
                      f"un-adapted {ev['unadapted']:.3f}  ({ev['episodes']} episodes)")
    if summary.get("stopped"):
        console.print(f"[bold red]stopped:[/] {summary['stopped']}")
    console.print(f"run directory: {out_dir}  ({summary['wall_s']:.0f} s)")


# ---------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (one per strategy: "
                                                   "reptile, fomaml, fedavg)")],
    shots: Annotated[str, typer.Option(help="comma-separated shots per class")] = "1,5,10,20",
    episodes: Annotated[int, typer.Option(help="test episodes per point")] = 100,
    val_episodes: Annotated[int, typer.Option(help="validation episodes per learning rate "
                                              "tried (the same for every method)")] = 100,
    steps: Annotated[int | None, typer.Option(help="adaptation steps (default: run's)")] = None,
    lr_grid: Annotated[str, typer.Option(
        help="adaptation learning rates tried on validation classes, per method and shot "
             "count")] = "0.01,0.03,0.1,0.3,1",
    prototypes: Annotated[bool, typer.Option(help="also prototype classifiers on each "
                                             "federated model's embedding")] = True,
    shift: Annotated[bool, typer.Option(help="new sites with their own acquisition shift "
                                        "(digits-fewshot runs)")] = False,
    out: Annotated[Path | None, typer.Option(help="output prefix (writes .json and .png)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Accuracy at a new site against labelled examples, every method with its CI."""
    from fedmeta.meta.curve import LABELS, plot_curve, shots_curve

    try:
        shot_list = [int(s) for s in shots.split(",") if s.strip()]
        grid = [float(s) for s in lr_grid.split(",") if s.strip()]
        if not shot_list or min(shot_list) < 1 or not grid or min(grid) <= 0:
            raise ValueError
    except ValueError:
        raise fail("options '--shots'/'--lr-grid': expected comma-separated positive "
                   "numbers") from None
    if episodes < 2 or val_episodes < 2:
        raise fail("options '--episodes'/'--val-episodes': need at least 2 episodes "
                   "for a confidence interval")
    try:
        curve = shots_curve(run_dirs, shot_list, episodes=episodes, val_episodes=val_episodes,
                            steps=steps, lr_grid=grid, seed=seed, prototypes=prototypes,
                            shift=shift)
    except (*_user_errors(), KeyError) as exc:
        raise fail(str(exc)) from None
    prefix = out or (run_dirs[0] / "shots-curve")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(curve, indent=2) + "\n")
    png = plot_curve(curve, prefix.with_suffix(".png"))
    table = Table(title=f"{curve['task']}: {curve['n_way']}-way, {curve['steps']} steps, "
                        f"{episodes} episodes (mean ± 95% CI; lr chosen on "
                        f"{val_episodes} validation episodes)")
    table.add_column("method")
    for k in shot_list:
        table.add_column(f"{k}-shot", justify="right")
    methods = dict.fromkeys(p["method"] for p in curve["points"])
    for m in methods:
        row = {p["shots"]: p for p in curve["points"] if p["method"] == m}
        label = LABELS.get(m) or row[shot_list[0]].get("label") or m
        table.add_row(label, *[f"{row[k]['mean']:.3f} ± {row[k]['ci95']:.3f}"
                               + (f" (lr {row[k]['lr']:g})" if row[k]["lr"] else "")
                               for k in shot_list])
    console.print(table)
    console.print(f"wrote {json_path} and {png}")


# ---------------------------------------------------------------------------- ledger
@ledger_app.command("show")
def ledger_show(
    site_dir: Annotated[Path, typer.Argument(help="a site's state directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print a site's privacy ledger and its cumulative epsilon."""
    from fedmeta.privacy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger

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
    table = Table(title=f"privacy ledger of {summary['site']} ({summary['accountant']}, "
                        f"delta={summary['delta']:g}, per {summary['privacy_unit']})")
    for col in ("run", "round", "noise_multiplier", "sample_rate", "steps", "epsilon_after"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for e in summary["entries"]:
        table.add_row(e["run"], str(e["round"]), f"{e['noise_multiplier']:.4g}",
                      f"{e['sample_rate']:.4g}", str(e["steps"]), f"{e['epsilon_after']:.4f}")
    console.print(table)
    console.print(f"epsilon spent {summary['epsilon']:.4f} of {summary['epsilon_max']:g} "
                  f"(per {summary['privacy_unit']})")


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


_mount_report()


def _mount_deploy() -> None:
    from fedmeta.deploy.cli import node_app, provision, registry_app

    app.command("provision")(provision)
    app.add_typer(node_app, name="node")
    app.add_typer(registry_app, name="registry")


_mount_deploy()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
