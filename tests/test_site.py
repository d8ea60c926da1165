"""A site's round on real objects: policies, ledger, audit log, Opacus."""

from __future__ import annotations

import json

import pytest

from fedmeta.audit import verify_log
from fedmeta.config import RunConfig, build_task
from fedmeta.data.record_meta import RecordMetaError
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.paths import SitePaths
from fedmeta.site import Site, planned_rounds
from policies import default_site_manifest, example_run_declaration

CFG = RunConfig(sites=3, inner_steps=2, n_way=5)


def theta():
    return build_task(CFG).build_model(5).state_dict()


def entries(site_dir):
    return [json.loads(x) for x in (site_dir / AUDIT_LOG).read_text().splitlines()]


def test_a_site_denied_by_policy_declines_with_rule_and_reference(tmp_path):
    manifest = default_site_manifest("site-0").model_copy(
        update={"approved_purposes": frozenset({"care.treatment"})}
    )
    site = Site("site-0", 0, tmp_path, CFG, manifest=manifest)
    reply = site.train_round(theta(), "run-1", 1, example_run_declaration())
    assert reply.declined and reply.state is None
    assert "GDPR-5-1-b" in reply.reason and "Art. 5(1)(b)" in reply.reason
    assert not SitePaths(tmp_path).ledger.exists()  # nothing was trained or charged
    last = entries(tmp_path)[-1]
    assert last["action"] == "policy.site" and last["decision"] == "deny"
    assert verify_log(tmp_path / AUDIT_LOG).ok


def test_an_allowed_round_is_audited_before_and_after_training(tmp_path):
    site = Site("site-1", 1, tmp_path, CFG)
    reply = site.train_round(theta(), "run-1", 1, example_run_declaration(), "7:" + "a" * 64)
    assert not reply.declined and reply.epsilon_total > 0
    actions = [e["action"] for e in entries(tmp_path)]
    assert actions == ["log.created", "policy.site", "policy.records", "round.train", "round.reply"]
    train = entries(tmp_path)[3]
    assert train["details"]["server_head"] == "7:" + "a" * 64 and train["model_in"]
    seq, digest = reply.receipt.split(":")
    assert int(seq) == 4 and len(digest) == 64


def test_all_records_excluded_declines(tmp_path):
    site_dir = tmp_path / "s"
    site_dir.mkdir()
    ids = build_task(CFG).site_records(0).record_ids
    rows = ["record_id,erasure_requested"] + [f"{r},true" for r in ids]
    (site_dir / "records-meta.csv").write_text("\n".join(rows) + "\n")
    site = Site("site-0", 0, site_dir, CFG)
    reply = site.train_round(theta(), "run-1", 1, example_run_declaration())
    assert reply.declined and "usable records" in reply.reason
    assert reply.excluded == {"GDPR-17": len(ids)}


@pytest.mark.parametrize(
    "content, needle",
    [
        ("record_id,shoe_size\nx,3\n", "line 1"),
        ("record_id,age\nnot-a-record,30\n", "line 2, column 'record_id'"),
        ("record_id,age\n{rid},old\n", "line 2"),
        ("record_id,guardian_consent\n{rid},maybe\n", "line 2"),
    ],
)
def test_malformed_record_metadata_is_a_one_line_error(tmp_path, content, needle):
    rid = build_task(CFG).site_records(0).record_ids[0]
    (tmp_path / "records-meta.csv").write_text(content.format(rid=rid))
    with pytest.raises(RecordMetaError) as err:
        Site("site-0", 0, tmp_path, CFG)
    assert needle in str(err.value) and "records-meta.csv" in str(err.value)
    assert "\n" not in str(err.value)


def test_target_epsilon_is_planned_over_expected_participation_and_capped(tmp_path):
    """A site sampled every round spends the target by its planned round, then declines."""
    cfg = RunConfig(
        sites=4,
        fraction_train=0.5,
        min_sites=2,
        rounds=40,
        inner_steps=2,
        target_epsilon=8.0,
        epsilon_max=8.0,
    )  # what the example declaration offers
    planned = planned_rounds(cfg)
    assert planned == 30  # 20 expected + 3 standard deviations (sqrt(10)), not all 40
    assert planned_rounds(cfg.model_copy(update={"fraction_train": 1.0})) == 40
    site = Site("site-0", 0, tmp_path, cfg)
    replies = [
        site.train_round(theta(), "run-1", r, example_run_declaration()) for r in range(1, 41)
    ]
    trained = [r for r in replies if not r.declined]
    assert planned - 1 <= len(trained) <= planned
    assert 0.95 * 8.0 <= trained[-1].epsilon_total <= 8.0
    assert all("privacy budget" in r.reason for r in replies[len(trained) :])


def test_a_model_dp_cannot_train_is_declined_before_any_charge(tmp_path):
    """BatchNorm keeps running statistics of the private batches: refused before the ledger
    is touched, with the fix in the reason, and the refusal is in the site's signed log."""
    import json

    from torch import nn

    from fedmeta.config import run_declaration
    from fedmeta.paths import LEDGER_FILE

    site = Site("site-0", 0, tmp_path, CFG, simulated=True)

    def with_batchnorm(out_dim: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out_dim)
        )

    site.task.build_model = with_batchnorm  # type: ignore[method-assign]
    theta = with_batchnorm(site.task.out_dim(CFG.strategy)).state_dict()
    reply = site.train_round(theta, "run-1", 1, run_declaration(CFG))
    assert reply.declined and "DP model check" in reply.reason and "GroupNorm" in reply.reason
    assert not (tmp_path / LEDGER_FILE).exists()  # nothing was charged
    entries = [json.loads(x) for x in SitePaths(tmp_path).audit_log.read_text().splitlines()]
    (deny,) = [e for e in entries if e["decision"] == "deny"]
    assert deny["rule_ids"] == ["PRIV-MODEL"] and "BatchNorm" in deny["details"]["reason"]


def test_the_model_is_checked_once_per_site_process_and_a_refusal_is_not_kept(
    tmp_path, monkeypatch
):
    """The site builds every round's model with its task's builder (theta only fills in
    values), so the clipping mode found for round 1 serves the rounds after it; a model
    the check refuses is checked again the next round (a fixed builder then trains)."""
    from torch import nn

    from fedmeta import site as site_module
    from fedmeta.config import run_declaration

    calls = []
    real = site_module.dp_mode

    def counted(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(site_module, "dp_mode", counted)
    declaration = run_declaration(CFG)
    site = Site("site-0", 0, tmp_path, CFG, simulated=True)
    built = site.task.build_model

    def with_batchnorm(out_dim: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out_dim)
        )

    site.task.build_model = with_batchnorm  # type: ignore[method-assign]
    bad = with_batchnorm(site.task.out_dim(CFG.strategy)).state_dict()
    for rnd in (1, 2):
        assert site.train_round(bad, "run-1", rnd, declaration).declined
    site.task.build_model = built  # type: ignore[method-assign]
    for rnd in (3, 4, 5):
        reply = site.train_round(theta(), "run-1", rnd, declaration)
        assert not reply.declined and reply.dp
    assert calls == ["Sequential", "Sequential", "SmallCNN"]
