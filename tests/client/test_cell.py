"""The cell layout (sax.cell) over both storage backends."""

from __future__ import annotations

import time

import pytest

from sax import cell
from sax.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from sax.naming import parse_cell
from sax.storage import Store, open_store
from sax.v1 import admin_pb2

TEST = parse_cell("/sax/test")


@pytest.fixture
def store(sax_root: str) -> Store:
    return open_store(sax_root)


def test_create_cell_writes_config_and_empty_location(store: Store) -> None:
    cell.create_cell(store, TEST, fs_root="gs://b/fs", admin_acl="acl/all")
    config = cell.read_config(store, TEST)
    assert config.fs_root == "gs://b/fs"
    assert config.admin_acl == "acl/all"
    assert store.list_dir("sax/test") == [cell.CONFIG_FILE, cell.LOCATION_FILE]


def test_create_cell_twice_is_already_exists(store: Store) -> None:
    cell.create_cell(store, TEST, fs_root="first")
    with pytest.raises(AlreadyExistsError, match="/sax/test already exists"):
        cell.create_cell(store, TEST, fs_root="second")
    assert cell.read_config(store, TEST).fs_root == "first"


def test_read_config_of_missing_cell_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match="saxutil create /sax/test"):
        cell.read_config(store, TEST)


def test_read_location_of_missing_cell_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        cell.read_location(store, TEST)


def test_read_location_before_any_admin_is_failed_precondition(store: Store) -> None:
    cell.create_cell(store, TEST)
    with pytest.raises(UnavailableError, match="no admin server has been started"):
        cell.read_location(store, TEST)


def test_write_and_read_location(store: Store) -> None:
    cell.create_cell(store, TEST)
    before_ms = int(time.time() * 1000)
    cell.write_location(store, TEST, "127.0.0.1:10000", admin_id="admin-1")
    loc = cell.read_location(store, TEST)
    assert loc.location == "127.0.0.1:10000"
    assert loc.admin_id == "admin-1"
    assert before_ms <= loc.updated_ms <= int(time.time() * 1000)
    cell.write_location(store, TEST, "127.0.0.1:10001", admin_id="admin-2")
    assert cell.read_location(store, TEST).location == "127.0.0.1:10001"


def test_state_round_trip(store: Store) -> None:
    cell.create_cell(store, TEST)
    assert cell.read_state(store, TEST) == admin_pb2.State()  # never saved: empty
    state = admin_pb2.State()
    state.models.add().model_id = "/sax/test/a"
    state.models.add().model_id = "/sax/test/b"
    cell.write_state(store, TEST, state)
    assert cell.read_state(store, TEST) == state
    cell.write_state(store, TEST, admin_pb2.State())
    assert cell.read_state(store, TEST) == admin_pb2.State()


def test_corrupt_state_is_failed_precondition(store: Store) -> None:
    cell.create_cell(store, TEST)
    store.write("sax/test/" + cell.STATE_FILE, b"\x0a\x7fnot a proto")
    with pytest.raises(FailedPreconditionError, match="state of cell /sax/test"):
        cell.read_state(store, TEST)


def test_corrupt_location_is_failed_precondition(store: Store) -> None:
    cell.create_cell(store, TEST)
    store.write("sax/test/" + cell.LOCATION_FILE, b"\xff\xff\xff")
    with pytest.raises(FailedPreconditionError, match="location record"):
        cell.read_location(store, TEST)


def test_list_cells(store: Store) -> None:
    assert cell.list_cells(store) == []
    for name in ["/sax/zeta", "/sax/alpha", "/sax/mid"]:
        cell.create_cell(store, parse_cell(name))
    store.write("sax/stray/state.proto", b"")  # a folder without config is not a cell
    store.write("sax/Bad_Name/config.proto", b"")  # not a valid cell name
    store.write("sax/file.txt", b"")
    assert cell.list_cells(store) == ["/sax/alpha", "/sax/mid", "/sax/zeta"]


def test_cells_are_independent(store: Store) -> None:
    other = parse_cell("/sax/other")
    cell.create_cell(store, TEST)
    cell.create_cell(store, other)
    cell.write_location(store, TEST, "127.0.0.1:1", admin_id="a")
    assert cell.read_location(store, TEST).location == "127.0.0.1:1"
    with pytest.raises(UnavailableError):
        cell.read_location(store, other)
