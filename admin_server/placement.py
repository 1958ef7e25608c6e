"""Replica placement: a pure function from (published models, live servers) to assignments.

`place` keeps running replicas where they are, drops replicas of dead servers and unpublished
models, scales down by dropping the least useful replicas first, and places new replicas on
servers whose servable configs, tags and free memory fit, spreading the replicas of one model
across servers. Everything is deterministic: the same inputs give the same result, and feeding
a result back in as the current state gives the same result again.

No gRPC, no I/O: the admin turns a `Placement` into Load/Unload calls with `diff`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from sax import errors

logger = logging.getLogger(__name__)

_NO_FAILURES: Mapping[str, Collection[str]] = MappingProxyType({})


@dataclass(frozen=True)
class ModelSpec:
    """A published model as the placement sees it.

    Attributes:
      model_id: full model id, for example "/sax/test/tiny".
      model_path: servable config name, for example "test.TinyLM".
      replicas: wanted number of replicas (>= 0).
      memory_bytes: memory one replica needs on a server.
      constraints: tags a server must all have to host this model.
      num_devices: devices of its mesh (ICI_MESH_SHAPE after overrides); 0: any.
    """

    model_id: str
    model_path: str
    replicas: int
    memory_bytes: int
    constraints: frozenset[str] = frozenset()
    num_devices: int = 0


@dataclass(frozen=True)
class ServerSpec:
    """A live (joined, heartbeating) model server.

    Attributes:
      address: "ip:port" of its model-server RPCs.
      servable_model_paths: servable config names this server can host.
      memory_bytes: memory capacity for model replicas.
      tags: free-form tags matched against a model's constraints.
      num_devices: devices of its chip topology; 0: unknown (any mesh).
    """

    address: str
    servable_model_paths: frozenset[str]
    memory_bytes: int
    tags: frozenset[str] = frozenset()
    num_devices: int = 0


@dataclass(frozen=True)
class Replica:
    """A replica of a model currently assigned to a server.

    Attributes:
      address: the server's "ip:port".
      loaded: True when the server reports it LOADED, False while it is still LOADING.
    """

    address: str
    loaded: bool


@dataclass(frozen=True)
class Placement:
    """The result of `place`.

    Attributes:
      assignments: model_id -> server addresses; the new target for every model passed in
        (an empty set for a model with no replica).
      unplaced: model_id -> replicas wanted but not placed; only models short of replicas.
    """

    assignments: Mapping[str, frozenset[str]]
    unplaced: Mapping[str, int]


def _validate(
    models: Sequence[ModelSpec], servers: Sequence[ServerSpec], max_failures: int
) -> None:
    seen_models: set[str] = set()
    for m in models:
        if m.model_id in seen_models:
            raise errors.InvalidArgumentError(
                f"model {m.model_id} is listed twice; pass each published model once"
            )
        seen_models.add(m.model_id)
        if m.replicas < 0 or m.memory_bytes < 0:
            raise errors.InvalidArgumentError(
                f"model {m.model_id} has replicas={m.replicas}, memory_bytes={m.memory_bytes};"
                " both must be >= 0"
            )
    seen_servers: set[str] = set()
    for s in servers:
        if s.address in seen_servers:
            raise errors.InvalidArgumentError(
                f"server {s.address} is listed twice; pass each live server once"
            )
        seen_servers.add(s.address)
    if max_failures < 1:
        raise errors.InvalidArgumentError(f"max_failures={max_failures}; it must be >= 1")


def can_host(model: ModelSpec, server: ServerSpec) -> bool:
    """Whether `server` may host `model` at all: servable config, tags and a mesh of the
    server's device count (memory aside)."""
    devices_fit = not model.num_devices or not server.num_devices
    devices_fit = devices_fit or model.num_devices == server.num_devices
    return (
        model.model_path in server.servable_model_paths
        and model.constraints <= server.tags
        and devices_fit
    )


def place(
    models: Sequence[ModelSpec],
    servers: Sequence[ServerSpec],
    current: Mapping[str, Collection[Replica]],
    failed: Mapping[str, Collection[str]] = _NO_FAILURES,
    max_failures: int = 3,
) -> Placement:
    """Computes the target assignment of model replicas to servers.

    Args:
      models: the published models (each model_id once).
      servers: the live servers (each address once).
      current: model_id -> replicas assigned now. Replicas on servers not in `servers`, of models
        not in `models`, or on an address in `failed` for that model are dropped.
      failed: model_id -> addresses where loading that model failed; the model is never placed
        there again.
      max_failures: once a model has failed on this many servers, no new replica of it is
        placed (its healthy current replicas stay).

    Returns:
      A `Placement` with an assignment for every model in `models`.

    Rules, in order:
      1. Stability: a kept current replica stays as long as the model wants that many.
      2. Scale-down: surplus replicas are dropped not-loaded first, then from the server with
         the least free memory (counting every kept replica), then from the highest address.
         The others do not move.
      3. New replicas go, bigger models first (then by model_id), one at a time to the eligible
         server (servable config, tags, no replica of this model, not failed, free memory fits)
         with the most free memory, then the fewest replicas, then the lowest address.
      Current replicas count against memory even where they overflow a server.

    Raises:
      InvalidArgumentError: a model or server is listed twice, a model has a negative replica
        count or memory, or max_failures < 1.
    """
    _validate(models, servers, max_failures)
    live = {s.address: s for s in servers}

    # Rule 1: keep current replicas on live servers of published models (one per server).
    kept: dict[str, dict[str, bool]] = {}
    for m in models:
        bad = set(failed.get(m.model_id, ()))
        replicas: dict[str, bool] = {}
        for r in current.get(m.model_id, ()):
            if r.address in live and r.address not in bad:
                replicas[r.address] = replicas.get(r.address, False) or r.loaded
        kept[m.model_id] = replicas

    # Memory in use by every kept replica, before any scale-down: the scale-down order does
    # not depend on the order in which models are visited.
    used = {a: 0 for a in live}
    for m in models:
        for address in kept[m.model_id]:
            used[address] += m.memory_bytes
    free_before = {a: live[a].memory_bytes - used[a] for a in live}

    # Rule 2: scale down.
    assigned: dict[str, set[str]] = {}
    for m in models:
        replicas = kept[m.model_id]
        # Drop order mirrors the placement preference: not loaded, least free memory, then the
        # highest address (placement takes the lowest first), so scaling 1 -> 2 -> 1 on equal
        # servers keeps the first replica.
        order = sorted(replicas, reverse=True)
        order.sort(key=lambda a: (replicas[a], free_before[a]))
        surplus = max(0, len(replicas) - m.replicas)
        if surplus:
            logger.debug(
                "%s: dropping %d surplus replica(s) %s", m.model_id, surplus, order[:surplus]
            )
        assigned[m.model_id] = set(order[surplus:])

    free = {a: live[a].memory_bytes for a in live}
    count = {a: 0 for a in live}
    for m in models:
        for address in assigned[m.model_id]:
            free[address] -= m.memory_bytes
            count[address] += 1

    # Rule 3: place new replicas, bigger models first.
    unplaced: dict[str, int] = {}
    for m in sorted(models, key=lambda m: (-m.memory_bytes, m.model_id)):
        have = assigned[m.model_id]
        missing = m.replicas - len(have)
        if missing <= 0:
            continue
        bad = set(failed.get(m.model_id, ()))
        if len(bad) >= max_failures:
            logger.debug("%s: failed on %d servers; placing no new replica", m.model_id, len(bad))
        else:
            candidates = [
                s
                for s in servers
                if s.address not in have and s.address not in bad and can_host(m, s)
            ]
            while missing > 0:
                fitting = [s for s in candidates if free[s.address] >= m.memory_bytes]
                if not fitting:
                    break
                best = min(fitting, key=lambda s: (-free[s.address], count[s.address], s.address))
                candidates.remove(best)
                have.add(best.address)
                free[best.address] -= m.memory_bytes
                count[best.address] += 1
                missing -= 1
        if missing > 0:
            unplaced[m.model_id] = missing
            logger.debug("%s: %d replica(s) could not be placed", m.model_id, missing)

    return Placement(
        assignments=MappingProxyType({m.model_id: frozenset(assigned[m.model_id]) for m in models}),
        unplaced=MappingProxyType(unplaced),
    )


def free_memory(
    models: Sequence[ModelSpec],
    servers: Sequence[ServerSpec],
    assignments: Mapping[str, Collection[str]],
) -> dict[str, int]:
    """Server address -> capacity minus the memory of the replicas `assignments` puts on it.

    Assignments to models not in `models` or servers not in `servers` are ignored. The result
    is negative for a server whose replicas overflow it.
    """
    memory = {m.model_id: m.memory_bytes for m in models}
    free = {s.address: s.memory_bytes for s in servers}
    for model_id, addresses in assignments.items():
        if model_id not in memory:
            continue
        for address in set(addresses):
            if address in free:
                free[address] -= memory[model_id]
    return free


def diff(
    old: Mapping[str, Collection[str]], new: Mapping[str, frozenset[str]]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Turns a change of assignments into (loads, unloads), each sorted (model_id, address).

    A model missing from `new` (unpublished) unloads everywhere it was in `old`.
    """
    old_pairs = {(m, a) for m, addresses in old.items() for a in addresses}
    new_pairs = {(m, a) for m, addresses in new.items() for a in addresses}
    return sorted(new_pairs - old_pairs), sorted(old_pairs - new_pairs)
