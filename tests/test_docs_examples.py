"""docs/usage.md quotes every program in docs/examples/ verbatim, and every one of them runs:
starts its own server(s) on free ports, makes a real call, prints the result and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
USAGE = DOCS / "usage.md"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))

#: A line each example must print (proof that its call went through).
EXPECTED = {
    "attach_grpcio_aio.py": "created: served by grpc.aio",
    "attach_grpcio_sync.py": "created: served by grpcio",
    "cli_serve_forward.py": "created: through the CLI",
    "dial_channel.py": "error: NOT_FOUND todo 'nope' not found",
    "dial_grpcio_forwarder.py": "created: sent by grpcio",
    "fastapi_app.py": "created: served by FastAPI",
    "serve_grpclib.py": "created: served in process",
    "tracing.py": "rpc span: todo.v1.TodoService/CreateTodo continues trace "
                  "4bf92f3577b34da6a3ce929d0e0e4736",
}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def test_every_example_is_quoted_verbatim_and_expected() -> None:
    usage = USAGE.read_text()
    blocks = python_blocks(usage)
    sources = {path.name: path.read_text() for path in EXAMPLES}
    assert sources, "no examples found"
    for block in blocks:
        assert block in sources.values(), f"a python block in usage.md is no example file:\n{block}"
    for name, source in sources.items():
        assert source in blocks, f"usage.md does not quote docs/examples/{name} verbatim"
        assert f"docs/examples/{name}" in usage, f"usage.md does not name {name}"
    assert set(EXPECTED) == set(sources), "EXPECTED must list exactly the example files"


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "dev", str(example)], cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{example.name} failed:\n{result.stdout}\n{result.stderr}"
    assert EXPECTED[example.name] in result.stdout.splitlines(), result.stdout
    # -X dev shows unclosed sockets/files, unawaited coroutines and tasks destroyed while
    # pending: an example must shut down as cleanly as it is meant to be copied.
    for problem in ("Traceback", "Warning", "Exception ignored", "destroyed but it is pending"):
        assert problem not in result.stderr, f"{example.name}:\n{result.stderr}"
