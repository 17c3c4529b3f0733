"""Balance `make test` (``pytest -n 2``) over its pytest-xdist workers; hooks used by tests/conftest.py.

xdist's default `load` scheduling sends each worker a quarter of the collection in file order, so a
worker can be left with several minute-long tests at the end while the other idles. This switches it
to `worksteal`: worker k starts with the k-th of n equal-count slices of the collection, and a worker
that runs dry takes half of the other's queue from its end. The collection is ordered so that each
slice holds about the same estimated time, longest first, and its short tests last (the part that
moves when a worker steals):

* a test's estimate is ``slow(seconds=N)``'s N, 10 s for other ``slow`` tests, under a second otherwise;
* tests with the same ``xdist_group`` mark share a session fixture and go to one slice, so the fixture
  is made once (a stolen member would make it again, correct but slower);
* the slow tests and groups are dealt longest first to the slice with the least time so far; the short
  tests then fill each slice up to its share of the count.

An explicit ``--dist`` other than ``load`` is left as given, and without pytest-xdist the files' own
order stands. (``loadgroup`` would honour the groups itself, but xdist 3.8 hangs under it when a worker
crashes, where ``worksteal`` reports the crash and goes on.)
"""

from __future__ import annotations

import os

import pytest

SLOW_SECONDS = 10.0  # `slow` without an estimate
FAST_SECONDS = 0.5  # the rest: most take well under a second


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        items[:] = balanced_order(items, workers)


def estimated_seconds(item: pytest.Item) -> float:
    mark = item.get_closest_marker("slow")
    if mark is None:
        return FAST_SECONDS
    return float(mark.kwargs.get("seconds", SLOW_SECONDS))


def _unit(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return item.nodeid
    return "group:" + str(mark.args[0] if mark.args else mark.kwargs["name"])


def balanced_order(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` reordered into ``workers`` consecutive slices of the sizes worksteal hands out."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(_unit(item), []).append(item)
    cost = {key: sum(estimated_seconds(i) for i in members) for key, members in units.items()}
    long_units = [k for k in units if len(units[k]) > 1 or estimated_seconds(units[k][0]) > FAST_SECONDS]
    long_set = set(long_units)
    short = [units[k][0] for k in units if k not in long_set]  # in file order, as `units` is

    slices: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for key in sorted(long_units, key=lambda k: -cost[k]):  # stable: equal estimates keep file order
        k = min(range(workers), key=load.__getitem__)
        slices[k].extend(units[key])
        load[k] += cost[key]

    sizes, remaining = [], len(items)  # worksteal: len(pending) // workers_left, first worker first
    for k in range(workers):
        sizes.append(remaining // (workers - k))
        remaining -= sizes[-1]
    for k in range(workers):  # the short tests fill each slice up to its share of the count
        take = max(0, sizes[k] - len(slices[k]))
        slices[k].extend(short[:take])
        short = short[take:]
    return [item for s in slices for item in s] + short
