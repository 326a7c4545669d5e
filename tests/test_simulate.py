"""Ring simulation and memory estimate: figures consistent with the ring, plan arithmetic, tables, CLI."""

from __future__ import annotations

import math

import pytest

from graphcache.harness._simulate import (
    BalanceRow,
    InvalidSimulation,
    MemoryEstimate,
    RingRow,
    balance_study,
    estimate_memory,
    format_balance,
    format_memory,
    format_plan,
    format_table,
    main,
    plan_deployment,
    simulate_ring,
)


@pytest.fixture(scope="module")
def rows() -> list[RingRow]:
    return simulate_ring((3, 10), roots=5_000, vnodes=64, seed=1)


def test_one_row_per_node_count_in_order(rows: list[RingRow]) -> None:
    """simulate_ring returns a row per node count, in the order given, with its parameters."""
    assert [(r.nodes, r.vnodes, r.probes, r.roots) for r in rows] == [(3, 64, 3, 5_000), (10, 64, 3, 5_000)]


def test_moves_go_only_to_the_joiner_and_come_only_from_the_leaver(rows: list[RingRow]) -> None:
    """No root moves anywhere but to the joining node or away from the leaving node."""
    assert [r.stray_moves for r in rows] == [0, 0]


def test_move_shares_are_near_their_ideals(rows: list[RingRow]) -> None:
    """A join moves about 1/(N+1) of the roots and a leave about 1/N (within a factor of 1.5)."""
    for r in rows:
        assert r.ideal_join == 1 / (r.nodes + 1)
        assert r.ideal_leave == 1 / r.nodes
        assert r.ideal_join / 1.5 <= r.moved_on_join <= r.ideal_join * 1.5
        assert r.ideal_leave / 1.5 <= r.moved_on_leave <= r.ideal_leave * 1.5


def test_balance_brackets_the_mean_and_noise_is_the_counting_error(rows: list[RingRow]) -> None:
    """max/mean >= 1 >= min/mean, and the noise column is 1/sqrt(roots per node)."""
    for r in rows:
        assert r.min_over_mean <= 1 <= r.max_over_mean
        assert r.sampling_noise == pytest.approx(1 / math.sqrt(r.roots / r.nodes))


def test_ring_memory_holds_at_least_its_two_arrays(rows: list[RingRow]) -> None:
    """The ring's traced memory is at least 12 bytes (8 position + 4 owner) per virtual node."""
    for r in rows:
        assert r.ring_bytes >= 12 * r.nodes * r.vnodes
    assert rows[1].ring_bytes > rows[0].ring_bytes


def test_the_same_seed_gives_the_same_placement_figures() -> None:
    """Two runs with one seed agree on every figure except the timings."""
    first, second = (simulate_ring((4,), roots=2_000, vnodes=16, seed=7)[0] for _ in range(2))
    timings = {"build_ms", "lookup_us"}
    assert {k: v for k, v in first._asdict().items() if k not in timings} == {
        k: v for k, v in second._asdict().items() if k not in timings
    }


def test_the_classic_ring_is_one_probe() -> None:
    """probes=1 simulates the classic ring and still moves nothing stray."""
    (row,) = simulate_ring((5,), roots=2_000, vnodes=16, probes=1)
    assert (row.probes, row.stray_moves) == (1, 0)


@pytest.mark.parametrize(("counts", "roots"), [((), 10), ((1,), 10), ((3, True), 10), ((3,), 0), ((3,), 2.5)])
def test_bad_simulation_arguments_are_refused(counts: tuple[int, ...], roots: int) -> None:
    """Node counts must be ints >= 2 (at least one), roots a positive int; else InvalidSimulation."""
    with pytest.raises(InvalidSimulation):
        simulate_ring(counts, roots=roots)


@pytest.fixture(scope="module")
def study() -> list[BalanceRow]:
    return balance_study(nodes=10, clusters=10, roots=5_000, vnodes=32, probes=(1, 3), seed=2)


def test_the_balance_study_has_a_row_per_probe_count_with_ordered_figures(study: list[BalanceRow]) -> None:
    """Per probe count: worst >= p95 >= median max/mean >= 1 >= worst min, share beyond 15% in [0, 1]."""
    assert [(r.nodes, r.vnodes, r.probes, r.clusters, r.roots) for r in study] == [
        (10, 32, 1, 10, 5_000),
        (10, 32, 3, 10, 5_000),
    ]
    for r in study:
        assert r.worst_max >= r.p95_max >= r.median_max >= 1 >= r.worst_min
        assert 0 <= r.beyond_15 <= 1


def test_three_probes_balance_better_than_the_classic_ring(study: list[BalanceRow]) -> None:
    """Over 10 random clusters, the median busiest node is closer to the mean with 3 probes than with 1."""
    classic, multi = study
    assert multi.median_max < classic.median_max
    assert multi.worst_max < classic.worst_max


def test_bad_study_arguments_are_refused() -> None:
    """balance_study needs positive int nodes, clusters and roots."""
    with pytest.raises(InvalidSimulation, match="clusters"):
        balance_study(clusters=0)


def test_memory_shapes_order_as_their_contents() -> None:
    """A parked task costs more than the actor's state alone, which costs more than a passivated entry;
    a real RootActor (state and task) costs more than the state alone."""
    memory = estimate_memory(500)
    assert memory.objects == 500
    assert memory.live_actor_with_task_bytes > memory.live_actor_bytes > memory.passivated_root_bytes > 0
    assert memory.root_actor_bytes > memory.live_actor_bytes


def test_a_bad_object_count_is_refused() -> None:
    """estimate_memory needs a positive int count."""
    with pytest.raises(InvalidSimulation):
        estimate_memory(0)


def test_the_plan_multiplies_measured_figures() -> None:
    """Per node: roots/nodes rounded up, hot share of them as RootActors, bytes from the measured sizes."""
    row = simulate_ring((3,), roots=100, vnodes=8)[0]
    memory = MemoryEstimate(objects=10, live_actor_bytes=100.0, live_actor_with_task_bytes=900.0,
                            passivated_root_bytes=10.0, root_actor_bytes=1000.0)  # fmt: skip
    (plan,) = plan_deployment([row], memory, nodes=3, roots=1_000, hot_shares=[0.1])
    assert (plan.roots_per_node, plan.actors_per_node) == (334, 33)
    assert (plan.ring_bytes, plan.actors_bytes, plan.passivated_bytes) == (row.ring_bytes, 33_000.0, 3_340.0)
    assert plan.total_bytes == row.ring_bytes + 33_000.0 + 3_340.0


def test_a_plan_for_an_unsimulated_node_count_is_refused(rows: list[RingRow]) -> None:
    """plan_deployment needs the simulated row of its node count."""
    with pytest.raises(InvalidSimulation, match="no simulated row for 100 nodes"):
        plan_deployment(rows, MemoryEstimate(1, 1.0, 1.0, 1.0, 1.0), nodes=100)


def test_tables_have_a_header_a_rule_and_a_line_per_row(rows: list[RingRow], study: list[BalanceRow]) -> None:
    """format_table, format_balance, format_memory and format_plan render aligned lines, one per row."""
    memory = MemoryEstimate(10, 1581.0, 8729.0, 115.0, 11575.0)
    plan = plan_deployment(rows, memory, nodes=10, roots=1_000)
    for text, count, first in (
        (format_table(rows), 2, "nodes"),
        (format_balance(study), 2, "nodes"),
        (format_memory(memory), 4, "measured"),
        (format_plan(plan), 3, "nodes"),
    ):
        lines = text.splitlines()
        assert len(lines) == 2 + count
        assert lines[0].split()[0] == first
        assert set(lines[1].replace(" ", "")) == {"-"}
        assert len({len(line) for line in lines}) == 1
    assert format_table(rows).splitlines()[2].split()[:2] == ["3", "64"]


def test_the_command_line_prints_the_three_tables(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m graphcache.harness._simulate prints the ring table, the memory table and the plan."""
    argv = ["--nodes", "3,10", "--roots", "500", "--memory-objects", "200", "--plan-nodes", "10"]
    assert main(argv) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert [block.split()[0] for block in blocks] == ["nodes", "measured", "nodes"]
    assert "10,000,000" in blocks[2]
