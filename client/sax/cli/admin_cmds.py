"""saxutil commands that manage cells and models: create, ls, publish, unpublish, update,
update_checkpoint, watch."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import sax
from sax import admin_conn
from sax.cell import create_cell, list_cells
from sax.cli.common import UsageError
from sax.cli.table import format_table
from sax.errors import FailedPreconditionError
from sax.location import AddressWatcher
from sax.naming import PREFIX, ModelName, parse_cell, parse_cell_or_model, parse_model


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def cmd_create(args: argparse.Namespace) -> int:
    """create <cell> [fs_root] [admin_acl]"""
    cell = parse_cell(args.cell)
    root = admin_conn.sax_root()
    store = admin_conn.store_for(root)
    create_cell(store, cell, args.fs_root, args.admin_acl)
    _out(f"created cell {cell} under {store.url}")
    return 0


def _list_cells(as_json: bool) -> None:
    root = admin_conn.sax_root()
    if "://" not in root and not os.path.isdir(os.path.expanduser(root)):
        raise FailedPreconditionError(
            f"sax_root {root} does not exist; create a cell first: saxutil --sax_root={root} "
            f"create /{PREFIX}/<cell>"
        )
    cells = list_cells(admin_conn.store_for(root))
    if as_json:
        _out(json.dumps(cells))
    else:
        _out(format_table(["#", "Cell"], [[i, c] for i, c in enumerate(cells)]))


def _list_models(cell: str, timeout: float | None, as_json: bool) -> None:
    models = sax.ListAll(cell, timeout)
    if as_json:
        _out(json.dumps(models))
        return
    rows = [[i, m.rsplit("/", 1)[1]] for i, m in enumerate(models)]
    _out(format_table(["#", "Model ID"], rows))


def _show_model(model_id: str, timeout: float | None, as_json: bool) -> None:
    detail = sax.ListDetail(model_id, timeout)
    if as_json:
        record = {
            "model_id": detail.model_id,
            "model_path": detail.model,
            "checkpoint_path": detail.ckpt,
            "requested_replicas": detail.max_replicas,
            "active_replicas": detail.active_replicas,
            "addresses": list(detail.addresses),
            "overrides": detail.overrides,
            "replicas": [
                {"address": r.address, "status": r.status, "failure_reason": r.failure_reason}
                for r in detail.replicas
            ],
            "version": detail.version,
        }
        _out(json.dumps(record, indent=2, sort_keys=True))
        return
    selected = random.choice(detail.addresses) if detail.addresses else ""
    headers = ["Model", "Model Path", "Checkpoint Path", "# of Replicas"]
    headers.append("(Selected) Replica Address")
    row = [detail.model_id, detail.model, detail.ckpt, detail.active_replicas, selected]
    _out(format_table(headers, [row]))
    pending = [r for r in detail.replicas if r.status != "LOADED"]
    if pending:
        rows = [[r.address, r.status, r.failure_reason] for r in detail.replicas]
        _out(format_table(["Replica Address", "Status", "Failure Reason"], rows))


def cmd_ls(args: argparse.Namespace) -> int:
    """ls [/sax | /sax/<cell> | /sax/<cell>/<model>] [--json]"""
    path = args.path.rstrip("/") or f"/{PREFIX}"
    if path == f"/{PREFIX}":
        _list_cells(args.json)
        return 0
    name = parse_cell_or_model(path)
    if isinstance(name, ModelName):
        _show_model(name.full, args.sax_timeout, args.json)
    else:
        _list_models(name.full, args.sax_timeout, args.json)
    return 0


def _replicas(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"publish: number of replicas must be an integer >= 0, got {text!r}")
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments to an overrides map; values are kept as written (JSON)."""
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"publish: override {item!r} is not KEY=VALUE; write e.g. BATCH_SIZE=4 or "
                "'BUCKET_KEYS=[128,256]'"
            )
        overrides[key.strip()] = value
    return overrides


def cmd_publish(args: argparse.Namespace) -> int:
    """publish <id> <model_path> <checkpoint> <replicas> [KEY=VALUE ...]"""
    name = parse_model(args.model_id)
    replicas = _replicas(args.replicas)
    overrides = parse_overrides(args.overrides)
    sax.Publish(
        name.full, args.model_path, args.checkpoint_path, replicas, overrides, args.sax_timeout
    )
    _out(f"published {name} ({args.model_path}, {args.checkpoint_path}, {replicas} replicas)")
    return 0


def cmd_unpublish(args: argparse.Namespace) -> int:
    """unpublish <id>"""
    name = parse_model(args.model_id)
    sax.Unpublish(name.full, args.sax_timeout)
    _out(f"unpublished {name}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """update -replicas=N <id>"""
    name = parse_model(args.model_id)
    if args.replicas < 0:
        raise UsageError(
            f"update: pass the new number of replicas: saxutil update -replicas=N {name}"
        )
    published = sax.GetPublished(name.full, args.sax_timeout)
    model = published.model
    model.requested_num_replicas = args.replicas
    del model.method_names[:]
    sax.UpdateModel(model, args.sax_timeout)
    _out(f"updated {name}: {args.replicas} replicas")
    return 0


def cmd_update_checkpoint(args: argparse.Namespace) -> int:
    """update_checkpoint <id> <checkpoint>"""
    name = parse_model(args.model_id)
    published = sax.GetPublished(name.full, args.sax_timeout)
    model = published.model
    model.checkpoint_path = args.checkpoint_path
    del model.method_names[:]
    sax.UpdateModel(model, args.sax_timeout)
    _out(f"updated {name}: checkpoint {args.checkpoint_path}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """watch <id>: "Reset" and "+ addr" lines for the first set, then "+ addr" / "- addr"."""
    name = parse_model(args.model_id)
    admin_conn.get(name.cell_name).resolve()  # fails now if the cell or its admin is missing
    current: set[str] | None = None
    updates = 0

    def on_set(addresses: list[str]) -> None:
        nonlocal current, updates
        new = set(addresses)
        lines = []
        if current is None:
            lines.append("Reset")
            lines += [f"+ {a}" for a in sorted(new)]
        else:
            lines += [f"- {a}" for a in sorted(current - new)]
            lines += [f"+ {a}" for a in sorted(new - current)]
        if lines:
            _out("\n".join(lines))
        current = new
        updates += 1
        if args.max_updates and updates >= args.max_updates:
            watcher.stop()

    watcher = AddressWatcher(name, on_set)
    watcher.run()
    return 0
