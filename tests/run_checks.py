"""The two tiers of the suite and the checks of a whole run (a pytest plugin, see conftest).

Tiers: the default one (`pytest`) is every test but those marked `e2e`, end-to-end runs of whole
commands, mostly in processes of their own (the wheel build, the README's commands, training
subprocesses, the GCS emulator, multi-process runs, the benchmarks' smoke runs, and the training
runs that take minutes even with a warm cache); `pytest -m e2e` runs those, and .ci/run runs both.

A run fails, after its tests, when a test was skipped (a skipped test did not run: what a test
needs belongs in the test extra) or when a default-tier test took longer than WARM_SECONDS with a
warm compilation cache, unless the test is listed below with the reason. Under xdist the workers'
reports reach the controller, which decides.
"""

import os

import pytest

# Node id prefix -> why its skip is right. None is, today.
ALLOWED_SKIPS: dict[str, str] = {}

# A default-tier test's time (setup, call and teardown, its module's fixtures included) less the
# XLA compiles that missed the compilation cache, which a warm cache serves. Over the bound a test
# belongs in the e2e tier or needs a smaller setup. Node id prefix -> why it may take longer.
WARM_SECONDS = 60.0
SLOW_ALLOWED: dict[str, str] = {}

_skipped: list[str] = []
_slow: list[str] = []
_compiled = [0.0]  # this process's compiles that a warm cache would have served, in seconds
_COMPILED = pytest.StashKey[float]()  # _compiled when the test's current phase started
_WARM = pytest.StashKey[float]()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: an end-to-end run in processes of its own (`pytest -m e2e`)"
    )
    _count_compiles()


def _default_tier(config) -> bool:
    return not config.option.markexpr


def pytest_collection_modifyitems(config, items):
    if _default_tier(config):
        e2e = [item for item in items if item.get_closest_marker("e2e")]
        config.hook.pytest_deselected(items=e2e)
        items[:] = [item for item in items if not item.get_closest_marker("e2e")]


def _count_compiles() -> None:
    import jax

    threshold = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])

    def listener(event: str, seconds: float, **_):
        # A compile under the cache's threshold is not cached, so a warm run pays it too; a cache
        # hit's event is its read, far under the threshold.
        if event == "/jax/core/compile/backend_compile_duration" and seconds >= threshold:
            _compiled[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[_COMPILED], item.stash[_WARM] = _compiled[0], 0.0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's time less its cold compiles; the sum goes with the teardown's report."""
    report = (yield).get_result()
    item.stash[_WARM] += call.duration - (_compiled[0] - item.stash[_COMPILED])
    item.stash[_COMPILED] = _compiled[0]
    if call.when == "teardown":
        report.user_properties.append(("warm_seconds", round(item.stash[_WARM], 1)))


def _listed(nodeid: str, listing: dict) -> bool:
    return any(nodeid.startswith(prefix) for prefix in listing)


def pytest_collectreport(report):
    if report.skipped and not _listed(report.nodeid, ALLOWED_SKIPS):  # a module skipped whole
        _skipped.append(report.nodeid)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        if not _listed(report.nodeid, ALLOWED_SKIPS):
            _skipped.append(report.nodeid)
    warm = dict(report.user_properties).get("warm_seconds")
    if warm is not None and warm > WARM_SECONDS and not _listed(report.nodeid, SLOW_ALLOWED):
        _slow.append(f"{report.nodeid} ({warm:.0f} s)")


def _failures(config) -> list[str]:
    failures = []
    if _skipped:
        failures.append(f"skipped, not in ALLOWED_SKIPS: {', '.join(_skipped)}")
    if _slow and _default_tier(config):
        failures.append(
            f"over {WARM_SECONDS:.0f} s with a warm cache, not in SLOW_ALLOWED: {', '.join(_slow)}"
        )
    return failures


def pytest_sessionfinish(session, exitstatus):
    is_worker = hasattr(session.config, "workerinput")
    if exitstatus == 0 and not is_worker and _failures(session.config):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, config):
    for failure in _failures(config):
        terminalreporter.write_line(f"tests/run_checks.py: {failure}", red=True)
