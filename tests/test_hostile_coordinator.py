"""The coordinator as adversary, against a real deployed site through the real ClientApp.

Each test plays one attack with Flower ``Message`` objects sent to
``clients.app``'s ClientApp (or with what the server knows, replayed offline)
against a site directory with its own ``manifest.toml``, approved declaration,
ledger, signed audit log and noise secret. Each attack must be refused, or made
harmless, and each refusal must be in the site's signed audit log with its
reason (verified with fedmeta.audit's verifier against the site's public key).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import example_site_on_bundled_data

from clients.app import make_client_app
from fedmeta.approvals import approve
from fedmeta.audit import verify_log
from fedmeta.audit.keys import load_or_create_key
from fedmeta.config import RunConfig, build_task, inner_lr, run_declaration
from fedmeta.paths import LEDGER_FILE, SitePaths
from fedmeta.paths import NOISE_SECRET as SECRET_FILE
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.privacy.ledger import PrivacyLedger
from fedmeta.site import Site, round_seed

CFG = RunConfig(sites=3, inner_steps=2)
SITE = "site-de-01"
EXPECTED_METRICS = {
    "num-examples",
    "declined",
    "steps",
    "epsilon-round",
    "epsilon-total",
    "dp",
    "excluded",
}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def deployed_site(tmp: Path, privacy: str = "") -> Path:
    """A site directory as its IT leaves it: manifest (+ [privacy]), approved declaration."""
    site_dir = tmp / SITE
    site_dir.mkdir()
    text = example_site_on_bundled_data()
    if privacy:  # the site's own [privacy] table instead of the example's
        text = text.split("\n[privacy]\n")[0]
    SitePaths(site_dir).manifest.write_text(text + ("\n[privacy]\n" + privacy if privacy else ""))
    approve(site_dir, run_declaration(CFG))
    return site_dir


def theta() -> dict[str, torch.Tensor]:
    return build_task(CFG).build_model(5).state_dict()


def train_message(
    round_: int = 1, run: str = "run-1", declaration: str | None = "approved", **overrides
) -> Message:
    cfg = CFG.model_copy(update={k.replace("-", "_"): v for k, v in overrides.items()})
    config = {**cfg.to_flat(), "run-id": run, "server-round": round_, "server-head": ""}
    if declaration == "approved":
        config["declaration-json"] = run_declaration(CFG).model_dump_json()
    elif declaration is not None:
        config["declaration-json"] = declaration
    content = RecordDict({"arrays": ArrayRecord(theta()), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def send(site_dir: Path, msg: Message) -> tuple[dict, dict]:
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-dir": str(site_dir), "site-id": SITE},
        state=RecordDict(),
        run_config={},
    )
    reply = make_client_app()(msg, ctx)
    assert not reply.has_error(), reply.error
    return dict(reply.content["metrics"]), dict(reply.content["info"])


def log_entries(site_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (site_dir / AUDIT_LOG).read_text().splitlines()]


def assert_refused(
    site_dir: Path,
    metrics: dict,
    info: dict,
    rule: str,
    setting_text: str,
    action: str = "privacy.decline",
) -> None:
    """Declined, nothing charged or trained, and the refusal signed in the site's log."""
    assert metrics["declined"] == 1 and setting_text in info["reason"], info
    ledger = site_dir / LEDGER_FILE
    assert not ledger.exists() or not PrivacyLedger.read(ledger).charges
    last = log_entries(site_dir)[-1]
    assert last["action"] == action and last["decision"] == "deny", last
    assert last["rule_ids"] == [rule] and setting_text in last["details"]["reason"]
    assert not any(e["action"] == "round.train" for e in log_entries(site_dir))
    pub = load_or_create_key(site_dir / AUDIT_KEY).public_key()
    from fedmeta.audit.keys import public_pem

    result = verify_log(site_dir / AUDIT_LOG, public_key=public_pem(pub))
    assert result.ok and result.key_source == "given", result.summary()


def test_an_honest_round_trains_with_the_site_csprng(tmp_path):
    """The control: the same site and messages do train when the round is within policy."""
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message())
    assert metrics["declined"] == 0 and set(metrics) == EXPECTED_METRICS
    train = next(e for e in log_entries(site_dir) if e["action"] == "round.train")
    assert train["details"]["noise_source"] == "site-csprng"
    assert train["details"]["declaration_sha256"] == run_declaration(CFG).sha256()
    assert oct((site_dir / SECRET_FILE).stat().st_mode & 0o777) == "0o600"


def test_dp_false_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(dp=False))
    assert_refused(site_dir, metrics, info, "SITE-POLICY.dp_required", "dp_required")


def test_a_round_without_a_declaration_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(declaration=None))
    assert_refused(
        site_dir, metrics, info, "SITE-APPROVAL", "no run declaration", action="policy.site"
    )


def test_a_round_with_another_declaration_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    other = run_declaration(CFG).model_copy(update={"epsilon": 9.5})  # within epsilon_max 10
    metrics, info = send(site_dir, train_message(declaration=other.model_dump_json()))
    assert_refused(
        site_dir, metrics, info, "SITE-APPROVAL", "not one this site approved", action="policy.site"
    )


def test_a_tiny_noise_multiplier_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(noise_multiplier=0.01))
    assert_refused(
        site_dir, metrics, info, "SITE-POLICY.min_noise_multiplier", "min_noise_multiplier"
    )


def test_a_huge_clipping_norm_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(max_grad_norm=1e6))
    assert_refused(site_dir, metrics, info, "SITE-POLICY.max_grad_norm", "max_grad_norm")


def test_ten_thousand_inner_steps_are_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(inner_steps=10_000))
    assert_refused(site_dir, metrics, info, "SITE-POLICY.max_inner_steps", "max_inner_steps")


def test_the_gdp_accountant_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    metrics, info = send(site_dir, train_message(accountant="gdp"))
    assert_refused(site_dir, metrics, info, "SITE-POLICY.accountants", "gdp")


def test_a_sample_rate_of_one_is_declined(tmp_path):
    # a batch larger than the round's pool: every record in every step (q = 1); the
    # site allows large batches here, so the sample rate is the setting that refuses it
    site_dir = deployed_site(tmp_path, "max_batch_size = 100000\n")
    metrics, info = send(site_dir, train_message(batch_size=5000))
    assert_refused(site_dir, metrics, info, "SITE-POLICY.max_sample_rate", "max_sample_rate")


def test_the_train_loss_never_leaves_the_site(tmp_path):
    """Asking for it by config is refused; the reply carries no loss; the site logs its own."""
    site_dir = deployed_site(tmp_path)
    msg = train_message()
    msg.content["config"]["train-loss"] = True  # "please send the loss too"
    metrics, info = send(site_dir, msg)
    assert_refused(site_dir, metrics, info, "SITE-CONFIG", "train-loss", action="round.decline")
    metrics, info = send(site_dir, train_message(round_=2))
    assert set(metrics) == EXPECTED_METRICS and metrics["declined"] == 0
    assert set(info) == {"site-id", "reason", "exclusions", "receipt"}
    assert not any("loss" in k for k in [*metrics, *info])
    reply_entry = next(e for e in log_entries(site_dir) if e["action"] == "round.reply")
    assert reply_entry["details"]["train_loss"] > 0  # kept in the site's own log


def test_the_same_round_replayed_is_declined(tmp_path):
    site_dir = deployed_site(tmp_path)
    first, _ = send(site_dir, train_message(round_=3))
    assert first["declined"] == 0
    again, info = send(site_dir, train_message(round_=3))
    assert again["declined"] == 1 and "already trained" in info["reason"]
    assert len(PrivacyLedger.read(site_dir / LEDGER_FILE).charges) == 1  # charged once
    last = log_entries(site_dir)[-1]
    assert last["action"] == "round.decline" and last["rule_ids"] == ["SITE-REPLAY"]
    assert verify_log(site_dir / AUDIT_LOG).ok


def _server_noise_guess(shapes, std: float, steps: int, seed: int) -> list[torch.Tensor]:
    """Every noise draw of a seeded round, from what the server knows (seed, round, site)."""
    gen = torch.Generator().manual_seed(seed + 1)
    total = [torch.zeros(s) for s in shapes]
    for _ in range(steps):
        for t, s in zip(total, shapes, strict=True):
            t += torch.normal(0.0, std, size=s, generator=gen)
    return total


@pytest.mark.parametrize("deployed", [False, True], ids=["seeded-simulated", "site-csprng"])
def test_noise_reconstruction_from_the_seed(tmp_path, deployed):
    """The issue's replay. With SGD, theta - phi = lr/B * sum_t (S_t + N_t), so a server that
    regenerates every noise draw N_t from the seed recovers the clipped-gradient sum
    S = sum_t S_t, whose norm is at most C * (records sampled), about C * B * steps; the
    noise's norm is sigma * C * sqrt(steps * d). Seeded: what the server recovers is a
    clipped sum (the noise is gone). Site CSPRNG: it is noise-sized (nothing removed)."""
    cfg = CFG.model_copy(update={"grad_sample_mode": "hooks"})
    if deployed:
        site = Site(SITE, 0, deployed_site(tmp_path), cfg)
    else:
        site = Site("site-0", 0, tmp_path / "sim", cfg)
    assert site.noise_source == ("site-csprng" if deployed else "seeded")
    t0 = theta()
    reply = site.train_round(
        {k: v.clone() for k, v in t0.items()}, "run-1", 1, run_declaration(CFG)
    )
    assert not reply.declined
    # all the server knows: theta, phi, the round config and the site's index
    lr, batch, steps = inner_lr(cfg, site.task), cfg.batch_size, cfg.inner_steps
    names = [n for n, _ in site.task.build_model(5).named_parameters()]
    std = cfg.noise_multiplier * cfg.max_grad_norm
    guess = _server_noise_guess(
        [t0[n].shape for n in names], std, steps, round_seed(cfg.seed, 1, 0)
    )
    recovered = torch.cat(
        [
            ((t0[n] - reply.state[n]) * batch / lr - g).flatten()
            for n, g in zip(names, guess, strict=True)
        ]
    )
    noise_scale = std * (steps * recovered.numel()) ** 0.5
    # twice the expected number of sampled records (Poisson(B) per step: > 6 sd margin)
    signal_bound = cfg.max_grad_norm * 2 * batch * steps
    assert noise_scale > 6 * signal_bound  # the test can tell the two outcomes apart
    err = float(recovered.norm())
    if deployed:
        assert err > 0.5 * noise_scale, (err, noise_scale, signal_bound)
    else:
        assert err <= signal_bound, (err, signal_bound, noise_scale)


def test_a_deployed_site_ignores_a_request_for_seeded_noise(tmp_path):
    site_dir = deployed_site(tmp_path)
    send(site_dir, train_message(noise_source="seeded"))
    train = next(e for e in log_entries(site_dir) if e["action"] == "round.train")
    assert train["details"]["noise_source"] == "site-csprng"


def test_every_refusal_names_the_setting_in_a_verified_log(tmp_path):
    """One site, several hostile rounds in a row: each decline is its own signed entry."""
    site_dir = deployed_site(tmp_path)
    attacks = [
        ({"dp": False}, "SITE-POLICY.dp_required"),
        ({"noise_multiplier": 0.1}, "SITE-POLICY.min_noise_multiplier"),
        ({"accountant": "gdp"}, "SITE-POLICY.accountants"),
        ({"inner_steps": 10_000}, "SITE-POLICY.max_inner_steps"),
    ]
    for i, (attack, _) in enumerate(attacks, start=1):
        metrics, _ = send(site_dir, train_message(round_=i, **attack))
        assert metrics["declined"] == 1
    denies = [e for e in log_entries(site_dir) if e["decision"] == "deny"]
    assert [e["rule_ids"][0] for e in denies] == [r for _, r in attacks]
    assert all(len(e["details"]["reason"]) <= 500 for e in denies)
    assert verify_log(site_dir / AUDIT_LOG).ok
