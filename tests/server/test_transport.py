"""The transport a run records is the one its launcher states, never guessed from argv."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedmeta.inline_grid import TRANSPORT_KEY, InlineGrid
from fedmeta.paths import TRANSPORT_ENV
from server.app import transport_for
from server.run import serverapp_tls


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture
def inline_grid() -> InlineGrid:
    return InlineGrid(ClientApp(), 1)


def test_the_context_states_the_transport_before_the_environment(inline_grid, monkeypatch):
    monkeypatch.setenv(TRANSPORT_ENV, "tls+supernode-auth")
    assert transport_for(inline_grid, context({TRANSPORT_KEY: "simulation"})) == "simulation"
    assert transport_for(inline_grid, context({})) == "tls+supernode-auth"


def test_nothing_stated_is_not_recorded_whatever_argv_holds(inline_grid, monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    monkeypatch.setattr("sys.argv", ["flwr-serverapp", "--insecure"])
    assert transport_for(inline_grid, context({})) == "not recorded"
    assert serverapp_tls("not recorded") is None


def test_flowers_simulation_runtime_is_a_simulation(monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    grid = InMemoryGrid(
        LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    )
    assert transport_for(grid, context({})) == "simulation"
    monkeypatch.setenv(TRANSPORT_ENV, "insecure")  # stated: wins over the grid's kind
    assert transport_for(grid, context({})) == "insecure"


@pytest.mark.parametrize(
    ("transport", "tls"), [("simulation", None), ("tls+supernode-auth", True), ("insecure", False)]
)
def test_serverapp_tls_follows_the_stated_transport(transport, tls):
    assert serverapp_tls(transport) is tls
