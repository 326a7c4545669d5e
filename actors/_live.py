"""``LiveGraph``: the graph a live actor keeps, patched in memory from the feed's row images.

Version v + 1 is computed from v by applying the transaction's images in order: an after-image replaces
the node, a deletion removes the node and its subtree. A children index makes a subtree removal cost its
size, not the graph's. An image that does not fit the graph (a parent that is not there, a row that
would hang below itself) raises ``Doubt``: the caller then loads a snapshot instead, so a patch can be
wrong only if the images are (the property tests compare patches with snapshot loads at every version).

``size`` estimates the memory the graph holds: its msgpack size when loaded, plus the size of every
image applied since (deletions are not subtracted, so it only overestimates); an actor stops keeping a
graph whose estimate passes its bound and loads snapshots instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from ..storage import Graph, Node, RowImage

__all__ = ("Doubt", "LiveGraph")

_encoder = msgspec.msgpack.Encoder()


class Doubt(Exception):
    """The images do not fit the graph: load a snapshot instead."""


class LiveGraph:
    """A root's graph at ``version``, cheap to patch (``apply``) and to hand to a put (``graph``)."""

    __slots__ = ("_children", "_nodes", "_top", "lease", "root_id", "size", "version")

    def __init__(self, graph: Graph, lease: int) -> None:
        self.lease = lease  # the cache lease the graph's snapshot was loaded under (patches build on it)
        self.root_id = graph.root_id
        self.version = graph.version
        self._nodes = dict(graph.nodes)
        self._children: dict[str, set[str]] = {}
        self._top: str | None = None  # the root's node: deleting it leaves no graph, only a snapshot says
        for node in self._nodes.values():
            if node.parent_id is not None:
                self._children.setdefault(node.parent_id, set()).add(node.id)
            else:
                self._top = node.id
        self.size = len(_encoder.encode(graph))

    def graph(self) -> Graph:
        """The graph at ``version``, as a snapshot load at that version returns it (its own node dict:
        later patches do not change it)."""
        return Graph(self.root_id, self.version, dict(self._nodes))

    def apply(self, version: int, images: Iterable[RowImage]) -> None:
        """Patch the graph from ``version - 1`` to ``version``; ``Doubt`` (graph unchanged) if the
        images do not fit. Only the next version applies."""
        if version != self.version + 1:
            raise Doubt(f"version {version} does not follow {self.version}")
        nodes = self._nodes
        undo: list[tuple[str, Node | None]] = []  # (id, node before) to restore on a doubt
        try:
            for image in images:
                if image.data is None:
                    self._remove(image.id, undo)
                else:
                    self._write(image, undo)
            self._check_tree(undo)
        except Doubt:
            for node_id, before in reversed(undo):
                self._restore(node_id, before)
            raise
        self.version = version
        self.size += sum(len(_encoder.encode(node)) for node_id, _ in undo if (node := nodes.get(node_id)))

    def _write(self, image: RowImage, undo: list[tuple[str, Node | None]]) -> None:
        assert image.data is not None
        node_id = image.id
        if image.parent_id is None and node_id not in self._nodes:
            raise Doubt(f"node {node_id!r} arrives without a parent")
        before = self._nodes.get(node_id)
        undo.append((node_id, before))
        self._unlink(before)
        node = Node(node_id, image.parent_id, image.data, image.row_version)
        self._nodes[node_id] = node
        if node.parent_id is not None:
            self._children.setdefault(node.parent_id, set()).add(node_id)

    def _remove(self, node_id: str, undo: list[tuple[str, Node | None]]) -> None:
        if node_id == self._top:
            raise Doubt(f"the root's node {node_id!r} is deleted")
        stack = [node_id]
        while stack:
            current = stack.pop()
            node = self._nodes.pop(current, None)
            if node is None:
                continue
            undo.append((current, node))
            self._unlink(node)
            stack.extend(self._children.get(current, ()))

    def _check_tree(self, undo: list[tuple[str, Node | None]]) -> None:
        """Every written node's parent is in the graph, and no written node hangs below itself."""
        nodes = self._nodes
        for node_id, _ in undo:
            node = nodes.get(node_id)
            if node is None:
                continue
            seen = {node_id}
            parent = node.parent_id
            while parent is not None:
                above = nodes.get(parent)
                if above is None:
                    raise Doubt(f"node {node_id!r} hangs below {parent!r}, which the graph does not hold")
                if parent in seen:
                    raise Doubt(f"node {node_id!r} would hang below itself")
                seen.add(parent)
                parent = above.parent_id

    def _unlink(self, node: Node | None) -> None:
        if node is not None and node.parent_id is not None:
            siblings = self._children.get(node.parent_id)
            if siblings is not None:
                siblings.discard(node.id)
                if not siblings:
                    del self._children[node.parent_id]

    def _restore(self, node_id: str, before: Node | None) -> None:
        self._unlink(self._nodes.pop(node_id, None))
        if before is not None:
            self._nodes[node_id] = before
            if before.parent_id is not None:
                self._children.setdefault(before.parent_id, set()).add(node_id)
