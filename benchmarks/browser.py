"""Browser benchmark: Python in headless Chromium (Pyodide) calling gRPC over WebSocket.

One run against the browser demo server (``python -m grpcbridge.demo.web``, todos in
memory, its own process), in Debian's headless Chromium (fresh profile):

* **page ready**, warm: the demo page is loaded twice in the same browser context; the
  second load is reported (HTTP cache warm: Pyodide from the cache, the page and wheels
  revalidated). Ready = Pyodide booted, wheels installed, app and stubs imported and the
  first RPC (the StreamTodos list load) answered, in milliseconds since navigation start
  (``grpcbridgeDemo.timings``, measured by the page). The cold first load is printed too.
* **unary p50**: sequential calls from Python in the page through
  ``grpcbridge.browser.Channel("/grpc")`` (one tunnel, warmed up), timed in the page with
  ``performance.now()``: ``ListTodos`` on an empty list and ``CreateTodo``.
* **bulk MiB/s**: ``BulkCreateTodos`` uploading large todos (client streaming), then
  ``StreamTodos`` downloading them (server streaming, ``repeat`` times). MiB/s counts todo
  text bytes (protobuf payload); the WebSocket byte counters are reported beside them.

The page-side code runs in a page loaded with ``?app=none`` (Pyodide, wheels and stubs, no
app), so the demo's live list does not render megabytes of todos while they are timed.

**Driver.** By default Chromium is driven over the DevTools protocol with the ``Runtime``
domain only (``--driver cdp``: navigate, evaluate): nothing else is instrumented, as in a
user's browser. ``--driver playwright`` drives it with Playwright, as the first runs of this
benchmark did: Playwright enables the DevTools ``Network`` domain, and Chromium then reports
every WebSocket frame to it with its payload (base64), which more than halves the bulk
figures (docs/benchmarks.md, "Browser").

Usage: .venv/bin/python benchmarks/browser.py [--calls 300] [--todo-kib 256] [--todos 32]
                                [--repeat 4] [--driver cdp|playwright] [--url URL]
Prints a markdown summary and writes benchmarks/results/browser-<timestamp>.json. Needs
/usr/bin/chromium, ``npm ci`` and the wheel bundle (it runs ``scripts/build_browser_bundle.py``
first, a no-op when up to date); ``--driver playwright`` also needs the playwright package.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # Chromium and its prerequisites, as the tests

from support import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_FLAGS,
    ROOT,
    build_browser_bundle,
    chromium_missing,
)

TARGETS = {"unary_p50_ms": 3.0, "bulk_mib_s": 40.0, "page_ready_warm_s": 6.0}

#: Runs in the page (Pyodide, top-level await); returns a JSON string.
PAGE_CODE = """
import json, statistics
import js
from grpcbridge.browser import Channel
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.todo_grpc import TodoServiceStub

CALLS, TODO_BYTES, TODOS, REPEAT = {calls}, {todo_bytes}, {todos}, {repeat}
now = js.performance.now


async def timed_calls(call, n):
    samples = []
    for _ in range(n):
        started = now()
        await call()
        samples.append(now() - started)
    samples.sort()
    return {{"p50_ms": statistics.median(samples),
             "p90_ms": samples[int(len(samples) * 0.9)],
             "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
             "mean_ms": statistics.fmean(samples), "calls": n}}


async def run():
    result = {{}}
    async with Channel("/grpc") as channel:
        stub = TodoServiceStub(channel)
        list_request = todo_pb2.ListTodosRequest()

        async def list_todos():
            await stub.ListTodos(list_request)

        async def create_todo():
            await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="benchmark"))

        await timed_calls(list_todos, 50)  # warm up: the tunnel, the code paths, the JIT
        stats, machine = channel.transport.stats, channel.transport.machine
        sent, received = stats.messages_sent, stats.messages_received
        result["unary_list"] = await timed_calls(list_todos, CALLS)
        result["unary_list"]["ws_messages_per_call"] = [
            (stats.messages_sent - sent) / CALLS, (stats.messages_received - received) / CALLS]
        result["unary_create"] = await timed_calls(create_todo, CALLS)

        # Upload: one BulkCreateTodos stream of TODOS texts of TODO_BYTES each.
        text = ("0123456789abcdef" * (TODO_BYTES // 16 + 1))[:TODO_BYTES]
        requests = [todo_pb2.CreateTodoRequest(text=text[:-8] + f"{{i:08d}}")
                    for i in range(TODOS)]
        sent_before = machine.bytes_to_websocket
        messages_before, pauses_before = stats.messages_sent, stats.pauses
        started = now()
        async with stub.BulkCreateTodos.open() as stream:
            for request in requests:
                await stream.send_message(request)
            await stream.end()
            reply = await stream.recv_message()
        seconds = (now() - started) / 1000
        assert reply.created_count == TODOS, reply
        payload = TODOS * TODO_BYTES
        result["upload"] = {{"payload_bytes": payload, "seconds": seconds,
                             "mib_s": payload / seconds / 1048576,
                             "wire_bytes": machine.bytes_to_websocket - sent_before,
                             "ws_messages": stats.messages_sent - messages_before,
                             "pauses": stats.pauses - pauses_before}}

        # Download: StreamTodos of everything (the big todos, plus the small ones), REPEAT x.
        received_before = machine.bytes_from_websocket
        messages_before = stats.messages_received
        payload = 0
        count = 0
        started = now()
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(todo_pb2.StreamTodosRequest(repeat=REPEAT), end=True)
            async for todo in stream:
                payload += len(todo.text)
                count += 1
        seconds = (now() - started) / 1000
        result["download"] = {{"payload_bytes": payload, "messages": count,
                               "seconds": seconds, "mib_s": payload / seconds / 1048576,
                               "wire_bytes": machine.bytes_from_websocket - received_before,
                               "ws_messages": stats.messages_received - messages_before}}
        result["connections_opened"] = channel.connections_opened
        result["max_frame_size"] = getattr(channel, "_max_frame_size", 16384)
    return json.dumps(result)

await run()
"""


class Server:
    """The demo server in its own process (todos in memory)."""

    def __init__(self, url: str | None = None) -> None:
        self.process: subprocess.Popen[str] | None = None
        if url:
            self.url = url
            return
        self.process = subprocess.Popen(
            # The bulk step sends 256 KiB todos: lift the demo's 500-character text limit.
            [sys.executable, "-m", "grpcbridge.demo.web", "--listen", "127.0.0.1:0",
             "--db", ":memory:", "--max-text-length", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.output: list[str] = []
        self.url = ""
        found = threading.Event()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.rstrip())
                match = re.search(r"open (http://\S+)", line)
                if match:
                    self.url = match[1]
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(30) or not self.url:
            self.close()
            raise SystemExit("demo server did not start:\n" + "\n".join(self.output))

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


READY = ("window.grpcbridgeDemo && (window.grpcbridgeDemo.timings.ready "
         "|| window.grpcbridgeDemo.error)")


class CdpPage:
    """Chromium driven over the DevTools protocol, ``Runtime`` and ``Page.navigate`` only (no
    ``Network`` domain: Chromium then reports no WebSocket frames to anybody)."""

    def __init__(self, profile: str) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self.process.stderr is not None
        endpoint = None
        for line in self.process.stderr:
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                endpoint = match[1]
                break
        if endpoint is None:
            self.close()
            raise SystemExit("Chromium did not start (no DevTools endpoint)")
        stderr = self.process.stderr
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        base = "http://" + endpoint.split("/")[2]
        self.version = json.load(urllib.request.urlopen(base + "/json/version"))["Browser"]
        pages: list[dict[str, Any]] = []
        for _ in range(100):
            pages = [t for t in json.load(urllib.request.urlopen(base + "/json/list"))
                     if t["type"] == "page"]
            if pages:
                break
            time.sleep(0.1)
        self._exit = contextlib.ExitStack()
        self._ws = self._exit.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        self._ws.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:  # no domain is enabled, so hardly any events arrive
            message = json.loads(self._ws.recv(timeout=600))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        if arg is not None:
            expression = f"({expression})({json.dumps(arg)})"
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"in the page: {text}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the new document's context answers
            with contextlib.suppress(RuntimeError):
                if self.evaluate("location.href") == url and \
                        self.evaluate("document.readyState") != "loading":
                    return
            time.sleep(0.05)
        raise SystemExit(f"{url} did not load")

    def wait_ready(self) -> None:
        self.evaluate(f"""new Promise((resolve, reject) => {{
            const deadline = performance.now() + 120000;
            const poll = () => {{
                if ({READY}) resolve(true);
                else if (performance.now() > deadline) reject(new Error("not ready in 120 s"));
                else setTimeout(poll, 20);
            }};
            poll();
        }})""")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._exit.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


class PlaywrightPage:
    """The same through Playwright (its DevTools ``Network`` domain instruments the page)."""

    def __init__(self, profile: str, playwright: Any) -> None:
        self.context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        self.version = self.context.browser.version if self.context.browser else "?"
        self.page = self.context.new_page()

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def goto(self, url: str) -> None:
        self.page.goto(url)

    def wait_ready(self) -> None:
        self.page.wait_for_function(READY, timeout=120_000)

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def browser(driver: str) -> Iterator[CdpPage | PlaywrightPage]:
    with tempfile.TemporaryDirectory(prefix="grpcbridge-bench-chromium-") as profile:
        if driver == "cdp":
            page: CdpPage | PlaywrightPage = CdpPage(profile)
            try:
                yield page
            finally:
                page.close()
            return
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            page = PlaywrightPage(profile, playwright)
            try:
                yield page
            finally:
                page.close()


def _load(page: CdpPage | PlaywrightPage, url: str) -> dict[str, float]:
    page.goto(url)
    page.wait_ready()
    error = page.evaluate("window.grpcbridgeDemo.error")
    if error:
        raise SystemExit(f"the page failed: {error}")
    return {key: float(value) for key, value in
            page.evaluate("window.grpcbridgeDemo.timings").items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="sequential unary calls")
    parser.add_argument("--todo-kib", type=int, default=256, help="size of each bulk todo")
    parser.add_argument("--todos", type=int, default=32, help="bulk todos uploaded")
    parser.add_argument("--repeat", type=int, default=4, help="StreamTodos repeat")
    parser.add_argument("--url", help="use this running demo server (its todos should be in "
                                      "memory and few) instead of starting one")
    parser.add_argument("--driver", choices=("cdp", "playwright"), default="cdp",
                        help="how Chromium is driven (see the module docstring)")
    args = parser.parse_args()
    reason = chromium_missing(playwright=args.driver == "playwright")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        build_browser_bundle()
    except AssertionError as failed:
        print(failed, file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    server = Server(args.url)
    try:
        with browser(args.driver) as page:
            chromium_version = page.version
            cold = _load(page, server.url)
            warm = _load(page, server.url)
            _load(page, server.url + "?app=none")
            code = PAGE_CODE.format(calls=args.calls, todo_bytes=args.todo_kib * 1024,
                                    todos=args.todos, repeat=args.repeat)
            started = time.monotonic()
            raw = page.evaluate("code => grpcbridgeDemo.pyodide.runPythonAsync(code)", code)
            rpc = json.loads(raw)
            rpc_wall = time.monotonic() - started
            pyodide_version = page.evaluate("grpcbridgeDemo.pyodide.version")
    finally:
        server.close()
    load_after = os.getloadavg()

    bulk = min(rpc["upload"]["mib_s"], rpc["download"]["mib_s"])
    figures = {
        "unary_p50_ms": rpc["unary_list"]["p50_ms"],
        "bulk_mib_s": bulk,
        "page_ready_warm_s": warm["ready"] / 1000,
    }
    verdict = {key: (figures[key] <= target if key != "bulk_mib_s" else figures[key] >= target)
               for key, target in TARGETS.items()}
    machine = {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "chromium": chromium_version,
        "pyodide": pyodide_version, "loadavg_before": load_before, "loadavg_after": load_after,
        "driver": args.driver,
    }
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = HERE / "results" / f"browser-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "cold": cold,
                               "warm": warm, "rpc": rpc, "rpc_wall_s": rpc_wall,
                               "figures": figures, "targets": TARGETS, "pass": verdict},
                              indent=2) + "\n")

    def mark(key: str) -> str:
        return "pass" if verdict[key] else "MISS"

    ul, uc = rpc["unary_list"], rpc["unary_create"]
    up, down = rpc["upload"], rpc["download"]
    print(f"# Browser benchmark ({stamp}; {chromium_version}, Pyodide {pyodide_version}, "
          f"driver {args.driver}, {os.cpu_count()} CPUs, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f})\n")
    print("| metric | figure | target | |")
    print("|---|---|---|---|")
    print(f"| unary p50, ListTodos ({ul['calls']} sequential) | {ul['p50_ms']:.2f} ms "
          f"(p90 {ul['p90_ms']:.2f}, p99 {ul['p99_ms']:.2f}) | <= 3 ms | "
          f"{mark('unary_p50_ms')} |")
    print(f"| unary p50, CreateTodo ({uc['calls']} sequential) | {uc['p50_ms']:.2f} ms "
          f"(p90 {uc['p90_ms']:.2f}, p99 {uc['p99_ms']:.2f}) | | |")
    print(f"| bulk upload, BulkCreateTodos {args.todos} x {args.todo_kib} KiB | "
          f"{up['mib_s']:.1f} MiB/s ({up['payload_bytes'] / 2**20:.0f} MiB in "
          f"{up['seconds']:.2f} s) | >= 40 MiB/s | {'pass' if up['mib_s'] >= 40 else 'MISS'} |")
    print(f"| bulk download, StreamTodos x{args.repeat} | {down['mib_s']:.1f} MiB/s "
          f"({down['payload_bytes'] / 2**20:.0f} MiB in {down['seconds']:.2f} s) | "
          f">= 40 MiB/s | {'pass' if down['mib_s'] >= 40 else 'MISS'} |")
    print(f"| page ready, warm (2nd load) | {warm['ready'] / 1000:.2f} s | <= 6 s | "
          f"{mark('page_ready_warm_s')} |")
    print(f"| page ready, cold (1st load, info) | {cold['ready'] / 1000:.2f} s | | |")
    steps = ("config", "runtime", "boot", "wheels", "import", "connect")
    print(f"\nWebSocket messages: unary {ul['ws_messages_per_call'][0]:.1f} sent / "
          f"{ul['ws_messages_per_call'][1]:.1f} received per call; upload "
          f"{up['ws_messages']} sent ({up['pauses']} pauses); download "
          f"{down['ws_messages']} received; max_frame_size {rpc['max_frame_size']}")
    print("warm load steps (ms): " + ", ".join(f"{s} {warm.get(s, 0):.0f}" for s in steps))
    print("cold load steps (ms): " + ", ".join(f"{s} {cold.get(s, 0):.0f}" for s in steps))
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
