"""Ring: one deterministic owner per root, balanced load, minimal moves on join and leave."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcache.actors import ActorError, EmptyRing, InvalidArgument, InvalidNodeId, InvalidRingConfig, Ring
from graphcache.actors._ring import _vnode_positions, slot_probes
from graphcache.storage import slot_of

SPACE = 1 << 64

node_ids = st.text(min_size=1, max_size=12)
node_sets = st.sets(node_ids, min_size=1, max_size=12)
root_ids = st.lists(st.text(max_size=20), min_size=1, max_size=50)


def reference_owner(nodes: set[str], vnodes: int, probes: int, root_id: str) -> str:
    """The owner by the module's definition: argmin over nodes of (shortest distance from a probe of the
    root's slot to a virtual node, id)."""

    def score(node: str) -> int:
        positions = _vnode_positions(node, vnodes)
        return min((q - p) % SPACE for p in slot_probes(slot_of(root_id), probes) for q in positions)

    return min(nodes, key=lambda node: (score(node), node))


def owners(ring: Ring, roots: list[str]) -> dict[str, str]:
    return {root: ring.owner(root) for root in roots}


@given(nodes=node_sets, roots=root_ids)
@settings(max_examples=60, deadline=None)
def test_every_root_has_exactly_one_owner_among_the_nodes(nodes: set[str], roots: list[str]) -> None:
    """Each root is owned by exactly one of the ring's nodes."""
    ring = Ring(nodes, vnodes=16)
    for root in roots:
        assert [node for node in nodes if ring.owns(node, root)] == [ring.owner(root)]


@given(nodes=node_sets, roots=root_ids, seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_owner_is_the_same_for_every_instance_and_node_order(
    nodes: set[str], roots: list[str], seed: int
) -> None:
    """Two rings over the same nodes, listed in any order, agree on every owner."""
    shuffled = sorted(nodes)
    random.Random(seed).shuffle(shuffled)
    assert owners(Ring(sorted(nodes), vnodes=16), roots) == owners(Ring(shuffled, vnodes=16), roots)


@given(
    nodes=st.sets(node_ids, min_size=1, max_size=5),
    roots=st.lists(st.text(max_size=20), min_size=1, max_size=10),
    vnodes=st.integers(1, 9),
    probes=st.integers(1, 8),
)
@settings(max_examples=80, deadline=None)
def test_owner_matches_the_reference_definition(
    nodes: set[str], roots: list[str], vnodes: int, probes: int
) -> None:
    """The bisecting lookup returns the brute-force argmin of (distance, node id)."""
    ring = Ring(nodes, vnodes=vnodes, probes=probes)
    for root in roots:
        assert ring.owner(root) == reference_owner(nodes, vnodes, probes, root)


@given(nodes=node_sets, newcomer=node_ids, roots=root_ids)
@settings(max_examples=60, deadline=None)
def test_a_joining_node_only_takes_roots(nodes: set[str], newcomer: str, roots: list[str]) -> None:
    """After a join every root either stays put or moves to the new node."""
    before = owners(Ring(nodes, vnodes=16), roots)
    after = owners(Ring(nodes | {newcomer}, vnodes=16), roots)
    assert {after[root] for root in roots if after[root] != before[root]} <= {newcomer}


@given(nodes=st.sets(node_ids, min_size=2, max_size=12), data=st.data(), roots=root_ids)
@settings(max_examples=60, deadline=None)
def test_a_leaving_node_only_gives_up_its_own_roots(
    nodes: set[str], data: st.DataObject, roots: list[str]
) -> None:
    """After a leave only the departed node's roots change owner."""
    leaver = data.draw(st.sampled_from(sorted(nodes)))
    before = owners(Ring(nodes, vnodes=16), roots)
    after = owners(Ring(nodes - {leaver}, vnodes=16), roots)
    assert {root for root in roots if after[root] != before[root]} == {
        root for root in roots if before[root] == leaver
    }


@pytest.mark.parametrize("cluster", range(3))
def test_128_vnodes_over_10_nodes_stay_within_15_percent_of_the_mean(cluster: int) -> None:
    """Over 100k roots the busiest and idlest of 10 nodes hold within 15% of the mean."""
    rng = random.Random(cluster)
    ring = Ring([f"node-{rng.getrandbits(48):x}" for _ in range(10)], vnodes=128)
    counts = Counter(ring.owner(f"root-{i}") for i in range(100_000))
    mean = 100_000 / 10
    assert set(counts) == ring.nodes
    assert max(counts.values()) / mean <= 1.15
    assert min(counts.values()) / mean >= 0.85


def test_a_join_moves_about_one_nth_of_the_roots() -> None:
    """Adding an 11th node moves between half and one and a half times 1/11 of 20k roots."""
    nodes = [f"node-{i}" for i in range(10)]
    roots = [f"root-{i}" for i in range(20_000)]
    before = owners(Ring(nodes), roots)
    after = owners(Ring([*nodes, "node-new"]), roots)
    moved = sum(before[root] != after[root] for root in roots) / len(roots)
    assert 0.5 / 11 <= moved <= 1.5 / 11


def test_an_empty_ring_has_no_owner() -> None:
    """owner() on an empty ring raises EmptyRing (an ActorError and LookupError); owns() is False."""
    ring = Ring([])
    with pytest.raises(EmptyRing, match="empty"):
        ring.owner("root")
    assert issubclass(EmptyRing, ActorError)
    assert issubclass(EmptyRing, LookupError)
    assert not ring.owns("a", "root")


@pytest.mark.parametrize("bad", [7, None, b"root"])
def test_a_root_id_that_is_not_a_str_is_refused(bad: object) -> None:
    """owner() of a non-str root id raises InvalidArgument (a ValueError), on full and empty rings."""
    for ring in (Ring(["a", "b"]), Ring([])):
        with pytest.raises(InvalidArgument, match="root id must be a str"):
            ring.owner(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", 7, None, b"a"])
def test_a_bad_node_id_is_refused(bad: object) -> None:
    """A node id that is not a non-empty str raises InvalidNodeId (an InvalidArgument, a ValueError)."""
    with pytest.raises(InvalidNodeId) as info:
        Ring(["a", bad])  # type: ignore[list-item]
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("vnodes", "probes"), [(0, 3), (True, 3), (1.5, 3), (4097, 3), (8, 0), (8, 9)])
def test_out_of_range_vnodes_or_probes_are_refused(vnodes: object, probes: object) -> None:
    """vnodes outside 1..4096 or probes outside 1..8 (or non-int) raise InvalidRingConfig."""
    with pytest.raises(InvalidRingConfig):
        Ring(["a"], vnodes=vnodes, probes=probes)  # type: ignore[arg-type]


def test_repr_and_properties_show_the_ring() -> None:
    """repr shows node and vnode counts (and probes when not the default); properties expose them."""
    ring = Ring(["a", "b", "c", "a"], vnodes=64)
    assert repr(ring) == "<Ring nodes=3 vnodes=64>"
    assert ring.nodes == frozenset({"a", "b", "c"})
    assert (ring.vnodes, ring.probes) == (64, 3)
    assert repr(Ring(["a"], probes=1)) == "<Ring nodes=1 vnodes=128 probes=1>"
