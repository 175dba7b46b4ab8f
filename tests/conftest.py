"""Session-wide guards: no test leaves processes, file descriptors or threads behind; and the
suite's timing factor (support.TIMING) scales pytest-timeout's limit of every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import settings

from support import TIMING, kill_all_processes, snapshot, wait_until, warm_up_grpc_and_uvloop

# Clients read the proxy variables by default: those of the machine running the suite must not
# send its loopback tunnels through a proxy (tests/client/test_proxy.py sets them on purpose).
for _name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)

# Hypothesis: no per-example deadline (shared, noisy machines; the suite never asserts timing).
# .ci/run sets HYPOTHESIS_PROFILE=ci: derandomized, so a CI run is reproducible and a red one
# can be replayed; runs elsewhere draw new examples each time and find what CI would not.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TIMING == 1.0:
        return
    default = getattr(config, "_env_timeout", None)  # pytest-timeout's --timeout or ini
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            seconds = default
        else:
            seconds = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if seconds:
            item.add_marker(pytest.mark.timeout(float(seconds) * TIMING), append=False)


@pytest.fixture(autouse=True, scope="session")
def _no_leaks_at_session_end() -> Iterator[None]:
    yield
    kill_all_processes()

    def children() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]

    wait_until(lambda: not children(), 10, interval=0.1, fail=False)
    left = children()
    assert not left, f"tests left processes behind: {left}"


@pytest.fixture(autouse=True)
def _kill_processes_after_each_test() -> Iterator[None]:
    yield
    kill_all_processes()


@pytest.fixture(scope="module")
def todo_port() -> Iterator[int]:
    """The port of the grpcio Todo service (the test oracle) in its own process."""
    from hostile import todo_service

    with todo_service() as port:
        yield port


@pytest.fixture(scope="session")
def _grpc_warmed_up() -> None:
    """grpcio and uvloop create process-wide threads and descriptors on first use: create
    them before the first ``leak_check`` snapshot, whatever order the tests run in."""
    warm_up_grpc_and_uvloop()


@pytest.fixture
def leak_check(_grpc_warmed_up: None) -> Iterator[None]:
    """Assert the test leaves no extra file descriptors, threads or child processes."""
    before = snapshot()
    yield
    kill_all_processes()
    after = before

    def settled() -> bool:
        nonlocal after
        after = snapshot()
        return not (after.fds > before.fds or after.threads - before.threads
                    or after.children - before.children)

    wait_until(settled, 5, interval=0.05, fail=False)
    assert after.fds <= before.fds, f"fds leaked: {before.fds} -> {after.fds}"
    assert not after.threads - before.threads, f"threads leaked: {after.threads - before.threads}"
    assert not after.children - before.children, "child processes leaked"
