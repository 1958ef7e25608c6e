"""PublishedState: validation first, save second, memory last."""

from __future__ import annotations

import asyncio

import pytest

from admin_server.state import PublishedState
from sax import cell as cell_layout
from sax.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from sax.naming import parse_cell
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2

CELL = parse_cell("/sax/test")


def _model(model_id: str = "/sax/test/tiny", replicas: int = 1, **overrides: str):
    return admin_pb2.Model(
        model_id=model_id,
        model_path="test.TinyLM",
        checkpoint_path="None",
        requested_num_replicas=replicas,
        overrides=overrides,
    )


@pytest.fixture
def store(tmp_path) -> LocalStore:
    s = LocalStore(tmp_path)
    cell_layout.create_cell(s, CELL)
    return s


def test_publish_update_unpublish_survive_restore(store) -> None:
    state = PublishedState(store, CELL)
    published = asyncio.run(state.publish(_model(BATCH_SIZE="4")))
    assert len(published.uuid) == 16 and published.version == 1
    updated = asyncio.run(state.update(_model(replicas=3, BATCH_SIZE="4")))
    assert updated.uuid == published.uuid and updated.version == 2

    restored = PublishedState(store, CELL)
    restored.restore()
    assert restored.get("/sax/test/tiny") == updated
    assert restored.config_of(updated).batch_sizes == (4,)

    asyncio.run(restored.unpublish("/sax/test/tiny"))
    again = PublishedState(store, CELL)
    again.restore()
    assert again.models() == {}


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (_model("/sax/test/Bad"), InvalidArgumentError),
        (_model("/sax/other/tiny"), InvalidArgumentError),
        (_model("sax/test/tiny"), InvalidArgumentError),
        (_model(replicas=-1), InvalidArgumentError),
        (_model(NO_SUCH_KEY="1"), InvalidArgumentError),
        (_model(BATCH_SIZE='[1, "x"]'), InvalidArgumentError),
        (_model(MAX_DECODE_STEPS="0"), InvalidArgumentError),
        (
            admin_pb2.Model(model_id="/sax/test/x", model_path="no.Such", checkpoint_path="None"),
            NotFoundError,
        ),
        (
            admin_pb2.Model(model_id="/sax/test/x", model_path="test.TinyLM", checkpoint_path=""),
            InvalidArgumentError,
        ),
        (
            admin_pb2.Model(
                model_id="/sax/test/x", model_path="test.TinyLM", checkpoint_path="a b"
            ),
            InvalidArgumentError,
        ),
    ],
)
def test_bad_publish_changes_nothing(store, model, error) -> None:
    state = PublishedState(store, CELL)
    asyncio.run(state.publish(_model("/sax/test/keep")))
    before = store.read("sax/test/state.proto")
    with pytest.raises(error):
        asyncio.run(state.publish(model))
    assert store.read("sax/test/state.proto") == before
    assert list(state.models()) == ["/sax/test/keep"]


def test_duplicate_unknown_and_config_change(store) -> None:
    state = PublishedState(store, CELL)
    asyncio.run(state.publish(_model()))
    with pytest.raises(AlreadyExistsError):
        asyncio.run(state.publish(_model()))
    with pytest.raises(NotFoundError):
        asyncio.run(state.unpublish("/sax/test/nope"))
    with pytest.raises(NotFoundError):
        asyncio.run(state.update(_model("/sax/test/nope")))
    other = _model()
    other.model_path = "test.Other"
    with pytest.raises((InvalidArgumentError, NotFoundError)):
        asyncio.run(state.update(other))


def test_failed_save_changes_nothing(store, monkeypatch) -> None:
    state = PublishedState(store, CELL)
    asyncio.run(state.publish(_model("/sax/test/keep")))

    def broken_write(path: str, data: bytes) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "write", broken_write)
    with pytest.raises(UnavailableError, match="nothing was changed"):
        asyncio.run(state.publish(_model()))
    with pytest.raises(UnavailableError):
        asyncio.run(state.unpublish("/sax/test/keep"))
    assert list(state.models()) == ["/sax/test/keep"]


def test_an_admin_that_lost_its_lease_saves_nothing(store) -> None:
    leading = [True]
    state = PublishedState(store, CELL, may_write=lambda: leading[0])
    asyncio.run(state.publish(_model("/sax/test/kept")))
    saved = cell_layout.read_state(store, CELL)
    leading[0] = False  # deposed: a new leader may have restored the state already
    with pytest.raises(UnavailableError, match="no longer leads"):
        asyncio.run(state.publish(_model("/sax/test/late")))
    with pytest.raises(UnavailableError, match="no longer leads"):
        asyncio.run(state.unpublish("/sax/test/kept"))
    assert cell_layout.read_state(store, CELL) == saved
    assert set(state.models()) == {"/sax/test/kept"}
    assert state.save_failures == 0
