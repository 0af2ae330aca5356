"""How the suite spreads over pytest-xdist's workers (`make test` runs `-n`, docs/tests.md).

Units of work: a module's tests marked `slow` (benchmark smoke, soak, packaging, schemathesis:
CPU-bound for tens of seconds each) form one unit, so that they run one after another on one
worker beside the rest rather than all at once, each stretched past its time limit (the benchmark
smoke tests did, under -n 4, as four units). Otherwise the tests
of a module that use a module- or class-scoped fixture (a server, an Envoy, a fleet, the image)
form one unit, an `xdist_group` named after the module, so that each such fixture is built once,
on one worker; every other test is a unit of its own and goes to whichever worker is free.
Session fixtures (the checkpoints, the shared `server`) are built once per worker that needs them.

Order: the longest units first, so that the image build and the other long units run beside the
rest instead of after it. A unit's expected time is what it took in the last run that ran it
(pytest's cache, `.pytest_cache`, key DURATIONS_KEY); a unit never measured is estimated from its
marks (packaging, slow) and its size. Without a cache (a fresh clone, `-p no:cacheprovider`) the
order is the estimate alone. xdist's own reordering (largest scope first) is turned off in
pyproject.toml (`--no-loadscope-reorder`), which keeps this order.

Every worker must collect the same items in the same order, so the controller reads the cache
once and hands the same durations to every worker (pytest_configure_node).
"""

from __future__ import annotations

import pytest

DURATIONS_KEY = "esm2/durations"
WORKER_INPUT_KEY = "esm2_durations"
SHARED_SCOPES = {"module", "class", "package"}
# Seconds, for a unit never measured: rough figures for a 2-core machine (docs/tests.md).
ESTIMATE_PACKAGING_S = 300.0
ESTIMATE_SLOW_S = 30.0
ESTIMATE_TEST_S = 1.0


def group_name(item: pytest.Item) -> str | None:
    """For a `slow` test, "slow:" and its module's nodeid; else the module's nodeid where the test
    uses a fixture shared beyond one test and not the whole session (module, class or package
    scope); None where it can run on any worker on its own. (A module fixture used by slow and
    other tests is built on both workers.)"""
    module = item.nodeid.split("::")[0]
    if item.get_closest_marker("slow"):
        return f"slow:{module}"
    definitions = item._fixtureinfo.name2fixturedefs  # pytest offers no public reader of fixture scopes
    if any(d.scope in SHARED_SCOPES for defs in definitions.values() for d in defs):
        return module
    return None


def unit_key(nodeid: str) -> str:
    """The nodeid without the `@group` suffix xdist adds under --dist loadgroup."""
    at, bracket = nodeid.rfind("@"), nodeid.rfind("]")
    return nodeid[:at] if at > bracket else nodeid


def estimate(item: pytest.Item) -> float:
    if item.get_closest_marker("packaging"):
        return ESTIMATE_PACKAGING_S
    if item.get_closest_marker("slow"):
        return ESTIMATE_SLOW_S
    return ESTIMATE_TEST_S


def order(items: list[pytest.Item], durations: dict[str, float]) -> list[pytest.Item]:
    """Items by unit, the longest unit first (measured where known, else estimated); collection
    order within a unit and between units of equal time."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(group_name(item) or item.nodeid, []).append(item)

    def expected(unit: list[pytest.Item]) -> float:
        return sum(durations.get(unit_key(item.nodeid), estimate(item)) for item in unit)

    return [item for unit in sorted(units.values(), key=expected, reverse=True) for item in unit]


def mark_groups(items: list[pytest.Item]) -> None:
    for item in items:
        name = group_name(item)
        if name is not None:
            item.add_marker(pytest.mark.xdist_group(name))


def recorded(config: pytest.Config) -> dict[str, float]:
    """Durations by nodeid: the controller's copy on a worker, else the cache's."""
    worker_input = getattr(config, "workerinput", None)
    if worker_input is not None:
        return worker_input.get(WORKER_INPUT_KEY, {})
    cache = getattr(config, "cache", None)
    return dict(cache.get(DURATIONS_KEY, {})) if cache is not None else {}


class DurationRecorder:
    """On the controller (or a serial run): each test's setup + call + teardown time, merged into
    the cache at the end of the session (tests not run this time keep their last figure)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.durations: dict[str, float] = {}
        self._last_run: dict[str, float] | None = None

    def last_run(self) -> dict[str, float]:
        """The cache's durations as they were when first read: one copy for every worker, even
        if a run beside this one rewrites the cache meanwhile."""
        if self._last_run is None:
            self._last_run = recorded(self.config)
        return self._last_run

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        key = unit_key(report.nodeid)
        self.durations[key] = self.durations.get(key, 0.0) + report.duration

    @pytest.hookimpl(optionalhook=True)  # xdist's hook, before a worker starts
    def pytest_configure_node(self, node) -> None:
        node.workerinput[WORKER_INPUT_KEY] = self.last_run()

    def pytest_sessionfinish(self) -> None:
        cache = getattr(self.config, "cache", None)
        if cache is not None and self.durations:
            cache.set(DURATIONS_KEY, {**recorded(self.config), **{k: round(v, 3) for k, v in self.durations.items()}})


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def configure(config: pytest.Config) -> None:
    if not is_worker(config):
        config.pluginmanager.register(DurationRecorder(config), "esm2-duration-recorder")


def arrange(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups always (harmless in a serial run); the longest-first order on xdist's workers only,
    so a serial run keeps the files' order."""
    mark_groups(items)
    if is_worker(config):
        items[:] = order(items, recorded(config))
