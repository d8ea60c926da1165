import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmeta.paths import LEDGER_FILE
from fedmeta.privacy.budget import compact, epsilon
from fedmeta.privacy.ledger import LedgerError, PrivacyLedger


def open_ledger(site_dir, eps_max=10.0, accountant="prv"):
    return PrivacyLedger.open(
        site_dir, site="site-x", epsilon_max=eps_max, delta=1e-5, accountant=accountant
    )


def test_composes_across_process_restarts_like_one_opacus_accountant(tmp_path):
    steps = [(1.0, 0.05, 8), (1.2, 0.04, 8), (1.0, 0.05, 8)]
    for rnd, step in enumerate(steps, start=1):
        open_ledger(tmp_path).charge("run-a", rnd, step)  # a fresh object each round
    for rnd, step in enumerate(steps, start=1):
        open_ledger(tmp_path).charge("run-b", rnd, step)  # a new run reusing the site dir
    ledger = PrivacyLedger.read(tmp_path / LEDGER_FILE)
    acc = PRVAccountant()
    for sigma, q, n in steps * 2:
        acc.history.append((sigma, q, n))
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)
    assert [c.run for c in ledger.charges] == ["run-a"] * 3 + ["run-b"] * 3
    eps = [c.epsilon_after for c in ledger.charges]
    assert eps == sorted(eps) and eps[0] < eps[-1]  # epsilon grows with rounds


def test_rdp_ledger_matches_opacus_rdp():
    hist = [(1.1, 0.02, 10)] * 4
    acc = RDPAccountant()
    acc.history = list(hist)
    assert epsilon(hist, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(delta=1e-5))
    assert compact(hist) == [(1.1, 0.02, 40)]


def test_declines_over_budget(tmp_path):
    ledger = open_ledger(tmp_path, eps_max=2.0)
    step = (1.0, 0.05, 8)
    exceed, after = ledger.would_exceed(step)
    assert not exceed and after < 2.0
    ledger.charge("r", 1, step)
    ledger.charge("r", 2, step)
    exceed, after = ledger.would_exceed(step)
    assert exceed and after > 2.0


def test_refuses_corrupt_ledger(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.charge("r", 1, (1.0, 0.05, 8))
    path = tmp_path / LEDGER_FILE
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"steps":8', '"steps":"eight"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 2"):
        open_ledger(tmp_path)


def test_refuses_truncated_last_line(tmp_path):
    open_ledger(tmp_path).charge("r", 1, (1.0, 0.05, 8))
    path = tmp_path / LEDGER_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LedgerError, match="incomplete last line"):
        open_ledger(tmp_path)


def test_refuses_missing_but_expected_ledger(tmp_path):
    open_ledger(tmp_path).charge("r", 1, (1.0, 0.05, 8))
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match="missing"):
        open_ledger(tmp_path)


def test_delta_cannot_change_silently(tmp_path):
    open_ledger(tmp_path)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(tmp_path, site="site-x", epsilon_max=10, delta=1e-6, accountant="prv")


def test_budget_change_is_recorded_not_rewritten(tmp_path):
    open_ledger(tmp_path, eps_max=10.0)
    ledger = open_ledger(tmp_path, eps_max=4.0)
    assert ledger.epsilon_max == 4.0
    kinds = [json.loads(x)["kind"] for x in (tmp_path / LEDGER_FILE).read_text().splitlines()]
    assert kinds == ["header", "budget"]
    assert PrivacyLedger.read(tmp_path / LEDGER_FILE).epsilon_max == 4.0


def test_summary_document_shape(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.charge("run-1", 3, (1.0, 0.05, 8))
    doc = ledger.summary()
    assert set(doc) >= {"site", "epsilon_max", "delta", "accountant", "entries"}
    assert set(doc["entries"][0]) == {
        "run",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "epsilon_after",
    }


def test_a_charge_by_another_process_is_seen_under_the_lock(tmp_path):
    """The ledger is re-read under the lock only when the file changed; an append by
    another writer always changes it, so the budget check never misses a charge."""
    mine = open_ledger(tmp_path)
    with mine.locked():
        mine.charge("run-a", 1, (1.0, 0.05, 8))
    with mine.locked():  # unchanged file: the charges in memory are the file's
        assert [c.round for c in mine.charges] == [1]
    other = open_ledger(tmp_path)  # e.g. a second process serving the same site
    with other.locked():
        other.charge("run-a", 2, (1.0, 0.05, 8))
    with mine.locked():
        assert [c.round for c in mine.charges] == [1, 2]
        assert mine.epsilon() == pytest.approx(other.epsilon())


def test_plan_run_grid_counts_other_runs_and_this_runs_most(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.charge("old", 1, (1.0, 0.05, 8))
    ledger.charge("run-a", 1, (1.0, 0.05, 8))
    ledger.plan_run("run-a", 30 * 8)
    assert ledger.grid_steps == 8 + 240
    assert ledger.epsilon() == pytest.approx(epsilon(ledger.history, 1e-5), rel=1e-4)


def test_a_reused_ledger_is_the_file_or_is_read_again(tmp_path):
    """A site keeps the ledger it last read or wrote and reopens it without re-reading the
    file only while the file is unchanged; any other write, a missing ledger or a changed
    setting is seen as with a fresh read."""
    ledger = open_ledger(tmp_path)
    ledger.charge("run", 1, (1.0, 0.05, 8))
    again = PrivacyLedger.open(
        tmp_path, site="site-x", epsilon_max=10.0, delta=1e-5, accountant="prv", reuse=ledger
    )
    assert again is ledger and ledger.unchanged()
    on_disk = PrivacyLedger.read(ledger.path).charges
    assert [c.step for c in again.charges] == [c.step for c in on_disk]
    open_ledger(tmp_path).charge("run", 2, (1.0, 0.05, 8))  # another process
    assert not ledger.unchanged()
    fresh = PrivacyLedger.open(
        tmp_path, site="site-x", epsilon_max=10.0, delta=1e-5, accountant="prv", reuse=ledger
    )
    assert fresh is not ledger and [c.round for c in fresh.charges] == [1, 2]
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(
            tmp_path, site="site-x", epsilon_max=10.0, delta=1e-6, accountant="prv", reuse=fresh
        )
    (tmp_path / LEDGER_FILE).unlink()
    assert not fresh.unchanged()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(
            tmp_path, site="site-x", epsilon_max=10.0, delta=1e-5, accountant="prv", reuse=fresh
        )


@settings(max_examples=15, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["run-a", "run-b"]), st.sampled_from([20, 25])),
        min_size=1,
        max_size=6,
    )
)
def test_kept_step_counts_give_the_epsilon_of_the_whole_history(tmp_path_factory, writes):
    """A ledger keeps its steps per (sigma, q) between epsilon calls, per run and for all
    charges, while its list of charges only grows; a fresh read under the lock (another
    writer's charge) replaces them. Whatever the order of the two writers' charges, its
    epsilons equal those of the whole history on disk, merged anew."""
    site_dir = tmp_path_factory.mktemp("ledger")
    mine, other = open_ledger(site_dir), open_ledger(site_dir)
    for rnd, (by_me, run, pool) in enumerate(writes, start=1):
        ledger = mine if by_me else other
        with ledger.locked():
            ledger.charge(run, rnd, (1.0, 1 / pool, 8))
        with mine.locked():  # re-read when the other writer charged
            on_disk = PrivacyLedger.read(mine.path).charges
            assert mine.epsilon() == epsilon([c.step for c in on_disk], 1e-5)
            for name in ("run-a", "run-b"):
                steps = [c.step for c in on_disk if c.run == name]
                assert mine.run_epsilon(name) == epsilon(steps, 1e-5)
