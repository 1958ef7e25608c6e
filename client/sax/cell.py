"""The cell layout under sax_root: <sax_root>/sax/<cell>/{config,location,state}.proto.

- config.proto: `Config`, written by `saxutil create`; its presence means the cell exists.
- location.proto: `Location` of the cell's admin server, written by the admin at start.
- state.proto: `State`, the published models, written by the admin on every change.
"""

from __future__ import annotations

import logging
import time

from google.protobuf.message import DecodeError

from sax.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from sax.naming import PREFIX, CellName, parse_cell
from sax.storage import Store, join
from sax.v1 import admin_pb2

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.proto"
LOCATION_FILE = "location.proto"
STATE_FILE = "state.proto"


def cell_dir(cell: CellName) -> str:
    """Relative store path of a cell, e.g. "sax/test"."""
    return join(PREFIX, cell.cell)


def _parse(msg_type: type, data: bytes, what: str):
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise FailedPreconditionError(f"{what} is corrupt ({e}); restore it or recreate it") from e
    return msg


def create_cell(store: Store, cell: CellName, fs_root: str = "", admin_acl: str = "") -> None:
    """Creates the cell: its config and an empty location record. ALREADY_EXISTS if present."""
    path = join(cell_dir(cell), CONFIG_FILE)
    if store.exists(path):
        raise AlreadyExistsError(f"cell {cell} already exists under {store.url}")
    store.write(path, admin_pb2.Config(fs_root=fs_root, admin_acl=admin_acl).SerializeToString())
    store.write(join(cell_dir(cell), LOCATION_FILE), admin_pb2.Location().SerializeToString())
    logger.info("created cell %s under %s", cell, store.url)


def read_config(store: Store, cell: CellName) -> admin_pb2.Config:
    """The cell's config; NOT_FOUND with what to do if the cell was never created."""
    data = store.read(join(cell_dir(cell), CONFIG_FILE))
    if data is None:
        raise NotFoundError(
            f"cell {cell} does not exist under {store.url}; create it with: saxutil create {cell}"
        )
    return _parse(admin_pb2.Config, data, f"config of cell {cell}")


def list_cells(store: Store) -> list[str]:
    """Full names of the cells under the store, sorted, e.g. ["/sax/test"]."""
    cells = []
    for name in store.list_dir(PREFIX):
        try:
            cell = parse_cell(f"/{PREFIX}/{name}")
        except Exception:  # noqa: BLE001 - not a cell folder
            continue
        if store.exists(join(cell_dir(cell), CONFIG_FILE)):
            cells.append(cell.full)
    return cells


def write_location(store: Store, cell: CellName, address: str, admin_id: str) -> None:
    """Records the admin's address for clients and model servers."""
    record = admin_pb2.Location(
        location=address, admin_id=admin_id, updated_ms=int(time.time() * 1000)
    )
    store.write(join(cell_dir(cell), LOCATION_FILE), record.SerializeToString())


def read_location(store: Store, cell: CellName) -> admin_pb2.Location:
    """The admin's location record. NOT_FOUND if the cell does not exist; UNAVAILABLE (which
    clients retry within their deadline) if no admin has ever run for it."""
    data = store.read(join(cell_dir(cell), LOCATION_FILE))
    if data is None:
        read_config(store, cell)  # raises NOT_FOUND when the cell does not exist
        data = b""
    loc = _parse(admin_pb2.Location, data, f"location record of cell {cell}")
    if not loc.location:
        raise UnavailableError(
            f"no admin server has been started for cell {cell}; start one with: "
            f"python -m admin_server --sax_cell={cell}"
        )
    return loc


def read_state(store: Store, cell: CellName) -> admin_pb2.State:
    """The published-model state; empty if never saved. FAILED_PRECONDITION if corrupt."""
    data = store.read(join(cell_dir(cell), STATE_FILE))
    if data is None:
        return admin_pb2.State()
    return _parse(admin_pb2.State, data, f"state of cell {cell} ({STATE_FILE})")


def write_state(store: Store, cell: CellName, state: admin_pb2.State) -> None:
    """Saves the published-model state atomically."""
    store.write(join(cell_dir(cell), STATE_FILE), state.SerializeToString(deterministic=True))
