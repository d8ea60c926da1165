"""The strategies on real Flower records and messages (no simulation needed)."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.meta.reptile import beta_at, reptile_update
from server.strategy.fedavg import FedAvgBaseline
from server.strategy.reptile import Reptile

KEYS = ("w", "b")


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def arrays(values):
    return ArrayRecord(
        {k: Array(np.asarray(v, dtype=np.float32)) for k, v in zip(KEYS, values, strict=True)}
    )


def metrics(n, declined=0, eps=1.0):
    # what a site sends (clients/app.py reply_record): no train-loss, an un-noised statistic
    return MetricRecord(
        {
            "num-examples": n,
            "declined": declined,
            "steps": 4,
            "epsilon-round": eps / 2,
            "epsilon-total": eps,
            "dp": 1,
            "excluded": 0,
        }
    )


def reply(node, content):
    sent = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    if isinstance(content, Error):
        return Message(content, reply_to=sent)
    return Message(content, reply_to=sent)


def train_reply(node, values, n, **kw):
    return reply(
        node,
        RecordDict(
            {
                "arrays": arrays(values),
                "metrics": metrics(n, **kw),
                "info": ConfigRecord({"site-id": f"s{node}", "reason": ""}),
            }
        ),
    )


def declined_reply(node, reason="privacy budget"):
    return reply(
        node,
        RecordDict(
            {
                "arrays": ArrayRecord(),
                "metrics": metrics(0, declined=1),
                "info": ConfigRecord({"site-id": f"s{node}", "reason": reason}),
            }
        ),
    )


THETA = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, -0.5])]


def make(cls=Reptile, rounds=10, **kw):
    strat = cls(beta0=0.8, beta_final=0.2, num_rounds=rounds, **kw) if cls is Reptile else cls(**kw)
    strat.setup_sites(
        sites={1: "s1", 2: "s2", 3: "s3"}, seed=0, min_sites=1, node_wait_s=1, max_update_norm=100.0
    )
    theta = arrays(THETA)
    strat.rounds[3] = __import__("server.strategy.sites", fromlist=["RoundLog"]).RoundLog(3)
    strat.rounds[3].sampled = ["s1", "s2", "s3"]
    strat.theta = theta
    strat.before_send(3, theta, ConfigRecord())
    return strat


def test_reptile_step_equals_hand_computed():
    strat = make()
    phi1 = [THETA[0] + 1.0, THETA[1] - 2.0]
    phi2 = [THETA[0] * 2, THETA[1] * 0]
    out, agg = strat.aggregate_train(3, [train_reply(1, phi1, 30), train_reply(2, phi2, 10)])
    beta = beta_at(3, 10, 0.8, 0.2)
    assert beta == pytest.approx(0.8 + (0.2 - 0.8) * 2 / 9)
    # by hand: theta + beta * (0.75 (phi1 - theta) + 0.25 (phi2 - theta))
    hand = [
        THETA[0] + beta * (0.75 * 1.0 + 0.25 * THETA[0]),
        THETA[1] + beta * (0.75 * -2.0 + 0.25 * -THETA[1]),
    ]
    got = out.to_numpy_ndarrays()
    for g, h, r in zip(got, hand, reptile_update(THETA, [phi1, phi2], [30, 10], beta), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-6)
        np.testing.assert_allclose(g, r, rtol=1e-6)
    assert strat.rounds[3].used == ["s1", "s2"] and strat.rounds[3].examples == 40


def test_fedavg_baseline_is_plain_weighted_average():
    strat = make(FedAvgBaseline)
    phi1 = [THETA[0] + 1.0, THETA[1]]
    phi2 = [THETA[0] - 1.0, THETA[1]]
    out, _ = strat.aggregate_train(3, [train_reply(1, phi1, 10), train_reply(2, phi2, 30)])
    np.testing.assert_allclose(out.to_numpy_ndarrays()[0], THETA[0] - 0.5, rtol=1e-6)


def test_declines_are_counted_and_do_not_break_aggregation():
    strat = make()
    out, _ = strat.aggregate_train(3, [declined_reply(1), train_reply(2, THETA, 10)])
    assert out is not None
    assert strat.rounds[3].declined == {"s1": "privacy budget"}
    assert strat.rounds[3].used == ["s2"]


def test_round_where_every_site_declines_keeps_theta():
    strat = make()
    out, agg = strat.aggregate_train(3, [declined_reply(1), declined_reply(2)])
    assert out is None and agg is None
    assert set(strat.rounds[3].declined) == {"s1", "s2"}
    assert strat.rounds[3].lost == {"s3": "no reply before the round timeout"}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ([THETA[0] * np.nan, THETA[1]], "non-finite"),
        ([np.zeros((3, 2)), THETA[1]], "shape"),
        ([THETA[0] + 1e4, THETA[1]], "norm"),
    ],
)
def test_bad_replies_are_dropped_with_a_reason(bad, reason):
    strat = make()
    out, _ = strat.aggregate_train(3, [train_reply(1, bad, 10), train_reply(2, THETA, 10)])
    assert reason in strat.rounds[3].dropped["s1"]
    np.testing.assert_allclose(out.to_numpy_ndarrays()[0], THETA[0], rtol=1e-6)


def test_wrong_keys_and_error_replies_are_recorded_not_fatal():
    strat = make()
    wrong = reply(
        1,
        RecordDict(
            {
                "arrays": ArrayRecord({"zz": Array(np.zeros(2))}),
                "metrics": metrics(5),
                "info": ConfigRecord({"reason": ""}),
            }
        ),
    )
    err = reply(2, Error(code=2, reason="ClientApp raised"))
    out, _ = strat.aggregate_train(3, [wrong, err, train_reply(3, THETA, 10)])
    assert "keys" in strat.rounds[3].dropped["s1"]
    assert "ClientApp raised" in strat.rounds[3].lost["s2"]
    assert out is not None


def test_the_signed_round_end_names_each_lost_and_dropped_site_and_why(tmp_path):
    """Not only a count: the server's signed log says which site was lost and why, within
    the audit entry's size limits even for many sites with long reasons."""
    from fedmeta.audit import AuditLog, verify_log
    from server.strategy.sites import RoundLog, outcome_details

    strat = make()
    log = AuditLog.open(tmp_path / "server.jsonl", tmp_path / "k.pem", actor="server")
    strat.audit, strat.run_id = log, "run-1"
    wrong = reply(
        1,
        RecordDict(
            {
                "arrays": ArrayRecord({"zz": Array(np.zeros(2))}),
                "metrics": metrics(5),
                "info": ConfigRecord({"reason": ""}),
            }
        ),
    )
    err = reply(2, Error(code=5, reason="Node Unavailable\nretry later"))
    strat.aggregate_train(3, [wrong, err, train_reply(3, THETA, 10)])
    log.close()
    assert verify_log(tmp_path / "server.jsonl").ok
    end = next(
        e
        for e in __import__("fedmeta.audit", fromlist=["read_log"]).read_log(
            tmp_path / "server.jsonl"
        )[0]
        if e.action == "round.end"
    )
    assert end.details["lost:s2"] == "error 5: Node Unavailable"  # its first line
    assert "keys" in end.details["dropped:s1"] and end.counts["lost"] == 1
    many = RoundLog(1)
    many.lost = {f"site-{i:02d}-" + "x" * 50: "r" * 300 for i in range(40)}
    many.declined = {"site-a": "budget"}
    details = outcome_details(many)
    assert details["more"] == 41 - (len(details) - 1) and "lost:site-00-" + "x" * 50 in details
