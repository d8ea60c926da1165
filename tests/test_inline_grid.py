"""The in-process grid delivers messages as Flower's simulation engine does."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.object_ref import load_app
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.config import RunConfig
from fedmeta.inline_grid import InlineGrid


def toy_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        seen = context.state.config_records.get("seen", ConfigRecord({"n": 0}))
        context.state["seen"] = ConfigRecord({"n": int(seen["n"]) + 1})
        msg.content["config"]["touched"] = True  # what a site does to its copy stays there
        return Message(
            RecordDict(
                {
                    "echo": ConfigRecord(
                        {
                            "partition": context.node_config["partition-id"],
                            "partitions": context.node_config["num-partitions"],
                            "node": context.node_id,
                            "n": int(seen["n"]) + 1,
                        }
                    )
                }
            ),
            reply_to=msg,
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full at site 1")
        return Message(RecordDict({"ok": ConfigRecord({"x": 1})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        other = Message(
            RecordDict(), dst_node_id=context.node_id, message_type=MessageType.EVALUATE
        )
        return Message(RecordDict(), reply_to=other)  # answers a message never delivered

    return app


def make_grid(app: ClientApp, n: int = 3) -> InlineGrid:
    grid = InlineGrid(app, n)
    TaskIdentity.task_id, TaskIdentity.node_id = 1, SUPERLINK_NODE_ID
    TaskIdentity.run_id = grid.run.run_id
    return grid


def to_all(grid: InlineGrid, kind: str, record: RecordDict | None = None) -> list[Message]:
    return [
        Message(
            record or RecordDict({"config": ConfigRecord({"k": 1})}),
            dst_node_id=n,
            message_type=kind,
        )
        for n in grid.get_node_ids()
    ]


def test_nodes_have_their_own_context_like_flowers_simulation():
    grid = make_grid(toy_app(), 4)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 4 and SUPERLINK_NODE_ID not in nodes
    contexts = [grid.contexts[n] for n in nodes]
    assert [c.node_config["partition-id"] for c in contexts] == [0, 1, 2, 3]
    assert {c.node_config["num-partitions"] for c in contexts} == {4}
    assert len({id(c.state) for c in contexts}) == 4
    assert {c.run_id for c in contexts} == {grid.run.run_id}


def test_replies_carry_flowers_metadata_and_node_state_persists():
    grid = make_grid(toy_app())
    sent = to_all(grid, MessageType.QUERY)
    replies = list(grid.send_and_receive(sent))
    assert len(replies) == 3
    by_id = {m.metadata.message_id: m for m in sent}
    assert len(by_id) == 3 and "" not in by_id
    for reply in replies:
        meta = reply.metadata
        ins = by_id[meta.reply_to_message_id]
        assert meta.src_node_id == ins.metadata.dst_node_id
        assert meta.dst_node_id == SUPERLINK_NODE_ID and meta.run_id == grid.run.run_id
        assert meta.message_id and meta.message_id not in by_id
        assert meta.message_type == MessageType.QUERY and not reply.has_error()
        echo = reply.content["echo"]
        assert echo["node"] == meta.src_node_id and echo["partitions"] == 3
        assert grid.contexts[meta.src_node_id].node_config["partition-id"] == echo["partition"]
    assert all("touched" not in m.content["config"] for m in sent)  # copies were delivered
    again = list(grid.send_and_receive(to_all(grid, MessageType.QUERY)))
    assert sorted(r.content["echo"]["n"] for r in again) == [2, 2, 2]  # per-node state


def test_a_raising_clientapp_gives_an_error_reply_and_the_others_answer():
    grid = make_grid(toy_app())
    sent = to_all(grid, MessageType.TRAIN)
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(sent)}
    assert len(replies) == 3
    broken = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 1)
    err = replies.pop(broken)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "disk full at site 1" in err.error.reason
    assert err.metadata.reply_to_message_id in {m.metadata.message_id for m in sent}
    assert all(not r.has_error() and r.content["ok"]["x"] == 1 for r in replies.values())


def test_a_reply_to_another_message_is_dropped_as_the_superlink_does():
    grid = make_grid(toy_app())
    sent = to_all(grid, MessageType.EVALUATE)
    ids = list(grid.push_messages(sent))
    assert len(ids) == 3
    assert list(grid.pull_messages(ids)) == []


def test_a_message_to_an_unknown_node_is_not_delivered():
    grid = make_grid(toy_app())
    unknown = max(grid.get_node_ids()) + 1
    msg = Message(
        RecordDict({"config": ConfigRecord({"k": 1})}),
        dst_node_id=unknown,
        message_type=MessageType.QUERY,
    )
    assert list(grid.send_and_receive([msg])) == []


def test_messages_must_come_from_this_run():
    grid = make_grid(toy_app())
    msg = to_all(grid, MessageType.QUERY)[0]
    TaskIdentity.run_id = grid.run.run_id + 1
    stray = Message(
        RecordDict(), dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.QUERY
    )
    with pytest.raises(ValueError, match="run_id"):
        grid.push_messages([stray])


def test_the_real_clientapp_identifies_each_simulated_site(tmp_path):
    app = load_app("clients.app:app", ValueError)
    grid = make_grid(app, 2)
    config = ConfigRecord(RunConfig(out_dir=str(tmp_path), sites=2).to_flat())
    replies = list(
        grid.send_and_receive(to_all(grid, MessageType.QUERY, RecordDict({"config": config})))
    )
    sites = {r.metadata.src_node_id: r.content["site"]["site-id"] for r in replies}
    assert sorted(sites.values()) == ["site-0", "site-1"]
    for node, site in sites.items():
        assert site == f"site-{grid.contexts[node].node_config['partition-id']}"
