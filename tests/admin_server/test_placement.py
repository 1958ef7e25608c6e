"""Tests for admin_server.placement: pure placement, no gRPC."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from admin_server.placement import (
    ModelSpec,
    Placement,
    Replica,
    ServerSpec,
    can_host,
    diff,
    free_memory,
    place,
)
from sax import errors

GB = 1 << 30


def model(
    name: str,
    replicas: int = 1,
    memory: int = 1,
    path: str = "test.TinyLM",
    constraints: Iterable[str] = (),
) -> ModelSpec:
    return ModelSpec(
        model_id=f"/sax/test/{name}",
        model_path=path,
        replicas=replicas,
        memory_bytes=memory,
        constraints=frozenset(constraints),
    )


def server(
    address: str,
    memory: int = 10,
    paths: Iterable[str] = ("test.TinyLM",),
    tags: Iterable[str] = (),
) -> ServerSpec:
    return ServerSpec(
        address=address,
        servable_model_paths=frozenset(paths),
        memory_bytes=memory,
        tags=frozenset(tags),
    )


def loaded(*addresses: str) -> list[Replica]:
    return [Replica(a, loaded=True) for a in addresses]


def as_current(assignments: Mapping[str, Collection[str]]) -> dict[str, list[Replica]]:
    """Feeds a placement back in as the current state, every replica loaded."""
    return {m: loaded(*sorted(addresses)) for m, addresses in assignments.items()}


def mid(name: str) -> str:
    return f"/sax/test/{name}"


# --- Rule 1: stability -------------------------------------------------------------------------


def test_current_replica_stays_even_where_a_fresh_placement_would_differ() -> None:
    servers = [server("a", memory=5), server("b", memory=100)]
    fresh = place([model("m")], servers, {})
    assert fresh.assignments[mid("m")] == {"b"}

    result = place([model("m")], servers, {mid("m"): loaded("a")})
    assert result.assignments[mid("m")] == {"a"}


def test_current_replica_stays_on_a_live_server_even_if_no_longer_eligible() -> None:
    servers = [server("a", paths=["other.Config"]), server("b")]
    result = place([model("m")], servers, {mid("m"): [Replica("a", loaded=False)]})
    assert result.assignments[mid("m")] == {"a"}


def test_dead_server_replica_moves_to_a_live_server() -> None:
    servers = [server("a"), server("b")]
    current = {mid("m"): loaded("dead", "a")}
    result = place([model("m", replicas=2)], servers, current)
    assert result.assignments[mid("m")] == {"a", "b"}
    assert result.unplaced == {}


def test_replicas_of_unpublished_models_are_dropped_and_free_their_memory() -> None:
    servers = [server("a", memory=10)]
    current = {mid("gone"): loaded("a")}
    # "big" fits only if the unpublished model's memory is not counted.
    result = place([model("big", memory=8)], servers, current)
    assert dict(result.assignments) == {mid("big"): {"a"}}
    still_published = place([model("big", memory=8), model("gone", memory=5)], servers, current)
    assert still_published.unplaced == {mid("big"): 1}


def test_duplicate_current_replicas_count_once_and_loaded_wins() -> None:
    servers = [server("a", memory=8), server("b", memory=10)]
    current = {mid("m"): [Replica("a", True), Replica("a", False), Replica("b", False)]}
    result = place([model("m", replicas=1, memory=5)], servers, current)
    # "a" is loaded through one of its reports, so the not-loaded "b" goes (were both not
    # loaded, "a" would go: it has less free memory).
    assert result.assignments[mid("m")] == {"a"}
    assert free_memory([model("m", memory=5)], servers, result.assignments) == {"a": 3, "b": 10}


# --- Rule 2: scale-down ------------------------------------------------------------------------


def test_scale_down_drops_not_loaded_before_loaded() -> None:
    # "a" has the least free memory, so the memory rule alone would drop it.
    servers = [server("a", memory=5), server("b", memory=100)]
    current = {mid("m"): [Replica("a", loaded=True), Replica("b", loaded=False)]}
    result = place([model("m", replicas=1)], servers, current)
    assert result.assignments[mid("m")] == {"a"}


def test_scale_down_drops_the_server_with_least_free_memory() -> None:
    servers = [server("a", memory=20), server("b", memory=10), server("c", memory=30)]
    current = {mid("m"): loaded("a", "b", "c")}
    assert place([model("m", replicas=2)], servers, current).assignments[mid("m")] == {"a", "c"}
    assert place([model("m", replicas=1)], servers, current).assignments[mid("m")] == {"c"}


def test_scale_down_free_memory_counts_other_models() -> None:
    servers = [server("a", memory=20), server("b", memory=20)]
    # "other" fills "a", so "a" has less free memory and loses the surplus replica (on equal
    # free memory "b" would go).
    current = {mid("m"): loaded("a", "b"), mid("other"): loaded("a")}
    models = [model("m", replicas=1), model("other", memory=9)]
    assert place(models, servers, current).assignments[mid("m")] == {"b"}


def test_scale_down_ties_drop_the_highest_address() -> None:
    servers = [server("a"), server("b"), server("c")]
    current = {mid("m"): loaded("c", "a", "b")}
    assert place([model("m", replicas=2)], servers, current).assignments[mid("m")] == {"a", "b"}


def test_scale_down_never_moves_a_replica_that_stays() -> None:
    servers = [server(f"s{i}", memory=10 + i) for i in range(6)]
    current = {mid("m"): loaded("s0", "s2", "s4")}
    for wanted in range(5):
        result = place([model("m", replicas=wanted)], servers, current).assignments[mid("m")]
        assert len(result) == wanted
        if wanted <= 3:
            assert result <= {"s0", "s2", "s4"}
        else:
            assert result >= {"s0", "s2", "s4"}


def test_scale_up_then_down_keeps_the_first_replica() -> None:
    servers = [server("a"), server("b"), server("c")]
    one = place([model("m", replicas=1)], servers, {}).assignments
    (first,) = one[mid("m")]
    two = place([model("m", replicas=2)], servers, as_current(one)).assignments
    assert first in two[mid("m")] and len(two[mid("m")]) == 2
    back = place([model("m", replicas=1)], servers, as_current(two)).assignments
    assert back[mid("m")] == {first}


# --- Rule 3: eligibility and spread -----------------------------------------------------------


def test_new_replicas_only_on_servers_with_the_servable_path() -> None:
    servers = [server("big", memory=100, paths=["other.Config"]), server("small", memory=5)]
    result = place([model("m", replicas=2)], servers, {})
    assert result.assignments[mid("m")] == {"small"}
    assert result.unplaced == {mid("m"): 1}


def test_new_replicas_only_on_servers_with_all_constraint_tags() -> None:
    servers = [
        server("a", memory=100, tags=["gpu"]),
        server("b", memory=50, tags=["gpu", "us-east"]),
        server("c", memory=10, tags=["us-east"]),
    ]
    result = place([model("m", replicas=3, constraints=["gpu", "us-east"])], servers, {})
    assert result.assignments[mid("m")] == {"b"}
    assert result.unplaced == {mid("m"): 2}


def test_at_most_one_replica_per_server() -> None:
    result = place([model("m", replicas=3)], [server("a", memory=100), server("b")], {})
    assert result.assignments[mid("m")] == {"a", "b"}
    assert result.unplaced == {mid("m"): 1}


def test_new_replicas_need_enough_free_memory() -> None:
    servers = [server("a", memory=4), server("b", memory=6)]
    result = place([model("m", replicas=2, memory=5)], servers, {})
    assert result.assignments[mid("m")] == {"b"}
    assert result.unplaced == {mid("m"): 1}
    exact = place([model("m", replicas=1, memory=6)], [server("b", memory=6)], {})
    assert exact.assignments[mid("m")] == {"b"}


def test_models_share_a_server_while_memory_lasts() -> None:
    models = [model("x", memory=4), model("y", memory=4), model("z", memory=4)]
    result = place(models, [server("a", memory=10)], {})
    assert result.assignments[mid("x")] == {"a"} and result.assignments[mid("y")] == {"a"}
    assert result.assignments[mid("z")] == frozenset()
    assert result.unplaced == {mid("z"): 1}


def test_can_host() -> None:
    m = model("m", path="p", constraints=["t"])
    assert can_host(m, server("a", paths=["p", "q"], tags=["t", "u"]))
    assert not can_host(m, server("a", paths=["q"], tags=["t"]))
    assert not can_host(m, server("a", paths=["p"], tags=["u"]))


# --- Rule 4: order -----------------------------------------------------------------------------


def test_bigger_models_are_placed_first() -> None:
    # By id "a-small" comes first; by size "b-big" does, and only one of them fits.
    models = [model("a-small", memory=5), model("b-big", memory=8)]
    result = place(models, [server("s", memory=10)], {})
    assert result.assignments[mid("b-big")] == {"s"}
    assert result.unplaced == {mid("a-small"): 1}


def test_equal_sizes_are_placed_by_model_id() -> None:
    models = [model("b", memory=6), model("a", memory=6)]
    result = place(models, [server("s", memory=10)], {})
    assert result.assignments[mid("a")] == {"s"}
    assert result.unplaced == {mid("b"): 1}


def test_new_replica_goes_to_the_server_with_most_free_memory() -> None:
    servers = [server("a", memory=10), server("b", memory=30), server("c", memory=20)]
    current = {mid("old"): loaded("b")}
    # "b" has 30 - 15 = 15 free, "c" 20: "c" wins over the bigger "b".
    models = [model("old", memory=15), model("new")]
    assert place(models, servers, current).assignments[mid("new")] == {"c"}


def test_free_memory_ties_go_to_fewest_replicas_then_address() -> None:
    servers = [server("a"), server("b"), server("c")]
    # "a": two replicas of 2 -> 6 free; "b": one replica of 4 -> 6 free; "c": 10 - 4 = 6 free.
    current = {mid("p"): loaded("a"), mid("q"): loaded("a"), mid("r"): loaded("b", "c")}
    models = [model("p", memory=2), model("q", memory=2), model("r", replicas=2, memory=4)]
    assert place([*models, model("new")], servers, current).assignments[mid("new")] == {"b"}


def test_placement_spreads_each_model_over_the_emptiest_servers() -> None:
    servers = [server(a, memory=10) for a in "abcd"]
    result = place(
        [model("x", replicas=2, memory=6), model("y", replicas=2, memory=3)], servers, {}
    )
    assert result.assignments[mid("x")] == {"a", "b"}
    assert result.assignments[mid("y")] == {"c", "d"}


# --- Rule 5: overflowing current replicas ------------------------------------------------------


def test_current_replicas_count_even_when_they_overflow() -> None:
    servers = [server("a", memory=10), server("b", memory=3)]
    current = {mid("p"): loaded("a"), mid("q"): loaded("a")}
    models = [model("p", memory=6), model("q", memory=6), model("new", memory=2, replicas=2)]
    result = place(models, servers, current)
    assert result.assignments[mid("p")] == {"a"} and result.assignments[mid("q")] == {"a"}
    assert result.assignments[mid("new")] == {"b"}
    assert result.unplaced == {mid("new"): 1}
    assert free_memory(models, servers, result.assignments) == {"a": -2, "b": 1}


# --- Rules 6 and 7: zero replicas and unplaced -------------------------------------------------


def test_zero_replicas_gets_an_empty_assignment() -> None:
    result = place([model("m", replicas=0)], [server("a")], {mid("m"): loaded("a")})
    assert dict(result.assignments) == {mid("m"): frozenset()}
    assert result.unplaced == {}


def test_unplaced_is_wanted_minus_assigned() -> None:
    models = [model("m", replicas=5), model("ok", replicas=1)]
    result = place(models, [server("a"), server("b")], {})
    assert result.unplaced == {mid("m"): 3}
    assert set(result.assignments) == {mid("m"), mid("ok")}


# --- Failures ----------------------------------------------------------------------------------


def test_failed_server_is_avoided_and_its_replica_dropped() -> None:
    servers = [server("a", memory=100), server("b", memory=10)]
    assert place([model("m")], servers, {}).assignments[mid("m")] == {"a"}
    failed = {mid("m"): ["a"]}
    result = place([model("m")], servers, {mid("m"): [Replica("a", False)]}, failed)
    assert result.assignments[mid("m")] == {"b"}


def test_max_failures_stops_new_replicas_but_keeps_healthy_ones() -> None:
    servers = [server(a) for a in ("f1", "f2", "f3", "ok", "spare")]
    failed = {mid("m"): ["f1", "f2", "f3"]}
    current = {mid("m"): loaded("ok")}
    stopped = place([model("m", replicas=2)], servers, current, failed, max_failures=3)
    assert stopped.assignments[mid("m")] == {"ok"}
    assert stopped.unplaced == {mid("m"): 1}
    retried = place([model("m", replicas=2)], servers, current, failed, max_failures=4)
    assert retried.assignments[mid("m")] == {"ok", "spare"}


def test_failures_of_one_model_do_not_block_another() -> None:
    servers = [server("a")]
    failed = {mid("bad"): ["x", "y", "z"]}
    result = place([model("bad"), model("good")], servers, {}, failed)
    assert result.assignments[mid("good")] == {"a"}
    assert result.unplaced == {mid("bad"): 1}


# --- Validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "servers", "max_failures"),
    [
        ([model("m"), model("m")], [], 3),
        ([model("m", replicas=-1)], [], 3),
        ([model("m", memory=-1)], [], 3),
        ([], [server("a"), server("a")], 3),
        ([], [], 0),
    ],
)
def test_invalid_inputs_are_rejected(
    models: list[ModelSpec], servers: list[ServerSpec], max_failures: int
) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        place(models, servers, {}, max_failures=max_failures)


# --- diff --------------------------------------------------------------------------------------


def test_diff_lists_loads_and_unloads_sorted() -> None:
    old = {"/m1": ["b", "a"], "/gone": ["a"], "/m2": []}
    new = {"/m1": frozenset({"a", "c"}), "/m2": frozenset({"d", "b"})}
    loads, unloads = diff(old, new)
    assert loads == [("/m1", "c"), ("/m2", "b"), ("/m2", "d")]
    assert unloads == [("/gone", "a"), ("/m1", "b")]
    assert diff(new, new) == ([], [])


# --- Invariants shared by the scale and property tests ---------------------------------------


def check_placement(
    models: Sequence[ModelSpec],
    servers: Sequence[ServerSpec],
    current: Mapping[str, Collection[Replica]],
    failed: Mapping[str, Collection[str]],
    max_failures: int,
    result: Placement,
) -> None:
    """Checks a result against the rules, computed independently of the implementation."""
    live = {s.address: s for s in servers}
    assert set(result.assignments) == {m.model_id for m in models}
    free = free_memory(models, servers, result.assignments)
    for m in models:
        got = result.assignments[m.model_id]
        bad = set(failed.get(m.model_id, ()))
        kept = ({r.address for r in current.get(m.model_id, ())} & set(live)) - bad
        new = got - kept
        assert len(got) <= m.replicas
        assert result.unplaced.get(m.model_id, 0) == m.replicas - len(got)
        assert got <= set(live) and not got & bad
        for address in new:
            assert can_host(m, live[address])
        if new:
            assert len(bad) < max_failures
        if m.replicas >= len(kept):
            assert kept <= got
        else:
            assert got <= kept
        if len(got) < m.replicas and len(bad) < max_failures:
            # Short only if no eligible server without a replica has room for one more.
            for s in servers:
                if s.address not in got and s.address not in bad and can_host(m, s):
                    assert free[s.address] < m.memory_bytes, (m, s, free[s.address])
    # A server that received a new replica is not over capacity.
    for address in live:
        gained = any(
            address in result.assignments[m.model_id]
            and address not in {r.address for r in current.get(m.model_id, ())}
            for m in models
        )
        if gained:
            assert free[address] >= 0, address


def check_converged(
    models: Sequence[ModelSpec],
    servers: Sequence[ServerSpec],
    failed: Mapping[str, Collection[str]],
    max_failures: int,
    result: Placement,
) -> None:
    """A second and a third pass over the result, all loaded, give the same result."""
    again = place(models, servers, as_current(result.assignments), failed, max_failures)
    assert dict(again.assignments) == dict(result.assignments)
    assert dict(again.unplaced) == dict(result.unplaced)
    third = place(models, servers, as_current(again.assignments), failed, max_failures)
    assert dict(third.assignments) == dict(result.assignments)


# --- Scale -------------------------------------------------------------------------------------

PLATFORMS: dict[str, tuple[frozenset[str], list[int]]] = {
    "cpu": (frozenset({"test.TinyLM", "cpu.Small"}), [8 * GB, 16 * GB]),
    "gpu": (frozenset({"test.TinyLM", "gpu.Llama7B", "gpu.Gemma2B"}), [40 * GB, 80 * GB]),
    "tpu": (frozenset({"tpu.Llama7B", "tpu.Gemma2B", "gpu.Gemma2B"}), [64 * GB, 128 * GB]),
}
CONFIG_SIZES: dict[str, list[int]] = {
    "test.TinyLM": [1 * GB, 2 * GB],
    "cpu.Small": [3 * GB, 6 * GB],
    "gpu.Llama7B": [14 * GB, 20 * GB],
    "gpu.Gemma2B": [5 * GB, 8 * GB],
    "tpu.Llama7B": [16 * GB, 30 * GB],
    "tpu.Gemma2B": [6 * GB, 10 * GB],
}


def build_cluster(
    seed: int, memory_scale: int = 1, constrained: bool = True
) -> tuple[list[ModelSpec], list[ServerSpec]]:
    """20 servers over three platforms and 50 models of six config names, 1-3 replicas each."""
    rng = random.Random(seed)
    servers = []
    for i in range(20):
        platform = sorted(PLATFORMS)[i % len(PLATFORMS)]
        paths, sizes = PLATFORMS[platform]
        tags = {platform} | ({"us-east"} if i % 4 == 0 else set())
        capacity = rng.choice(sizes) * memory_scale
        servers.append(server(f"10.0.{i // 10}.{i}:14001", capacity, paths, tags))
    models = []
    for i in range(50):
        path = rng.choice(sorted(CONFIG_SIZES))
        constraints = ["us-east"] if constrained and i % 10 == 0 else []
        memory = rng.choice(CONFIG_SIZES[path])
        models.append(model(f"m{i:02d}", rng.randint(1, 3), memory, path, constraints))
    return models, servers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scale_fifty_models_on_twenty_servers_converge(seed: int) -> None:
    models, servers = build_cluster(seed)
    result = place(models, servers, {})
    check_placement(models, servers, {}, {}, 3, result)
    assert all(v >= 0 for v in free_memory(models, servers, result.assignments).values())
    wanted = sum(m.replicas for m in models)
    placed = sum(len(a) for a in result.assignments.values())
    assert placed >= wanted * 0.6, (placed, wanted)  # the cluster is big enough to matter
    check_converged(models, servers, {}, 3, result)

    # Kill two servers: their replicas move, everything else stays.
    dead = {servers[0].address, servers[7].address}
    alive = [s for s in servers if s.address not in dead]
    moved = place(models, alive, as_current(result.assignments))
    check_placement(models, alive, as_current(result.assignments), {}, 3, moved)
    for m in models:
        assert result.assignments[m.model_id] - dead <= moved.assignments[m.model_id]
        assert not moved.assignments[m.model_id] & dead
    check_converged(models, alive, {}, 3, moved)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scale_with_ample_capacity_places_every_replica(seed: int) -> None:
    models, servers = build_cluster(seed, memory_scale=4, constrained=False)
    result = place(models, servers, {})
    check_placement(models, servers, {}, {}, 3, result)
    assert result.unplaced == {}
    assert all(len(result.assignments[m.model_id]) == m.replicas for m in models)
    check_converged(models, servers, {}, 3, result)


# --- Properties over random small inputs --------------------------------------------------------

ADDRESSES = [f"10.0.0.{i}:1" for i in range(6)]
DEAD = "10.0.0.99:1"
PATHS = ["p1", "p2", "p3"]
TAGS = ["t1", "t2"]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[ModelSpec], list[ServerSpec], dict, dict, int]:
    addresses = draw(st.lists(st.sampled_from(ADDRESSES), unique=True, max_size=6))
    servers = [
        ServerSpec(
            address=a,
            servable_model_paths=frozenset(draw(st.sets(st.sampled_from(PATHS), min_size=1))),
            memory_bytes=draw(st.integers(0, 20)),
            tags=frozenset(draw(st.sets(st.sampled_from(TAGS)))),
        )
        for a in addresses
    ]
    names = draw(st.lists(st.sampled_from("abcdefg"), unique=True, max_size=6))
    models = [
        model(
            n,
            replicas=draw(st.integers(0, 4)),
            memory=draw(st.integers(0, 10)),
            path=draw(st.sampled_from(PATHS)),
            constraints=draw(st.sets(st.sampled_from(TAGS), max_size=1)),
        )
        for n in names
    ]
    model_ids = [m.model_id for m in models] + [mid("unpublished")]
    maybe = st.sampled_from([*ADDRESSES, DEAD])
    current = {
        m: [Replica(a, draw(st.booleans())) for a in draw(st.lists(maybe, max_size=4))]
        for m in draw(st.lists(st.sampled_from(model_ids), unique=True))
    }
    failed = {
        m: draw(st.lists(maybe, unique=True, max_size=4))
        for m in draw(st.lists(st.sampled_from(model_ids), unique=True))
    }
    return models, servers, current, failed, draw(st.integers(1, 3))


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_placement_properties(
    cluster: tuple[list[ModelSpec], list[ServerSpec], dict, dict, int],
) -> None:
    models, servers, current, failed, max_failures = cluster
    result = place(models, servers, current, failed, max_failures)
    check_placement(models, servers, current, failed, max_failures, result)
    check_converged(models, servers, failed, max_failures, result)
    # The input order does not matter.
    shuffled = place(models[::-1], servers[::-1], current, failed, max_failures)
    assert dict(shuffled.assignments) == dict(result.assignments)


def test_a_mesh_goes_only_to_servers_with_that_many_devices() -> None:
    path = "llama.SmolLM2_135M"
    eight = ServerSpec("e", frozenset([path]), 10, num_devices=8)
    one = ServerSpec("o", frozenset([path]), 10, num_devices=1)
    sharded = ModelSpec(mid("s"), path, replicas=2, memory_bytes=1, num_devices=8)
    single = ModelSpec(mid("u"), path, replicas=2, memory_bytes=1, num_devices=1)
    assert can_host(sharded, eight) and not can_host(sharded, one)
    assert can_host(single, one) and not can_host(single, eight)
    result = place([sharded, single], [eight, one], {})
    assert result.assignments == {mid("s"): {"e"}, mid("u"): {"o"}}
    assert result.unplaced == {mid("s"): 1, mid("u"): 1}
    # 0 on either side means unknown: no device check.
    assert can_host(ModelSpec(mid("x"), path, 1, 1), eight)
    assert can_host(sharded, ServerSpec("z", frozenset([path]), 10))
