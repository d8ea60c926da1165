"""A Flower Grid that runs every simulated site in this process, without Ray.

``InlineGrid`` holds ``N`` simulated nodes, each with its own Flower
``Context`` (``node_config`` ``{"partition-id": i, "num-partitions": N}`` and
its own ``state``), exactly as Flower's simulation engine registers them.
Each message the ServerApp sends is copied (pickled, as Ray does between the
server thread and a site's actor), handed to the real ClientApp by calling
it, and its reply is checked the way Flower's SuperLink checks one (it must
answer that message, from that node, in that run) before the ServerApp can
pull it. A ClientApp that raises gives an error reply carrying Flower's
``CLIENT_APP_RAISED_EXCEPTION`` code, as in Flower's simulation.

Sites run one after the other, in the order the ServerApp sent the messages.
There is no timeout: a ClientApp that hangs hangs the run.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import traceback
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

TRANSPORT_KEY = "fedmeta-transport"  # the ServerApp context's node config: how sites are reached

logger = logging.getLogger(__name__)
ID_BITS = 63  # Flower's node and run ids are positive signed 64-bit integers


def _copy(message: Message) -> Message:
    """What crossing a process boundary does to a message: nothing is shared."""
    return pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def error_reply(message: Message, exc: BaseException) -> Message:
    """The reply Flower's simulation engine sends when the ClientApp raises."""
    wrapped = ClientAppException(f"{type(exc).__name__}: {exc}")
    reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
    )


class InlineGrid(Grid):
    """Delivers the ServerApp's messages to ``client_app`` on ``num_nodes`` in-process nodes."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int | None = None) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes: expected at least 1 node, got {num_nodes}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id if run_id is not None else secrets.randbits(ID_BITS))
        self.contexts: dict[int, Context] = {}
        while len(self.contexts) < num_nodes:
            node_id = secrets.randbits(ID_BITS)
            if node_id in self.contexts or node_id == SUPERLINK_NODE_ID:
                continue
            self.contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: len(self.contexts), NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._replies: dict[str, Message] = {}

    # ---- Grid API --------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply (if any) waits to be pulled."""
        ids: list[str] = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self._check_instruction(message)
            if message.metadata.dst_node_id not in self.contexts:
                logger.warning(
                    "message to unknown node %s not delivered", message.metadata.dst_node_id
                )
                continue
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- delivery --------------------------------------------------------------------
    def _check_instruction(self, message: Message) -> None:
        meta = message.metadata
        if meta.reply_to_message_id or meta.ttl <= 0 or meta.delivered_at:
            raise ValueError(f"Invalid message: {message}")
        if meta.src_node_id != SUPERLINK_NODE_ID or meta.run_id != self._run.run_id:
            raise ValueError(
                f"message {meta.message_id}: src_node_id/run_id "
                f"({meta.src_node_id}/{meta.run_id}) are not this grid's"
            )

    def _deliver(self, message: Message) -> Message | None:
        delivered = _copy(message)
        delivered.metadata.delivered_at = now().isoformat()
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(delivered, context)
        except Exception as exc:  # a site's failure is the ServerApp's to handle
            logger.warning(
                "node %s: the ClientApp raised %s: %s", context.node_id, type(exc).__name__, exc
            )
            logger.debug("%s", traceback.format_exc())
            reply = error_reply(delivered, exc)
        problem = self._reply_problem(message, reply)
        if problem:  # the SuperLink drops such a reply: the ServerApp sees none
            logger.error("node %s: reply dropped (%s)", context.node_id, problem)
            return None
        reply = _copy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    @staticmethod
    def _reply_problem(message: Message, reply: object) -> str | None:
        if not isinstance(reply, Message):
            return f"the ClientApp returned {type(reply).__name__}, not a Message"
        meta, sent = reply.metadata, message.metadata
        if meta.reply_to_message_id != sent.message_id:
            return "it does not reply to the message delivered"
        if meta.src_node_id != sent.dst_node_id or meta.run_id != sent.run_id:
            return "its source node or run differs from the message delivered"
        return None


def run_inline(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    run_config: dict[str, Any] | None = None,
) -> Context:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApp nodes; returns its
    context (whose run config is ``run_config``, as `flwr run` gives it; default empty).
    Exceptions of the ServerApp propagate."""
    grid = InlineGrid(client_app, num_nodes)
    run_id = grid.run.run_id
    # what Flower's simulation runtime sets for a ServerApp: messages it creates carry
    # this run id and the SuperLink's node id as their source
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    # the sites are simulated: stated to the ServerApp in its context (server.app)
    context = Context(
        run_id=run_id,
        node_id=0,
        node_config={TRANSPORT_KEY: "simulation"},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    server_app(grid, context)
    return context
