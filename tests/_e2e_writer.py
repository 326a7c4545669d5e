"""A writer process for the end-to-end test: ``python -m tests._e2e_writer DSN SCHEMA WRITER COUNT ROOT...``.

``TASKS`` concurrent tasks share ``COUNT`` writes; each write adds one new child to a random root, so a
graph at version v has exactly v nodes.
"""

from __future__ import annotations

import random
import sys

import anyio

from graphcache.storage import PostgresStore, Upsert

TASKS = 8


async def write(dsn: str, schema: str, writer: str, count: int, roots: list[str]) -> None:
    store = await PostgresStore.connect(dsn, schema=schema, listen=False, pool_size=TASKS)
    try:
        async with anyio.create_task_group() as tg:
            for task in range(TASKS):
                tg.start_soon(write_share, store, f"{writer}-t{task}", range(task, count, TASKS), roots)
    finally:
        await store.aclose()


async def write_share(store: PostgresStore, writer: str, indexes: range, roots: list[str]) -> None:
    rng = random.Random(writer)
    for i in indexes:
        root = rng.choice(roots)
        await store.apply(root, [Upsert(f"{writer}-{i}", root, {"writer": writer, "i": i})])


def main(argv: list[str]) -> int:
    dsn, schema, writer, count, *roots = argv
    anyio.run(write, dsn, schema, writer, int(count), roots)
    print(f"{writer} wrote {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
