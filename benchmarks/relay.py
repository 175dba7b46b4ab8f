"""Relay benchmark: the same grpcio client and server over three paths, side by side.

    A  client -> server                                                   (direct TCP)
    B  client -> grpcbridge forward -> grpcbridge serve -> server          (this project)
    C  client -> grpcbridge forward -> websockify -> server                (reference relay)
    D  client -> tcp_relay.py -> tcp_relay.py -> server      (diagnostic: 2 plain asyncio hops)
    E  as B, with bridge and forwarder on uvloop (--loop uvloop)   (--paths ABCDE)
    W  as B, with the bridge as `grpcbridge serve --workers 2`           (--paths BW)

Every party is its own process (client, forwarder, bridge/websockify, server), so nothing
shares a GIL. The server is benchmarks/echo_server.py (grpc.aio, raw-bytes echo defined with
generic handlers: no protobuf in the figures). Metrics:

* sequential unary echo latency (sync grpcio client, 16-byte payload): p50 / p99;
* 200-way concurrent unary echo rate (grpc.aio, one channel, fixed duration);
* bidi streaming echo throughput with 64 KiB messages (grpc.aio, fixed duration);
* with ``--channels K`` both spread over K channels, each its own connection and so its own
  tunnel (the concurrent calls round-robin, one stream per channel): what ``--workers``
  needs to spread the load over its processes (one tunnel is served by one worker);
* relay CPU time (utime + stime of each relay process tree, from psutil) per unit of work;
* bridge RSS per idle tunnel with thousands of tunnels open, each with a live HTTP/2
  connection to the backend (fresh bridge process; load from a separate process).

Configurations are interleaved (one round = every metric for A, B, C, in rotating order)
and the report uses medians over rounds; ratios are computed per round (side by side) and
their median is reported, which keeps them meaningful on a busy machine.

Usage: .venv/bin/python benchmarks/relay.py [--quick] [--rounds N] [--paths ABCDE]
                                            [--modes seq,conc,stream] [--skip-rss]
                                            [--tunnels N] [--profile] [--channels K]
Prints a markdown report and writes benchmarks/results/relay-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BIN = Path(PY).parent
MiB = 1024 * 1024
KiB = 1024

RELAY_FLAGS = ["--max-upgrades-per-minute", "0", "--max-connections-per-client", "0",
               "--log-level", "warning"]

#: Which processes are "the relay" on each path (names of watched processes).
PATH_RELAYS = {"A": [], "B": ["bridge", "forwarder_b"], "C": ["websockify", "forwarder_c"],
               "D": ["tcp_relay_1", "tcp_relay_2"], "E": ["bridge_uv", "forwarder_e"],
               "O": ["bridge_o", "forwarder_o"], "W": ["bridge_w", "forwarder_w"]}
PATH_NAMES = {"A": "direct", "B": "grpcbridge", "C": "websockify", "D": "2 plain TCP relays",
              "E": "grpcbridge, both relays on uvloop", "O": "grpcbridge at --baseline",
              "W": "grpcbridge, serve --workers 2"}

TARGETS = [
    # (key, description, kind, threshold)
    ("stream_vs_direct", "streaming throughput B/A", ">=", 0.9),
    ("conc_vs_direct", "200-way concurrent unary rate B/A", ">=", 0.8),
    ("seq_p50_vs_direct", "sequential unary p50 B/A", "<=", 1.25),
    ("stream_vs_websockify", "streaming throughput B/C", ">=", 1.4),
    ("seq_p50_vs_websockify", "sequential unary p50 B/C", "<=", 0.75),
    ("rss_per_tunnel_kib", "bridge RSS per idle tunnel (KiB)", "<=", 16.0),
]


@dataclass
class Settings:
    rounds: int
    seq_calls: int
    seq_warmup: int
    unary_size: int
    concurrency: int
    conc_duration: float
    conc_warmup: float
    stream_size: int
    stream_duration: float
    stream_warmup: float
    tunnel_checkpoints: list[int]
    tunnel_batch: int
    #: Channels (connections, hence tunnels) the conc and stream loads are spread over.
    channels: int = 1


FULL = Settings(rounds=5, seq_calls=2000, seq_warmup=200, unary_size=16, concurrency=200,
                conc_duration=4.0, conc_warmup=1.0, stream_size=64 * KiB,
                stream_duration=4.0, stream_warmup=1.0,
                tunnel_checkpoints=[20, 1020, 2020, 3020, 4020, 5020], tunnel_batch=100)
QUICK = Settings(rounds=2, seq_calls=300, seq_warmup=50, unary_size=16, concurrency=200,
                 conc_duration=1.0, conc_warmup=0.3, stream_size=64 * KiB,
                 stream_duration=1.0, stream_warmup=0.3,
                 tunnel_checkpoints=[20, 520], tunnel_batch=100)


# ------------------------------------------------------------------ processes


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    log: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def read_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no output within {timeout:.0f} s; log:\n"
                               f"{self.log_text()}") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited (rc={self.popen.poll()}); log:\n"
                               f"{self.log_text()}")
        return line

    def read_json(self, timeout: float) -> dict[str, Any]:
        while True:
            line = self.read_line(timeout).strip()
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()


class Processes:
    """Every subprocess of the run; each in its own session (process group), all killed at
    the end: SIGTERM to the group, then SIGKILL to whatever is left."""

    def __init__(self, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.logdir = logdir
        self.env = env or {}
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, stdin: bool = False) -> Proc:
        log = self.logdir / f"{name}-{len(self.procs)}.log"
        handle = open(log, "w")  # noqa: SIM115 (lives as long as the process)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        popen = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=handle, text=True,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, cwd=ROOT, env=env,
            start_new_session=True)  # limits: raised in this process, inherited
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
        return proc

    @staticmethod
    def _pump(proc: Proc) -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            proc.lines.put(line)
        proc.lines.put(None)

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout)
        # The group may hold children (websockify forks one per connection).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc.popen.stdin is not None:
            with contextlib.suppress(OSError):
                proc.popen.stdin.close()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def listening_port(proc: Proc, timeout: float = 20.0,
                   pattern: str | None = None) -> int:
    """The TCP port ``proc`` (or a child) listens on: from its log line when it prints one
    (``pattern``), else from its LISTEN socket (``--log-level warning`` hides the
    ``*_started`` info events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited (rc={proc.popen.returncode}):\n"
                               f"{proc.log_text()}")
        if pattern is not None:
            match = re.search(pattern, proc.log_text(100_000))
            if match:
                return int(match.group(1))
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(proc.pid).net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    return int(conn.laddr.port)
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen within {timeout} s:\n{proc.log_text()}")


# ------------------------------------------------------------------ CPU accounting

def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree: every live member's own time plus the
    time of the members it has reaped (``children_*``), so a child that exits between two
    samples is still counted exactly once (websockify forks one per connection)."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan"), float("nan")
    user = system = 0.0
    for member in members:
        with contextlib.suppress(psutil.Error):
            t = member.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
    return user, system


# ------------------------------------------------------------------ measurement


@dataclass
class Rig:
    procs: Processes
    watched: dict[str, Proc]  # name -> long-lived process whose CPU is sampled
    targets: dict[str, str]  # path -> host:port the client dials
    settings: Settings


def run_worker(rig: Rig, mode: str, path: str) -> dict[str, Any]:
    s = rig.settings
    argv = [PY, str(HERE / "bench_client.py"), mode, "--target", rig.targets[path]]
    if mode == "seq":
        argv += ["--calls", str(s.seq_calls), "--warmup-calls", str(s.seq_warmup),
                 "--size", str(s.unary_size)]
        budget = 120.0
    elif mode == "conc":
        argv += ["--concurrency", str(s.concurrency), "--duration", str(s.conc_duration),
                 "--warmup", str(s.conc_warmup), "--size", str(s.unary_size),
                 "--channels", str(s.channels)]
        budget = s.conc_duration + 120
    else:
        argv += ["--duration", str(s.stream_duration), "--warmup", str(s.stream_warmup),
                 "--size", str(s.stream_size), "--channels", str(s.channels)]
        budget = s.stream_duration + 120
    worker = rig.procs.start(f"client-{mode}-{path}", argv, stdin=True)
    try:
        worker.read_json(90)  # ready: connected and warmed up
        time.sleep(0.2)  # let relays settle (websockify forks a child per connection)
        before = {name: cpu_times(p.pid) for name, p in rig.watched.items()}
        worker.send("go")
        result = worker.read_json(budget)["result"]
        after = {name: cpu_times(p.pid) for name, p in rig.watched.items()}
        worker.send("bye")  # now the worker closes its channel and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.popen.wait(15)
    finally:
        rig.procs.stop(worker)
    result["cpu_s"] = {name: sum(after[name]) - sum(before[name]) for name in rig.watched}
    result["cpu_sys_s"] = {name: after[name][1] - before[name][1] for name in rig.watched}
    return result  # type: ignore[no-any-return]


def per_unit(result: dict[str, Any], mode: str, path: str,
             key: str = "cpu_s") -> dict[str, float]:
    """CPU per unit of work: µs per call (seq, conc), ms per MiB relayed (stream; payload
    bytes, both directions summed) for the path's relays, the server and the client."""
    cpu_s = dict(result[key])
    if key == "cpu_s":
        cpu_s["client"] = result["client_cpu_s"]
    out: dict[str, float] = {}
    for name in [*PATH_RELAYS[path], "server", "client"]:
        if name not in cpu_s:
            continue
        cpu = cpu_s[name]
        if mode == "stream":
            mib = (result["bytes_sent"] + result["bytes_received"]) / MiB
            out[name] = cpu * 1000 / mib if mib else float("nan")
        else:
            out[name] = cpu * 1e6 / result["calls"] if result["calls"] else float("nan")
    return out


def measure_rounds(rig: Rig, paths: str, modes: Sequence[str],
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for r in range(rig.settings.rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]  # rotate: ABCD, BCDA, ...
        entry: dict[str, Any] = {"round": r + 1, "order": order}
        for mode in modes:
            entry[mode] = {}
            for path in order:
                result = run_worker(rig, mode, path)
                result["relay_cpu_per_unit"] = per_unit(result, mode, path)
                result["relay_sys_per_unit"] = per_unit(result, mode, path, "cpu_sys_s")
                entry[mode][path] = result
                log(f"round {r + 1} {mode:6} {path}: {_brief(mode, result)}")
        rounds.append(entry)
    return rounds


def _brief(mode: str, result: dict[str, Any]) -> str:
    if mode == "seq":
        text = f"p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs"
    elif mode == "conc":
        text = f"{result['rate']:.0f} calls/s ({result['errors']} errors)"
    else:
        text = f"{result['mib_per_s']:.1f} MiB/s"
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_s"].items() if v >= 0.005)
    return f"{text}  [cpu s: {cpu}]"


def measure_rss(procs: Processes, backend_port: int, settings: Settings,
                log: Callable[[str], None], server: Proc) -> dict[str, Any]:
    """Fresh bridge; open tunnels from a separate process; RSS at every checkpoint."""
    bridge = procs.start("bridge-rss", relay_argv(None, "bridge-rss", [
        "serve", "--backend", f"127.0.0.1:{backend_port}",
        "--listen", "127.0.0.1:0", "--path", "/grpc", *RELAY_FLAGS]))
    port = listening_port(bridge, pattern=r"bridge_started listen=ws://[^:]+:(\d+)")
    checkpoints = settings.tunnel_checkpoints
    load = procs.start("tunnels", [
        PY, str(HERE / "bench_client.py"), "tunnels", "--target",
        f"ws://127.0.0.1:{port}/grpc", "--checkpoints", ",".join(map(str, checkpoints)),
        "--batch", str(settings.tunnel_batch)], stdin=True)
    samples: list[dict[str, Any]] = []
    try:
        load.read_json(60)
        bridge_ps, server_ps = psutil.Process(bridge.pid), psutil.Process(server.pid)
        samples.append({"open": 0, "bridge_rss": bridge_ps.memory_info().rss,
                        "bridge_fds": bridge_ps.num_fds(), "server_fds": server_ps.num_fds()})
        load.send("go")
        for _ in checkpoints:
            status = load.read_json(600)
            time.sleep(1.0)
            sample = {
                "open": status["open"], "alive": status["alive"],
                "failures": status["failures"], "elapsed_s": status["elapsed_s"],
                "bridge_rss": bridge_ps.memory_info().rss,
                "bridge_uss": bridge_ps.memory_full_info().uss,
                "bridge_fds": bridge_ps.num_fds(), "server_fds": server_ps.num_fds(),
            }
            samples.append(sample)
            log(f"tunnels {sample['open']:5}: bridge RSS {sample['bridge_rss'] / MiB:.1f} MiB,"
                f" fds {sample['bridge_fds']}, server fds {sample['server_fds']}")
            load.send("next")
        load.read_json(120)
    finally:
        procs.stop(load)
        procs.stop(bridge)
    first, last = samples[1], samples[-1]
    tunnels = last["open"] - first["open"]
    per_tunnel = (last["bridge_rss"] - first["bridge_rss"]) / tunnels if tunnels else 0.0
    per_tunnel_uss = (last["bridge_uss"] - first["bridge_uss"]) / tunnels if tunnels else 0.0
    fds_per_tunnel = (last["bridge_fds"] - first["bridge_fds"]) / tunnels if tunnels else 0.0
    return {
        "samples": samples,
        "tunnels_measured": tunnels,
        "rss_per_tunnel_bytes": per_tunnel,
        "uss_per_tunnel_bytes": per_tunnel_uss,
        "bridge_fds_per_tunnel": fds_per_tunnel,
        "server_fds_added": last["server_fds"] - first["server_fds"],
    }


# ------------------------------------------------------------------ summary


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


#: Reported metrics: (mode, result field, label template, digits)
METRICS = [
    ("seq", "p50_us", "sequential unary p50 (µs, {unary_size} B)", 0),
    ("seq", "p99_us", "sequential unary p99 (µs)", 0),
    ("conc", "rate", "{concurrency}-way concurrent unary{over} (calls/s)", 0),
    ("stream", "mib_per_s", "bidi stream echo, {stream_kib} KiB msgs{over} (MiB/s each way)", 1),
]
RATIO_PAIRS = [("B", "A"), ("B", "C"), ("C", "A"), ("D", "A"), ("B", "D"), ("E", "A"),
               ("E", "B"), ("B", "O"), ("W", "B")]
#: Target key -> (metric, field, numerator path, denominator path)
TARGET_SOURCES = {
    "stream_vs_direct": ("stream", "mib_per_s", "B", "A"),
    "conc_vs_direct": ("conc", "rate", "B", "A"),
    "seq_p50_vs_direct": ("seq", "p50_us", "B", "A"),
    "stream_vs_websockify": ("stream", "mib_per_s", "B", "C"),
    "seq_p50_vs_websockify": ("seq", "p50_us", "B", "C"),
}


def summarize(rounds: list[dict[str, Any]], paths: str,
              rss: dict[str, Any] | None) -> dict[str, Any]:
    def ratio(mode: str, key: str, num: str, den: str) -> float | None:
        if num not in paths or den not in paths or not rounds or mode not in rounds[0]:
            return None
        return _median([r[mode][num][key] / r[mode][den][key] for r in rounds])

    medians: dict[str, dict[str, float]] = {}
    for path in paths:
        medians[path] = {
            f"{mode}_{key}": _median([r[mode][path][key] for r in rounds if mode in r])
            for mode, key, _label, _digits in METRICS
        }
    ratios: dict[str, dict[str, float | None]] = {
        f"{mode}_{key}": {f"{n}/{d}": ratio(mode, key, n, d) for n, d in RATIO_PAIRS}
        for mode, key, _label, _digits in METRICS
    }
    cpu: dict[str, dict[str, float]] = {}
    for path in paths:
        for name in [*PATH_RELAYS[path], "server", "client"]:
            key = f"{path}:{name}"
            cpu[key] = {}
            for mode in ("seq", "conc", "stream"):
                total = [r[mode][path]["relay_cpu_per_unit"][name]
                         for r in rounds if mode in r]
                system = [r[mode][path]["relay_sys_per_unit"][name]
                          for r in rounds if mode in r and name != "client"]
                cpu[key][mode] = _median(total)
                cpu[key][f"{mode}_sys_share"] = _median(
                    [s / t for s, t in zip(system, total, strict=False) if t])
    measured: dict[str, float | None] = {
        key: ratio(*source) for key, source in TARGET_SOURCES.items()}
    measured["rss_per_tunnel_kib"] = rss["rss_per_tunnel_bytes"] / KiB if rss else None
    verdicts = []
    for key, label, kind, threshold in TARGETS:
        value = measured.get(key)
        if value is None or value != value:
            verdicts.append({"key": key, "target": f"{label} {kind} {threshold}",
                             "measured": None, "pass": None, "margin": None})
            continue
        ok = value >= threshold if kind == ">=" else value <= threshold
        margin = value / threshold - 1  # >0 means above the threshold
        verdicts.append({"key": key, "target": f"{label} {kind} {threshold}",
                         "measured": value, "pass": ok, "margin": margin})
    return {"medians": medians, "ratios": ratios, "relay_cpu": cpu, "targets": verdicts}


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def markdown(summary: dict[str, Any], paths: str, rss: dict[str, Any] | None,
             settings: Settings) -> str:
    med = summary["medians"]
    pairs = [f"{n}/{d}" for n, d in RATIO_PAIRS if n in paths and d in paths]
    head = [PATH_NAMES[p] + f" ({p})" for p in paths]
    lines = ["| metric (median of rounds) | " + " | ".join(head + pairs) + " |",
             "|---|" + "---:|" * (len(paths) + len(pairs))]
    names = {"unary_size": settings.unary_size, "concurrency": settings.concurrency,
             "stream_kib": settings.stream_size // KiB,
             "over": f" over {settings.channels} tunnels" if settings.channels > 1 else ""}
    for mode, key, label, digits in METRICS:
        metric = f"{mode}_{key}"
        cells = [_fmt(med[p][metric], digits) for p in paths]
        cells += [_fmt(summary["ratios"][metric][pair]) for pair in pairs]
        lines.append(f"| {label.format(**names)} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are medians of per-round ratios (each round runs the paths back to"
              " back).", "",
              "CPU per unit of work (median of rounds; user+system of each process tree,"
              " kernel share in brackets):", "",
              "| process | µs / sequential call | µs / concurrent call |"
              " ms / MiB streamed (both directions) |", "|---|---:|---:|---:|"]

    def cell(values: dict[str, float], mode: str, digits: int) -> str:
        text = _fmt(values[mode], digits)
        share = values.get(f"{mode}_sys_share")
        if share is not None and share == share and text != "n/a":
            text += f" [{share * 100:.0f}%]"
        return text

    for key, values in summary["relay_cpu"].items():
        path, name = key.split(":")
        lines.append(f"| {name} (path {path}) | {cell(values, 'seq', 0)} | "
                     f"{cell(values, 'conc', 0)} | {cell(values, 'stream', 2)} |")
    if rss:
        lines += ["", f"Bridge memory with {rss['tunnels_measured']:,} more idle tunnels"
                  f" (each with a live HTTP/2 backend connection): RSS "
                  f"{rss['rss_per_tunnel_bytes'] / KiB:.1f} KiB/tunnel, USS "
                  f"{rss['uss_per_tunnel_bytes'] / KiB:.1f} KiB/tunnel, "
                  f"{rss['bridge_fds_per_tunnel']:.2f} bridge fds/tunnel, "
                  f"{rss['server_fds_added']:,} backend fds added."]
    lines += ["", "| target | measured | result | margin |", "|---|---:|---|---:|"]
    for verdict in summary["targets"]:
        if verdict["measured"] is None:
            lines.append(f"| {verdict['target']} | n/a | not measured | |")
            continue
        lines.append(f"| {verdict['target']} | {verdict['measured']:.2f} | "
                     f"{'pass' if verdict['pass'] else 'MISS'} | "
                     f"{verdict['margin'] * 100:+.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("grpcio", "websockets", "websockify", "grpcbridge", "psutil", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
        "kernel": platform.release(), "loadavg_start": os.getloadavg(), "versions": versions,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }


# ------------------------------------------------------------------ main


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def relay_argv(profile_dir: Path | None, name: str, args: list[str]) -> list[str]:
    """``grpcbridge <args>`` (as ``python -m grpcbridge.cli``, so PYTHONPATH can point it at
    another source tree), optionally under cProfile."""
    if profile_dir is None:
        return [PY, "-m", "grpcbridge.cli", *args]
    return [PY, "-m", "cProfile", "-o", str(profile_dir / f"{name}.prof"),
            "-m", "grpcbridge.cli", *args]


def start_bridge_path(procs: Processes, names: Sequence[str], server_port: int,
                      bridge_flags: Sequence[str], profile_dir: Path | None,
                      both_flags: Sequence[str] = ()) -> tuple[Proc, Proc]:
    """A bridge (``grpcbridge serve`` plus ``bridge_flags``) to the echo server and a
    forwarder to it, named ``names`` (bridge, forwarder); ``both_flags`` go to both."""
    bridge_name, forwarder_name = names
    bridge = procs.start(bridge_name, relay_argv(profile_dir, bridge_name, [
        "serve", "--backend", f"127.0.0.1:{server_port}", *both_flags, *bridge_flags,
        "--listen", "127.0.0.1:0", "--path", "/grpc", *RELAY_FLAGS]))
    bridge_port = listening_port(bridge, pattern=r"bridge_started listen=ws://[^:]+:(\d+)")
    forwarder = procs.start(forwarder_name, relay_argv(profile_dir, forwarder_name, [
        "forward", "--target", f"ws://127.0.0.1:{bridge_port}/grpc", *both_flags,
        "--listen", "127.0.0.1:0", *RELAY_FLAGS[-2:]]))
    return bridge, forwarder


def source_tree(commit: str | None, workdir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Environment for the relay processes and a description of the code they run: the
    working tree (default), or ``git archive <commit>`` unpacked under ``workdir``."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["head"] = git("rev-parse", "HEAD")
        info["src_dirty"] = bool(git("status", "--porcelain", "--", "src"))
    env: dict[str, str] = {}
    if commit is not None:
        info["commit"] = git("rev-parse", commit)
        target = workdir / "src-snapshot"
        target.mkdir()
        archive = subprocess.run(["git", "archive", info["commit"], "src/grpcbridge"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(target / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
        info["source"] = f"git archive {info['commit'][:12]}"
    else:
        info["source"] = "working tree" + (" (src/ has uncommitted changes)"
                                           if info.get("src_dirty") else "")
    check = subprocess.run([PY, "-c", "import grpcbridge.cli, grpcbridge.server.bridge, "
                            "grpcbridge.client.forwarder, grpcbridge; print(grpcbridge.__file__)"],
                           env=dict(os.environ, **env), capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError("grpcbridge does not import from the " + info["source"]
                           + " (someone editing src/?); try --commit HEAD:\n" + check.stderr)
    info["module_file"] = check.stdout.strip()
    if commit is None and not info["module_file"].startswith(str(ROOT / "src")):
        info["source"] = f"{Path(info['module_file']).parent.parent} (from PYTHONPATH)"
    return env, info


def log(text: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class RunSetup:
    stamp: str
    results_dir: Path
    #: Subprocess logs (removed after a successful run).
    logdir: Path
    #: Environment that makes subprocesses import the grpcbridge under test.
    env: dict[str, str]
    #: machine() plus "code": where grpcbridge comes from.
    info: dict[str, Any]


def begin_run(logdir_prefix: str, commit: str | None, info: dict[str, Any]) -> RunSetup:
    """What every benchmark driver does first: a timestamp, the results and log
    directories, the raised fd limit, and the grpcbridge tree to run (``commit`` or the
    working tree)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix=logdir_prefix))
    _raise_nofile()
    try:
        env, info["code"] = source_tree(commit, logdir)
    except BaseException:
        shutil.rmtree(logdir, ignore_errors=True)
        raise
    log(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
        f"kernel {info['kernel']}, load {info['loadavg_start']}")
    return RunSetup(stamp, results_dir, logdir, env, info)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--paths", default="ABCD",
                        help="subset of ABCDEOW (default: ABCD; D = two plain TCP relays, "
                        "E = B with the bridge on uvloop, which must be importable, "
                        "O = B from --baseline REV, W = B with serve --workers 2)")
    parser.add_argument("--channels", type=int, default=1,
                        help="spread the conc and stream loads over this many channels, "
                             "each its own tunnel (default: 1)")
    parser.add_argument("--modes", default="seq,conc,stream",
                        help="comma-separated subset of seq,conc,stream")
    parser.add_argument("--skip-rss", action="store_true", help="skip the idle-tunnel test")
    parser.add_argument("--tunnels", type=int, help="idle tunnels for the RSS test")
    parser.add_argument("--profile", action="store_true",
                        help="run bridge and forwarders under cProfile (CPU figures inflate)")
    parser.add_argument("--commit", metavar="REV",
                        help="run the relays from `git archive REV` instead of the working tree")
    parser.add_argument("--baseline", metavar="REV",
                        help="path O: path B with both relays from `git archive REV`, "
                             "measured in the same rounds (before/after a change)")
    parser.add_argument("--tcp-relay-mode", choices=["protocol", "buffered", "uvloop"],
                        default="protocol", help="implementation of path D's relays")
    parser.add_argument("--output", type=Path, help="JSON path (default: results/...)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings.rounds = args.rounds
    settings.channels = args.channels
    if args.tunnels:
        settings.tunnel_checkpoints = [20, *range(20 + 1000, 20 + args.tunnels, 1000),
                                       20 + args.tunnels]
    paths = "".join(p for p in "ABCDEOW" if p in args.paths.upper())
    modes = [m for m in ("seq", "conc", "stream") if m in args.modes.split(",")]
    run = begin_run("grpcbridge-bench-", args.commit, machine())
    stamp, results_dir, logdir, relay_env, info = (run.stamp, run.results_dir, run.logdir,
                                                   run.env, run.info)
    output = args.output or results_dir / f"relay-{stamp}.json"
    profile_dir = results_dir / f"profile-{stamp}" if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir()
    log(f"relays run {info['code']['source']} ({info['code']['module_file']})")
    procs = Processes(logdir, relay_env)
    ok = False
    started = time.monotonic()
    try:
        with _terminate_on_signals():
            server = procs.start("server", [PY, str(HERE / "echo_server.py"),
                                            "--listen", "127.0.0.1:0"])
            match = re.search(r"listening on .*:(\d+)", server.read_line(30))
            if not match:
                raise RuntimeError("echo server did not print its port")
            server_port = int(match.group(1))
            watched: dict[str, Proc] = {"server": server}
            targets = {"A": f"127.0.0.1:{server_port}"}
            for path, flags in (("B", []), ("W", ["--workers", "2"])):
                if path in paths:
                    bridge, forwarder = start_bridge_path(
                        procs, PATH_RELAYS[path], server_port, flags, profile_dir)
                    targets[path] = f"127.0.0.1:{listening_port(forwarder)}"
                    watched |= {bridge.name: bridge, forwarder.name: forwarder}
            if "C" in paths:
                # Plain relay: no --web, no heartbeat, no token/auth plugins, no TLS. It
                # forks one process per connection (its default server engine).
                websockify = procs.start("websockify", [
                    str(BIN / "websockify"), "127.0.0.1:0", f"127.0.0.1:{server_port}"])
                ws_port = listening_port(websockify)
                forwarder_c = procs.start("forwarder_c", relay_argv(profile_dir, "forwarder_c", [
                    "forward", "--target", f"ws://127.0.0.1:{ws_port}/",
                    "--listen", "127.0.0.1:0", *RELAY_FLAGS[-2:]]))
                targets["C"] = f"127.0.0.1:{listening_port(forwarder_c)}"
                watched |= {"websockify": websockify, "forwarder_c": forwarder_c}
            if "D" in paths:
                # Diagnostic floor: two plain asyncio pass-through hops, no WebSocket.
                mode = ["--mode", args.tcp_relay_mode]
                relay_2 = procs.start("tcp_relay_2", [
                    PY, str(HERE / "tcp_relay.py"), *mode,
                    "--target", f"127.0.0.1:{server_port}"])
                relay_1 = procs.start("tcp_relay_1", [
                    PY, str(HERE / "tcp_relay.py"), *mode,
                    "--target", f"127.0.0.1:{listening_port(relay_2)}"])
                targets["D"] = f"127.0.0.1:{listening_port(relay_1)}"
                watched |= {"tcp_relay_1": relay_1, "tcp_relay_2": relay_2}
            if "O" in paths:
                if not args.baseline:
                    raise SystemExit("path O needs --baseline REV")
                (logdir / "baseline").mkdir()
                base_env, info["baseline"] = source_tree(args.baseline, logdir / "baseline")
                base = Processes(logdir, {**relay_env, **base_env})
                bridge_o = base.start("bridge_o", relay_argv(None, "bridge_o", [
                    "serve", "--backend", f"127.0.0.1:{server_port}",
                    "--listen", "127.0.0.1:0", "--path", "/grpc", *RELAY_FLAGS]))
                forwarder_o = base.start("forwarder_o", relay_argv(None, "forwarder_o", [
                    "forward", "--target", f"ws://127.0.0.1:{listening_port(bridge_o)}/grpc",
                    "--listen", "127.0.0.1:0", *RELAY_FLAGS[-2:]]))
                procs.procs.extend(base.procs)  # stopped and killed with the others
                targets["O"] = f"127.0.0.1:{listening_port(forwarder_o)}"
                watched |= {"bridge_o": bridge_o, "forwarder_o": forwarder_o}
            if "E" in paths:
                # B with both relays on uvloop (`--loop uvloop`, the `speed` extra).
                bridge_uv, forwarder_e = start_bridge_path(
                    procs, PATH_RELAYS["E"], server_port, [], None, ["--loop", "uvloop"])
                targets["E"] = f"127.0.0.1:{listening_port(forwarder_e)}"
                watched |= {"bridge_uv": bridge_uv, "forwarder_e": forwarder_e}
            log(f"targets: {targets}; logs in {logdir}")
            rig = Rig(procs, watched, targets, settings)
            rounds = measure_rounds(rig, paths, modes, log)
            rss = None
            if not args.skip_rss:
                rss = measure_rss(procs, server_port, settings, log, server)
            for proc in list(watched.values()):
                if proc.name != "server":
                    procs.stop(proc)  # SIGTERM first: cProfile writes its file on exit
            summary = summarize(rounds, paths, rss)
            report = markdown(summary, paths, rss, settings)
            info["loadavg_end"] = os.getloadavg()
            document = {
                "timestamp": stamp, "command": " ".join([Path(PY).name, *sys.argv]),
                "quick": args.quick, "profile": args.profile, "machine": info,
                "tcp_relay_mode": args.tcp_relay_mode,
                "settings": settings.__dict__, "paths": paths,
                "duration_s": time.monotonic() - started,
                "summary": summary, "rss": rss, "rounds": rounds,
            }
            output.write_text(json.dumps(document, indent=2) + "\n")
            print(report)
            print(f"\nJSON: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}"
                  f"  (load average {info['loadavg_start'][0]:.2f} -> "
                  f"{info['loadavg_end'][0]:.2f}; {document['duration_s']:.0f} s)")
            if profile_dir is not None:
                print(f"profiles: {profile_dir}")
            ok = True
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            log(f"failed; subprocess logs kept in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
