"""The consistency checker judges hand-written histories: G1, G2, G3, gaps and lag."""

from __future__ import annotations

import random
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcache.harness import Event, HistoryError, check, check_with_all_lags, check_with_lags, graph_hash
from graphcache.storage import Delete, Graph, GraphStore, MemoryStore, Node, Op, PostgresStore, Upsert

Rows = dict[str, tuple[str | None, dict[str, Any]]]


def expected_hash(root: str, rows: Rows) -> str:
    """The hash of a graph written out by hand, through the recorder's own graph_hash."""
    nodes = {nid: Node(nid, parent, data, row_version=1) for nid, (parent, data) in rows.items()}
    return graph_hash(Graph(root, 0, nodes))


def ops_of(*ops: Op) -> list[Any]:
    return [msgspec.to_builtins(op) for op in ops]


def create(root: str, t: float, data: dict[str, Any] | None = None) -> list[Event]:
    data = {"name": root} if data is None else data
    return [
        Event("setup", "invoke", "create", root, t),
        Event(
            "setup",
            "ok",
            "create",
            root,
            t + 0.001,
            version=1,
            hash=expected_hash(root, {root: (None, data)}),
            ops=ops_of(Upsert(root, None, data)),
        ),
    ]


def write(root: str, start: float, end: float, version: int, *ops: Op, process: str = "w") -> list[Event]:
    return [
        Event(process, "invoke", "write", root, start),
        Event(process, "ok", "write", root, end, version=version, ops=ops_of(*ops)),
    ]


def read(
    root: str, start: float, end: float, version: int | None, digest: str | None = None, *, process: str = "r"
) -> list[Event]:
    return [
        Event(process, "invoke", "read", root, start),
        Event(process, "ok", "read", root, end, version=version, hash=digest),
    ]


def final(root: str, t: float, version: int) -> list[Event]:
    return [Event("checker", "ok", "final", root, t, version=version)]


# One root's committed states, written by hand: v1 = root only, v2 = + child a, v3 = a changed.
V1: Rows = {"r": (None, {"name": "r"})}
V2: Rows = {**V1, "a": ("r", {"n": 1})}
V3: Rows = {**V1, "a": ("r", {"n": 2})}
H1, H2, H3 = (expected_hash("r", rows) for rows in (V1, V2, V3))


def three_versions() -> list[Event]:
    return [
        *create("r", 0.0),
        *write("r", 1.0, 1.1, 2, Upsert("a", "r", {"n": 1})),
        *write("r", 2.0, 2.1, 3, Upsert("a", "r", {"n": 2})),
    ]


def test_clean_history_has_zero_of_everything() -> None:
    """Reads that follow the commits in order, then converge: no violation of any kind."""
    events = [
        *three_versions(),
        *read("r", 1.2, 1.3, 2, H2),
        *read("r", 2.2, 2.3, 3, H3),
        *final("r", 3.0, 3),
        *read("r", 3.1, 3.2, 3, H3, process="checker"),
    ]
    report = check(events)
    assert (report.regressions, report.torn, report.stale, report.unjudged) == (0, 0, 0, 0)
    assert (report.absent_at_end, report.unread_at_end, report.absent_reads) == (0, 0, 0)
    assert (report.reads, report.writes, report.roots) == (3, 2, 1)
    assert report.examples == []
    assert report.ok


def test_regression_is_found_with_an_example_naming_root_and_versions() -> None:
    """A read that began after a read of v3 ended and returned v2 is one G1 regression."""
    events = [
        *three_versions(),
        *read("r", 2.2, 2.3, 3, H3, process="reader-1"),
        *read("r", 2.4, 2.5, 2, H2, process="reader-2"),
    ]
    report = check(events)
    assert report.regressions == 1
    assert not report.ok
    [example] = [v for v in report.examples if v.kind == "G1"]
    assert example.root == "r"
    assert "reader-2 read v2" in example.detail
    assert "reader-1's read of v3" in example.detail


def test_overlapping_reads_may_return_versions_out_of_order() -> None:
    """Reads that overlap in time are concurrent: v3 then v2 by completion order is not a regression."""
    events = [
        *three_versions(),
        *read("r", 2.2, 2.6, 3, H3, process="reader-1"),
        *read("r", 2.3, 2.7, 2, H2, process="reader-2"),
        *read("r", 2.5, 2.8, 2, H2, process="reader-3"),
    ]
    report = check(events)
    assert report.regressions == 0
    assert report.torn == 0


def test_absent_reads_are_not_versions() -> None:
    """A miss between two reads is counted apart and neither causes nor hides a regression."""
    clean = [
        *three_versions(),
        *read("r", 2.2, 2.3, 3, H3),
        *read("r", 2.4, 2.5, None),
        *read("r", 2.6, 2.7, 3, H3),
    ]
    assert (check(clean).regressions, check(clean).absent_reads) == (0, 1)
    regressed = [*clean, *read("r", 2.8, 2.9, 2, H2)]
    assert check(regressed).regressions == 1


def test_one_regression_per_offending_read() -> None:
    """Every read that returns an older version than one already seen is counted, examples capped."""
    events = [*three_versions(), *read("r", 2.2, 2.3, 3, H3)]
    for i in range(4):
        events += read("r", 3.0 + i, 3.5 + i, 2, H2, process=f"late-{i}")
    report = check(events, max_examples=2)
    assert report.regressions == 4
    assert len([v for v in report.examples if v.kind == "G1"]) == 2


def test_regression_is_judged_per_root() -> None:
    """A lower version of another root is not a regression."""
    events = [
        *three_versions(),
        *create("s", 0.0),
        *read("r", 2.2, 2.3, 3, H3),
        *read("s", 2.4, 2.5, 1, expected_hash("s", {"s": (None, {"name": "s"})})),
    ]
    report = check(events)
    assert (report.regressions, report.torn, report.roots) == (0, 0, 2)


def test_torn_graph_is_found() -> None:
    """A read stamped v2 that carries v3's content is one G2 violation, with an example."""
    events = [*three_versions(), *read("r", 2.2, 2.3, 2, H3, process="reader-1")]
    report = check(events)
    assert report.torn == 1
    [example] = report.examples
    assert (example.kind, example.root) == ("G2", "r")
    assert example.detail.startswith("reader-1 read v2 (t=+2.300000s) holding the content of v3;")
    assert example.detail.endswith(f"the committed graph at v2 hashes to {H2}, the read to {H3}")


def test_torn_content_of_no_version_is_named_so() -> None:
    """A torn read whose content matches no committed version says so."""
    report = check([*three_versions(), *read("r", 2.2, 2.3, 3, "f" * 24)])
    assert report.torn == 1
    assert "holding content no known version had" in report.examples[0].detail


def test_a_version_never_committed_is_torn() -> None:
    """A read stamped above the final committed version, or below 1, is a G2 violation."""
    events = [
        *three_versions(),
        *final("r", 3.0, 3),
        *read("r", 3.1, 3.2, 4, H3),
        *read("r", 3.3, 3.4, 0, H1),
    ]
    report = check(events)
    assert report.torn == 2
    assert [v.detail for v in report.examples if v.kind == "G2"] == [
        "r read v4, never committed (last committed v3)",
        "r read v0, never committed (last committed v3)",
    ]


def test_a_commit_recorded_after_the_final_event_is_still_judged() -> None:
    """A write whose ok the history holds is committed, even if its version is above the final event's."""
    events = [*three_versions(), *final("r", 1.5, 2), *read("r", 2.2, 2.3, 3, H3)]
    report = check(events)
    assert (report.torn, report.unjudged) == (0, 0)


def test_delete_removes_the_subtree_in_the_replay() -> None:
    """Deleting a node drops its descendants: the replayed v3 equals the root plus the untouched sibling."""
    events = [
        *create("r", 0.0),
        *write("r", 1.0, 1.1, 2, Upsert("a", "r", {}), Upsert("b", "a", {}), Upsert("c", "r", {})),
        *write("r", 2.0, 2.1, 3, Delete("a")),
        *read("r", 2.2, 2.3, 3, expected_hash("r", {**V1, "c": ("r", {})})),
    ]
    report = check(events)
    assert (report.torn, report.unjudged) == (0, 0)


def test_versions_past_an_unknown_write_are_unjudged() -> None:
    """After a write whose outcome is unknown, reads at later versions are neither torn nor clean."""
    events = [
        *create("r", 0.0),
        *write("r", 1.0, 1.1, 2, Upsert("a", "r", {"n": 1})),
        Event("w2", "invoke", "write", "r", 1.5),
        Event("w2", "info", "write", "r", 1.9),
        *write("r", 2.0, 2.1, 4, Upsert("a", "r", {"n": 2})),
        *read("r", 1.2, 1.3, 2, H2),
        *read("r", 2.2, 2.3, 3, "whatever-v3-was"),
        *read("r", 2.4, 2.5, 4, "whatever-v4-was"),
    ]
    report = check(events)
    assert (report.torn, report.unjudged) == (0, 2)


def test_two_commits_with_one_version_leave_it_unjudged(caplog: pytest.LogCaptureFixture) -> None:
    """One version given to two different transactions: reads at or past it are unjudged, with a warning."""
    events = [
        *three_versions(),
        *write("r", 1.0, 1.2, 2, Upsert("b", "r", {}), process="w2"),
        *read("r", 2.2, 2.3, 2, H2),
        *read("r", 2.4, 2.5, 3, H3),
    ]
    report = check(events)
    assert (report.torn, report.unjudged) == (0, 2)
    assert "two different commits of v2" in caplog.text


def test_a_read_without_hash_is_unjudged() -> None:
    """A stamped read that recorded no hash cannot be compared."""
    report = check([*three_versions(), *read("r", 2.2, 2.3, 3, None)])
    assert (report.torn, report.unjudged) == (0, 1)


def hash_only(op: Literal["create", "write"], root: str, t: float, version: int, digest: str) -> list[Event]:
    """A commit recorded as the hash of the whole graph it left, without ops (a plain-SQL writer's)."""
    return [Event("sql", "ok", op, root, t, version=version, hash=digest)]


def test_commits_recorded_by_hash_alone_are_judged() -> None:
    """Writes known only by the hash of the graph they left: a read matching its version's hash passes,
    one holding another version's content is torn and says which."""
    events = [
        *hash_only("create", "r", 0.0, 1, H1),
        *hash_only("write", "r", 1.0, 2, H2),
        *hash_only("write", "r", 2.0, 3, H3),
        *read("r", 1.2, 1.3, 2, H2),
        *read("r", 2.2, 2.3, 3, H3),
        *read("r", 2.21, 2.5, 2, H3, process="reader-2"),  # overlaps the read of v3: no regression
    ]
    report = check(events)
    assert (report.torn, report.unjudged, report.writes) == (1, 0, 2)
    [example] = report.examples
    assert example.detail.startswith("reader-2 read v2 (t=+2.500000s) holding the content of v3;")


def test_a_commit_known_by_hash_after_replayed_ones_is_judged() -> None:
    """A hash-only commit may follow commits recorded by ops: each version is judged by its own record."""
    events = [
        *create("r", 0.0),
        *write("r", 1.0, 1.1, 2, Upsert("a", "r", {"n": 1})),
        *hash_only("write", "r", 2.0, 3, H3),
        *read("r", 1.2, 1.3, 2, H2),
        *read("r", 2.2, 2.3, 3, H3),
        *read("r", 2.4, 2.5, 3, H2),
    ]
    report = check(events)
    assert (report.torn, report.unjudged) == (1, 0)


def test_ops_after_a_commit_known_by_hash_alone_are_unjudged() -> None:
    """Ops cannot be replayed onto a graph known only by its hash: a later write recorded by ops alone
    leaves its version (and every later one) unjudged, while the versions before it are still judged."""
    events = [
        *create("r", 0.0),
        *hash_only("write", "r", 1.0, 2, H2),
        *write("r", 2.0, 2.1, 3, Upsert("a", "r", {"n": 2})),
        *hash_only("write", "r", 3.0, 4, "f" * 24),
        *read("r", 1.2, 1.3, 2, H2),
        *read("r", 2.2, 2.3, 3, H3),
        *read("r", 3.2, 3.3, 4, "f" * 24),
    ]
    report = check(events)
    assert (report.torn, report.unjudged) == (0, 2)


def test_stale_end_is_found() -> None:
    """A root whose last read after the final event shows an older version is one G3 violation."""
    events = [
        *three_versions(),
        *final("r", 3.0, 3),
        *read("r", 3.1, 3.2, 2, H2, process="checker"),
    ]
    report = check(events)
    assert report.stale == 1
    g3 = [v for v in report.examples if v.kind == "G3"]
    assert len(g3) == 1
    assert "final committed version v3" in g3[0].detail
    assert "returned v2" in g3[0].detail


def test_the_last_read_after_final_decides() -> None:
    """A stale read followed by a read of the final version converged: not stale."""
    events = [
        *three_versions(),
        *final("r", 3.0, 3),
        *read("r", 3.1, 3.2, 2, H2, process="checker"),
        *read("r", 3.3, 3.4, 3, H3, process="checker"),
    ]
    assert check(events).stale == 0


def test_absent_at_end_is_not_stale() -> None:
    """A root absent from the cache at the end is counted apart (DESIGN allows invalidated)."""
    events = [*three_versions(), *final("r", 3.0, 3), *read("r", 3.1, 3.2, None, process="checker")]
    report = check(events)
    assert (report.stale, report.absent_at_end) == (0, 1)
    assert report.ok


def test_root_not_read_after_final_is_reported_unread() -> None:
    """A final event without a later read leaves G3 unjudged for that root, and says so."""
    events = [*three_versions(), *read("r", 2.2, 2.3, 3, H3), *final("r", 3.0, 3)]
    report = check(events)
    assert (report.stale, report.unread_at_end) == (0, 1)


def lag_case() -> list[Event]:
    """Ten writes at t = 10, 20, ...; each first seen by a read ending 5, 15, 25, ... 95 ms later."""
    events = [*create("r", 0.0)]
    data_rows: Rows = dict(V1)
    seen_after_ms = [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
    for i, lag_ms in enumerate(seen_after_ms):
        version, committed = i + 2, 10.0 * (i + 1)
        data_rows["a"] = ("r", {"n": i})
        events += write("r", committed - 0.5, committed, version, Upsert("a", "r", {"n": i}))
        digest = expected_hash("r", data_rows)
        events += read("r", committed + 0.001, committed + lag_ms / 1000, version, digest)
        # a later read of the same version never shortens the lag already measured
        events += read("r", committed + 0.002, committed + lag_ms / 1000 + 0.5, version, digest)
    return events


def test_lag_percentiles_use_nearest_rank() -> None:
    """Lags 5..95 ms: p50 = 45 ms, p95 = p99 = 95 ms; shares within 10 ms / 100 ms / 1 s."""
    report, lags = check_with_lags(lag_case())
    assert sorted(lags) == pytest.approx([0.005 + 0.010 * i for i in range(10)])
    assert report.lag_p50 == pytest.approx(0.045)
    assert report.lag_p95 == pytest.approx(0.095)
    assert report.lag_p99 == pytest.approx(0.095)
    assert report.visible_within == pytest.approx({"10ms": 0.1, "100ms": 1.0, "1s": 1.0})
    assert report.unseen_commits == 0


def test_lag_counts_a_newer_version_and_ignores_reads_begun_before_commit() -> None:
    """A write is visible once a read begun after it sees it or newer; earlier reads do not count."""
    events = [
        *three_versions(),
        *read("r", 1.05, 1.2, 2, H2),  # began before v2's ok at 1.1: not evidence of visibility
        *read("r", 2.2, 2.3, 3, H3),  # sees v3 >= v2 and v3
    ]
    report, lags = check_with_lags(events)
    assert sorted(lags) == pytest.approx([0.2, 1.2])
    assert report.unseen_commits == 0


def test_unseen_commits_count_as_not_visible() -> None:
    """A write no later read observed is counted and lowers every visibility share."""
    events = [*three_versions(), *read("r", 1.2, 1.205, 2, H2)]
    report = check(events)
    assert report.unseen_commits == 1
    assert report.lag_p50 == pytest.approx(0.105)
    assert report.visible_within == pytest.approx({"10ms": 0.0, "100ms": 0.0, "1s": 0.5})


def put(root: str, t: float, version: int, *, process: str = "node-0") -> list[Event]:
    """A put of ``version`` that the cache acknowledged as stored at ``t``."""
    return [Event(process, "ok", "rebuild", root, t, version=version)]


def test_visibility_lag_runs_from_a_write_to_the_first_stored_put_of_it_or_newer() -> None:
    """v2 (ok at 1.1) is first stored by a put of v3 at 2.3; v3 (ok at 2.1) by that same put: 1.2 s
    and 0.2 s. A put of an older version covers nothing newer."""
    events = [*three_versions(), *put("r", 1.5, 1), *put("r", 2.3, 3), *put("r", 2.4, 2)]
    report, lags = check_with_all_lags(events)
    assert sorted(lags.visibility) == pytest.approx([0.2, 1.2])
    assert report.visibility_lag_p50 == pytest.approx(0.2)
    assert report.visibility_lag_p99 == pytest.approx(1.2)
    assert (report.invisible_commits, report.stored_puts) == (0, 3)


def test_a_put_acknowledged_before_the_write_ok_is_lag_zero() -> None:
    """A node may cache v2 before its writer hears the commit's ack: the commit was visible at once."""
    events = [*three_versions(), *put("r", 1.05, 2), *put("r", 2.15, 3)]
    report, lags = check_with_all_lags(events)
    assert sorted(lags.visibility) == pytest.approx([0.0, 0.05])
    assert report.visibility_lag_p50 == 0.0


def test_a_write_no_put_covered_is_counted_invisible() -> None:
    """v3 is never stored: counted in invisible_commits, not given a lag; v2's put still counts."""
    events = [*three_versions(), *put("r", 1.3, 2)]
    report, lags = check_with_all_lags(events)
    assert lags.visibility == pytest.approx([0.2])
    assert report.invisible_commits == 1
    assert report.visibility_lag_p99 == pytest.approx(0.2)


def test_without_put_acknowledgements_there_is_no_visibility_lag() -> None:
    """A history with reads but no stored puts (the none strategy, an old history) has a read lag only,
    and every write counts as invisible; creates are never measured."""
    events = [*three_versions(), *read("r", 2.2, 2.3, 3, H3)]
    report = check(events)
    assert (report.visibility_lag_p50, report.visibility_lag_p95, report.visibility_lag_p99) == (None,) * 3
    assert (report.invisible_commits, report.stored_puts, report.writes) == (2, 0, 2)
    assert report.lag_p99 is not None


def test_puts_of_other_roots_do_not_cover_a_write() -> None:
    """A put is matched to writes of its own root only."""
    events = [*three_versions(), *create("s", 0.0), *put("s", 2.5, 9)]
    assert check(events).invisible_commits == 2


def test_empty_history_has_no_lag() -> None:
    """No events: zero counts, no percentiles, no visibility shares."""
    report = check([])
    assert (report.reads, report.writes, report.roots) == (0, 0, 0)
    assert (report.lag_p50, report.lag_p95, report.lag_p99) == (None, None, None)
    assert report.visible_within == {}


def test_events_in_any_order_give_the_same_report() -> None:
    """The checker orders events by time itself (histories come from several files)."""
    events = [*three_versions(), *read("r", 2.2, 2.3, 3, H3), *read("r", 2.4, 2.5, 2, H2)]
    assert check(list(reversed(events))) == check(events)


@pytest.mark.parametrize("a_ends_first", [True, False])
def test_overlapping_reads_of_one_process_are_widened_not_misjudged(a_ends_first: bool) -> None:
    """Two reads in flight in one process, finishing in either order, never make a false regression."""
    a_end = Event("r", "ok", "read", "r", 2.5 if a_ends_first else 2.6, version=2, hash=H2)
    b_end = Event("r", "ok", "read", "r", 2.6 if a_ends_first else 2.5, version=3, hash=H3)
    events = [
        *three_versions(),
        *read("r", 2.2, 2.35, 3, H3, process="other"),
        Event("r", "invoke", "read", "r", 2.3),  # A: began before other's read ended, so may see v2
        Event("r", "invoke", "read", "r", 2.4),  # B
        a_end,
        b_end,
    ]
    assert check(events).regressions == 0


def test_create_hash_that_disagrees_with_the_replay_is_an_error() -> None:
    """A create whose ops do not hash to its recorded hash means recorder and checker disagree."""
    bad = Event(
        "setup", "ok", "create", "r", 0.0, version=1, hash="0" * 24, ops=ops_of(Upsert("r", None, {}))
    )
    with pytest.raises(HistoryError, match=r"'r'.*v1"):
        check([bad])


def test_ops_that_are_not_storage_operations_are_an_error() -> None:
    """Malformed ops in a commit name the root and version."""
    bad = Event("setup", "ok", "create", "r", 0.0, version=1, ops=[{"type": "Drop", "node_id": "r"}])
    with pytest.raises(HistoryError, match="'r' v1"):
        check([bad])


def test_negative_max_examples_is_refused() -> None:
    """max_examples < 0 is a ValueError before any work."""
    with pytest.raises(ValueError, match="max_examples"):
        check([], max_examples=-1)


@st.composite
def linearizable_histories(draw: st.DrawFn) -> tuple[list[Event], int]:
    """A random sequential run: writes commit in order, each read returns the newest committed version.

    Returns the events and the index of a read that can be made to regress, or -1.
    """
    events = [*create("r", 0.0)]
    rows: Rows = dict(V1)
    hashes = {1: H1}
    version, t = 1, 1.0
    reads: list[int] = []
    for step in draw(st.lists(st.sampled_from(["write", "read"]), min_size=1, max_size=30)):
        if step == "write":
            version += 1
            rows["a"] = ("r", {"n": version})
            hashes[version] = expected_hash("r", rows)
            events += write("r", t, t + 0.1, version, Upsert("a", "r", {"n": version}))
        else:
            reads.append(len(events) + 1)
            events += read("r", t, t + 0.1, version, hashes[version], process=f"p{draw(st.integers(0, 3))}")
        t += 0.2
    events += [*final("r", t, version), *read("r", t + 0.1, t + 0.2, version, hashes[version])]
    # a read after some earlier (hence finished) read saw v >= 2 regresses if rewound to v1
    seen_newer = [i for i in reads if any((events[j].version or 0) >= 2 for j in reads if j < i)]
    return events, seen_newer[-1] if seen_newer else -1


@settings(max_examples=60, deadline=None)
@given(linearizable_histories())
def test_sequential_histories_pass_and_a_planted_regression_is_caught(case: tuple[list[Event], int]) -> None:
    """Every linearizable history is clean; rewinding one later read to an older version is caught."""
    events, victim = case
    assert check(events).ok
    if victim >= 0:
        planted = list(events)
        planted[victim] = msgspec.structs.replace(planted[victim], version=1, hash=H1)
        report = check(planted)
        assert report.regressions >= 1
        assert report.torn == 0


async def _record_store_run(store: GraphStore, seed: int) -> list[Event]:
    """Random upserts and subtree deletes on a real store; after each, a read hashed from ``load``."""
    rng = random.Random(seed)
    clock = iter(float(t) for t in range(10_000))
    root_ops: list[Op] = [Upsert("r", None, {"seed": seed})]
    version = await store.create_root("r", {"seed": seed})
    events = [Event("setup", "ok", "create", "r", next(clock), version=version, ops=ops_of(*root_ops))]
    for step in range(40):
        graph = await store.load("r")
        children = sorted(n for n in graph.nodes if n != "r")
        data = {"step": step, "f": 0.5, "s": "é", "nested": {"k": [1, None]}}
        ops: list[Op] = [
            Upsert(f"n{step}-{i}", rng.choice(["r", *children]), data) for i in range(rng.randint(0, 2))
        ]
        if children and rng.random() < 0.5:
            changed = rng.choice(children)
            ops.append(Upsert(changed, graph.nodes[changed].parent_id, {"changed": step}))
        if children and rng.random() < 0.3:
            ops.append(Delete(rng.choice(children)))
        if not ops:
            continue
        version = await store.apply("r", ops)
        events += write("r", next(clock), next(clock), version, *ops)
        loaded = await store.load("r")
        events += read("r", next(clock), next(clock), loaded.version, graph_hash(loaded))
    return events


def _assert_replay_agrees(events: list[Event]) -> None:
    report = check(events)
    assert (report.torn, report.unjudged, report.regressions) == (0, 0, 0)
    reads = [i for i, e in enumerate(events) if e.op == "read" and e.type == "ok"]
    first, last = events[reads[0]], events[reads[-1]]
    assert first.hash != last.hash
    events[reads[0]] = msgspec.structs.replace(first, hash=last.hash)
    assert check(events).torn == 1


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(5))
async def test_replay_agrees_with_the_memory_store(seed: int) -> None:
    """Replaying the recorded ops hashes like MemoryStore.load at every version; a swapped stamp is torn."""
    async with MemoryStore() as store:
        _assert_replay_agrees(await _record_store_run(store, seed))


@pytest.mark.anyio
async def test_replay_agrees_with_the_postgres_store(postgres_dsn: str, pg_schema: str) -> None:
    """The same holds for PostgresStore (jsonb round trip included)."""
    store = await PostgresStore.connect(postgres_dsn, schema=pg_schema, listen=False)
    async with store:
        _assert_replay_agrees(await _record_store_run(store, seed=7))
