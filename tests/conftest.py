"""Session-wide guards: no test leaves processes, file descriptors or threads behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

from support import kill_all_processes, snapshot


@pytest.fixture(autouse=True, scope="session")
def _no_leaks_at_session_end() -> Iterator[None]:
    yield
    kill_all_processes()
    deadline = time.monotonic() + 10
    while True:
        children = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
        if not children or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not children, f"tests left processes behind: {children}"


@pytest.fixture(autouse=True)
def _kill_processes_after_each_test() -> Iterator[None]:
    yield
    kill_all_processes()


@pytest.fixture
def leak_check() -> Iterator[None]:
    """Assert the test leaves no extra file descriptors, threads or child processes."""
    before = snapshot()
    yield
    kill_all_processes()
    deadline = time.monotonic() + 5
    while True:
        after = snapshot()
        leaked = (after.fds > before.fds or after.threads - before.threads
                  or after.children - before.children)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after.fds <= before.fds, f"fds leaked: {before.fds} -> {after.fds}"
    assert not after.threads - before.threads, f"threads leaked: {after.threads - before.threads}"
    assert not after.children - before.children, "child processes leaked"
