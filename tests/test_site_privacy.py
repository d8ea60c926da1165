"""The site's own privacy machinery on real objects: policy, approvals, ledger lock,
per-run epsilon, record metadata re-read mid-run, the CSPRNG noise, the config."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import example_site_on_bundled_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from fedmeta.approvals import ApprovalError, approved
from fedmeta.cli import app as cli
from fedmeta.config import ConfigError, RunConfig, build_task, run_declaration
from fedmeta.data.tasks.base import Pool
from fedmeta.paths import DECLARATION_APPROVALS as APPROVALS_FILE
from fedmeta.paths import NOISE_SECRET as SECRET_FILE
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.paths import SitePaths
from fedmeta.privacy.budget import poisson_rate
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.ledger import PrivacyLedger
from fedmeta.privacy.noise import KeyStream, NoiseSecretError, SiteRandomness, load_or_create_secret
from fedmeta.site import Site
from policies import DeclarationError, load_site_manifest, parse_site_manifest
from policies.defaults import EXAMPLE_RUN, EXAMPLES_DIR
from policies.site_policy import RoundRequest, SitePrivacyPolicy, check_round

CFG = RunConfig(sites=3, inner_steps=2)


def deployed(tmp: Path, privacy: str = "") -> Path:
    site_dir = tmp / "site-de-01"
    site_dir.mkdir()
    text = example_site_on_bundled_data()
    if privacy:  # the site's own [privacy] table instead of the example's
        text = text.split("\n[privacy]\n")[0]
    SitePaths(site_dir).manifest.write_text(text + ("\n[privacy]\n" + privacy if privacy else ""))
    return site_dir


def theta():
    return build_task(CFG).build_model(5).state_dict()


def entries(site_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (site_dir / AUDIT_LOG).read_text().splitlines()]


# ---- the [privacy] table ------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, needle",
    [
        ('accountants = ["gdp"]', "field 'privacy.accountants': gdp is an approximation"),
        ("min_noise_multiplier = -1.0", "field 'privacy.min_noise_multiplier'"),
        ("max_sample_rate = 1.5", "field 'privacy.max_sample_rate'"),
        ("dp_requird = false", "field 'privacy.dp_requird': is not a known field"),
        ('max_inner_steps = "many"', "field 'privacy.max_inner_steps'"),
    ],
)
def test_a_bad_privacy_table_is_a_one_line_error(tmp_path, table, needle):
    site_dir = deployed(tmp_path, table + "\n")
    with pytest.raises(DeclarationError) as err:
        load_site_manifest(SitePaths(site_dir).manifest)
    assert needle in str(err.value) and "manifest.toml" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_example_manifest_documents_every_setting():
    example = tomllib.loads((EXAMPLES_DIR / "site.toml").read_text())
    assert set(example["privacy"]) == set(SitePrivacyPolicy.model_fields)
    assert parse_site_manifest(example).privacy == SitePrivacyPolicy(**example["privacy"])


@settings(max_examples=60, deadline=None)
@given(
    sigma=st.floats(0, 5),
    clip=st.floats(0.01, 50),
    steps=st.integers(1, 500),
    batch=st.integers(1, 1000),
    q=st.floats(0.001, 1.0),
    acct=st.sampled_from(["prv", "rdp", "gdp"]),
    dp=st.booleans(),
)
def test_a_round_passes_only_if_every_setting_holds(sigma, clip, steps, batch, q, acct, dp):
    policy = SitePrivacyPolicy()
    req = RoundRequest(
        dp=dp,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        inner_steps=steps,
        batch_size=batch,
        sample_rate=q,
        accountant=acct,
        delta=1e-5,
    )
    ok = (
        dp
        and acct in policy.accountants
        and sigma >= policy.min_noise_multiplier
        and clip <= policy.max_grad_norm
        and steps <= policy.max_inner_steps
        and batch <= policy.max_batch_size
        and q <= policy.max_sample_rate
    )
    refusal = check_round(policy, req, 1e-5)
    assert (refusal is None) == ok
    if refusal is not None:
        assert refusal.rule_id.startswith("SITE-POLICY.") and refusal.setting in refusal.reason


def test_a_site_that_allows_no_dp_may_train_without_it(tmp_path):
    """dp_required = false and epsilon_max = inf: the site's choice, not the server's."""
    site_dir = deployed(tmp_path, "dp_required = false\n")
    text = (
        SitePaths(site_dir).manifest.read_text().replace("epsilon_max = 10.0", "epsilon_max = inf")
    )
    SitePaths(site_dir).manifest.write_text(text)
    cfg = CFG.model_copy(update={"dp": False})
    (site_dir / APPROVALS_FILE).unlink(missing_ok=True)
    from fedmeta.approvals import approve

    approve(site_dir, run_declaration(cfg))
    reply = Site("site-de-01", 0, site_dir, cfg).train_round(theta(), "r", 1, run_declaration(cfg))
    assert not reply.declined and not reply.dp


# ---- approvals -------------------------------------------------------------------------
def test_node_approve_pins_the_declaration_and_the_site_then_trains(tmp_path):
    site_dir = deployed(tmp_path)
    site = Site("site-de-01", 0, site_dir, CFG)
    before = site.train_round(theta(), "run-1", 1, run_declaration(CFG))
    assert before.declined and "not one this site approved" in before.reason
    res = CliRunner().invoke(cli, ["node", "approve", str(site_dir), str(EXAMPLE_RUN)])
    assert res.exit_code == 0, res.output
    assert run_declaration(CFG).sha256() in res.output
    assert set(approved(site_dir)) == {run_declaration(CFG).sha256()}
    after = site.train_round(theta(), "run-1", 2, run_declaration(CFG))  # same cached Site
    assert not after.declined
    bad = tmp_path / "bad.toml"
    bad.write_text('purpose = "marketing"\n')
    res = CliRunner().invoke(cli, ["node", "approve", str(site_dir), str(bad)])
    assert res.exit_code == 2 and "bad.toml: field" in res.output


def test_a_damaged_approvals_file_is_a_one_line_error(tmp_path):
    (tmp_path / APPROVALS_FILE).write_text('{"sha256": "zz"}\n')
    with pytest.raises(ApprovalError, match="line 1: unreadable approval"):
        approved(tmp_path)


# ---- budget arithmetic -------------------------------------------------------------------
def _charge(site_dir: str, run: str, barrier, out) -> None:
    ledger = PrivacyLedger.open(
        Path(site_dir), site="s", epsilon_max=2.0, delta=1e-5, accountant="prv"
    )
    step = (1.0, 0.05, 16)  # 1.88 alone fits under 2.0; two make 2.30
    barrier.wait()
    with ledger.locked():
        exceed, _ = ledger.would_exceed(step)
        if not exceed:
            ledger.charge(run, 1, step)
    out.put(not exceed)


def test_two_processes_cannot_both_pass_the_budget_check(tmp_path):
    PrivacyLedger.open(tmp_path, site="s", epsilon_max=2.0, delta=1e-5, accountant="prv")
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_charge, args=(str(tmp_path), f"run-{i}", barrier, out))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(out.get(timeout=5) for _ in procs) == [False, True]
    ledger = PrivacyLedger.read(SitePaths(tmp_path).ledger)
    assert len(ledger.charges) == 1 and ledger.epsilon() <= 2.0


def test_the_declared_run_epsilon_is_enforced(tmp_path):
    """A run declared at 2 stops at 2 for this run, although epsilon_max (10) is not reached;
    the next run may spend again."""
    site_dir = deployed(tmp_path)
    from fedmeta.approvals import approve

    low = run_declaration(CFG).model_copy(update={"epsilon": 2.0})
    approve(site_dir, low)
    # a pool is every record of the episode's classes (~900): batch 50 gives q ~ 1/19
    site = Site(
        "site-de-01", 0, site_dir, CFG.model_copy(update={"inner_steps": 8, "batch_size": 50})
    )
    replies = [site.train_round(theta(), "run-1", r, low) for r in range(1, 9)]
    trained = [r for r in replies if not r.declined]
    declined = [r for r in replies if r.declined]
    # rounds differ in pool size (so in q): a round that would pass 2 is declined, a
    # cheaper later one may still fit; the run never passes its declared epsilon
    assert trained and declined and max(r.epsilon_total for r in trained) <= 2.0
    assert all("run_epsilon_max" in r.reason for r in declined)
    deny = [e for e in entries(site_dir) if e["decision"] == "deny"][0]
    assert deny["action"] == "privacy.decline"
    assert deny["rule_ids"] == ["SITE-POLICY.run_epsilon_max"]
    assert not site.train_round(theta(), "run-2", 1, low).declined


def test_the_site_policy_caps_one_round(tmp_path):
    site_dir = deployed(tmp_path, "round_epsilon_max = 0.5\n")
    from fedmeta.approvals import approve

    approve(site_dir, run_declaration(CFG))
    cfg = CFG.model_copy(update={"inner_steps": 8, "batch_size": 50})
    reply = Site("site-de-01", 0, site_dir, cfg).train_round(theta(), "r", 1, run_declaration(CFG))
    assert reply.declined and "round_epsilon_max" in reply.reason


def test_an_erasure_written_mid_run_applies_from_the_next_round(tmp_path):
    """The Site object lives for the run (clients/app.py caches it): metadata is re-read."""
    site_dir = deployed(tmp_path)
    from fedmeta.approvals import approve

    approve(site_dir, run_declaration(CFG))
    site = Site("site-de-01", 0, site_dir, CFG)
    assert not site.train_round(theta(), "run-1", 1, run_declaration(CFG)).declined
    ids = site.records.record_ids[:7]
    (site_dir / "records-meta.csv").write_text(
        "record_id,erasure_requested\n" + "".join(f"{r},true\n" for r in ids)
    )
    reply = site.train_round(theta(), "run-1", 2, run_declaration(CFG))
    assert reply.excluded == {"GDPR-17": 7}
    records = [e for e in entries(site_dir) if e["action"] == "policy.records"]
    assert records[0]["counts"] == {} and records[1]["counts"] == {"GDPR-17": 7}


def test_small_exclusion_counts_leave_suppressed(tmp_path):
    site_dir = deployed(tmp_path)
    from fedmeta.approvals import approve

    approve(site_dir, run_declaration(CFG))
    site = Site("site-de-01", 0, site_dir, CFG)
    rid = site.records.record_ids[0]
    (site_dir / "records-meta.csv").write_text(f"record_id,erasure_requested\n{rid},true\n")
    reply = site.train_round(theta(), "run-1", 1, run_declaration(CFG))
    assert reply.excluded == {"GDPR-17": "<5"}  # min_cohort_size = 5 in the manifest
    assert [e for e in entries(site_dir) if e["action"] == "policy.records"][0]["counts"] == {
        "GDPR-17": 1
    }  # the exact count stays in the site's own log


def test_round_train_carries_the_contract_fields(tmp_path):
    site_dir = deployed(tmp_path)
    from fedmeta.approvals import approve

    approve(site_dir, run_declaration(CFG))
    Site("site-de-01", 0, site_dir, CFG).train_round(theta(), "run-1", 1, run_declaration(CFG))
    train = next(e for e in entries(site_dir) if e["action"] == "round.train")
    ledger = PrivacyLedger.read(SitePaths(site_dir).ledger)
    assert train["epsilon"] == ledger.charges[-1].epsilon_after
    examples = train["counts"]["examples"]
    assert examples > 0 and train["counts"]["steps"] == 2
    d = train["details"]
    assert d["dp"] is True and d["noise_multiplier"] == 1.0
    # digits-fewshot samples images (a record's 4 rotations are one unit): at most
    # `examples` units, so a rate at least the per-record one
    assert d["sample_rate"] >= poisson_rate(examples, CFG.batch_size)
    assert d["sample_rate"] == ledger.charges[-1].sample_rate
    assert d["steps"] == 2 and d["delta"] == 1e-5 and d["accountant"] == "prv"
    assert d["epsilon_max"] == 10.0 and d["epsilon_round"] == pytest.approx(train["epsilon"])
    assert d["run_epsilon_max"] == 8.0 and d["noise_source"] == "site-csprng"
    assert d["declaration_sha256"] == run_declaration(CFG).sha256()
    import hashlib

    assert (
        d["manifest_sha256"]
        == hashlib.sha256(SitePaths(site_dir).manifest.read_bytes()).hexdigest()
    )
    assert len(d["site_policy_sha256"]) == 64 and d["privacy_unit"] == "image"
    assert ledger.privacy_unit == "image"
    assert d["transport"] == "simulation" and "server_head" in d


# ---- the CSPRNG --------------------------------------------------------------------------
def test_the_noise_secret_is_private_and_stable(tmp_path):
    first = load_or_create_secret(tmp_path)
    assert oct((tmp_path / SECRET_FILE).stat().st_mode & 0o777) == "0o600"
    assert load_or_create_secret(tmp_path) == first and len(first) == 32
    os.chmod(tmp_path / SECRET_FILE, 0o644)
    with pytest.raises(NoiseSecretError, match="chmod 600"):
        load_or_create_secret(tmp_path)


def test_streams_are_per_round_and_gaussian():
    secret = os.urandom(32)
    a = SiteRandomness(secret, "run-1", 1).noise.normals(200_000).numpy()
    again = SiteRandomness(secret, "run-1", 1).noise.normals(10).numpy()
    other = SiteRandomness(secret, "run-1", 2).noise.normals(10).numpy()
    assert np.array_equal(a[:10], again) and not np.allclose(a[:10], other)
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    assert abs(np.mean(np.abs(a) > 1.96) - 0.05) < 0.003  # the tails are Gaussian too
    u = KeyStream(bytes(32)).uniforms(100_000)
    assert u.min() > 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01


def _exact_round(randomness, seed: int = 3):
    """One DP-SGD step with q = 1 (every record), where the clipped sum S is computable."""
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    model = nn.Linear(6, 3)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    clipped = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(16):  # per-sample gradients, clipped to C = 1 as Opacus does
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for c, g in zip(clipped, grads, strict=True):
            c += g * min(1.0, 1.0 / (float(norm) + 1e-6))
    model.load_state_dict(theta)
    pool = Pool(x.numpy(), y.numpy())
    train_steps(
        model,
        pool,
        loss_fn=nn.CrossEntropyLoss(),
        steps=1,
        lr=0.5,
        batch_size=16,
        dp=DPSettings(1.0, 1.0, randomness=randomness, grad_sample_mode="hooks"),
        seed=seed,
    )
    return theta, model.state_dict(), clipped


@pytest.mark.parametrize("mode", ["seeded", "site-csprng"])
def test_the_server_recovers_the_clipped_sum_only_from_seeded_noise(mode):
    randomness = SiteRandomness(os.urandom(32), "run-1", 1) if mode == "site-csprng" else None
    theta, phi, clipped = _exact_round(randomness)
    gen = torch.Generator().manual_seed(3 + 1)  # the seed is in the server's round config
    errs, sizes = [], []
    for (name, t), s in zip(theta.items(), clipped, strict=True):
        noise_guess = torch.normal(0.0, 1.0, size=t.shape, generator=gen)
        recovered = (t - phi[name]) * 16 / 0.5 - noise_guess
        errs.append(float((recovered - s).norm()) ** 2)
        sizes.append(float(s.norm()) ** 2)
    rel = (sum(errs) / sum(sizes)) ** 0.5
    noise_rel = (21**0.5) / sum(sizes) ** 0.5  # ||N|| / ||S|| for d = 21, sigma C = 1
    if mode == "seeded":
        assert rel < 1e-4, rel
    else:
        assert rel > 0.3 * noise_rel, (rel, noise_rel)


# ---- the run config ------------------------------------------------------------------------
def test_secure_rng_is_gone_with_a_pointer():
    with pytest.raises(ConfigError, match="secure-rng was removed"):
        RunConfig.from_flat({"secure-rng": True})


def test_a_simulated_site_keeps_seeded_reproducible_noise(tmp_path):
    t0 = theta()
    replies = [
        Site("site-0", 0, tmp_path / str(i), CFG).train_round(
            {k: v.clone() for k, v in t0.items()}, "run-1", 1, run_declaration(CFG)
        )
        for i in range(2)
    ]
    assert all(not r.declined for r in replies)
    assert all(torch.equal(replies[0].state[k], replies[1].state[k]) for k in replies[0].state)
    train = next(e for e in entries(tmp_path / "0") if e["action"] == "round.train")
    assert train["details"]["noise_source"] == "seeded"
