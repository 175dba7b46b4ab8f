"""Native Python benchmark: grpclib over WebSocket against grpclib over TCP, side by side.

    LT  grpclib Channel  --TCP-->                        grpclib server     (reference 1)
    LW  grpcbridge.Channel --WebSocket--> Bridge + GrpclibBackend, the same handler
                                                          in the same server process
    GT  grpclib Channel  --TCP-->                        grpcio server      (reference 2)
    GW  grpcbridge.Channel --WebSocket--> attach_grpcio(threaded=False) bridge on the
                                          server's loop --unix--> the same grpcio server
    GU  as GW, with attach_grpcio() (default threaded=True): the bridge on its own thread
                                          and loop (uvloop when installed), same process

Two server processes (benchmarks/native_server.py): the grpclib one listens on TCP and on
a bridge port at once, the grpcio one (grpc.aio; ``--grpcio sync`` for ``grpc.server``)
on TCP and on its attached bridge. The client is always grpclib with the raw-bytes codec of
benchmarks/native_echo.py (benchmarks/native_client.py), a fresh process per measurement,
so client and server never share a GIL. Metrics:

* sequential unary echo (16 bytes): p50 / p99 of the per-call times;
* bidi streaming echo of 64 KiB messages for a fixed duration: MiB/s each way;
* CPU time (utime + stime, psutil) of the server process per call and per MiB (both
  directions added up), sampled around the measured part with the connection open; the
  client process's CPU the same way (its own ``process_time``).

One round measures every mode on every path, back to back, in rotating order; figures are
medians over rounds and each ratio is the median of the per-round ratios (WS/TCP against
the same server), which keeps them meaningful on a busy machine.

Diagnostic path (``--paths LT,LW,GT,GW,GS``): GS reaches the same grpcio server through a
separate ``grpcbridge serve`` process (its CPU is added to the server side), which shows
what the attached bridge costs when it does not share the server's process, GIL and loop.

Usage: .venv/bin/python benchmarks/native.py [--quick] [--rounds N] [--paths LT,LW,GT,GW,GU]
                                             [--modes seq,stream] [--grpcio aio|sync]
                                             [--commit REV]
       .venv/bin/python benchmarks/native.py --profile seq|stream [--paths ...]
Prints a markdown report and writes benchmarks/results/native-<timestamp>.json; with
``--profile``, py-spy samples the server and the client of each path during one longer
measurement instead, and the collapsed stacks go to benchmarks/results/native-profile-*/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import (
    BIN,
    HERE,
    PY,
    RELAY_FLAGS,
    ROOT,
    KiB,
    MiB,
    Proc,
    Processes,
    _fmt,
    _median,
    _terminate_on_signals,
    begin_run,
    cpu_times,
    listening_port,
    log,
)
from relay import machine as relay_machine

#: path -> (server process, endpoint, description). GS is a diagnostic (not run unless
#: asked for): the grpcio server reached through a separate ``grpcbridge serve`` process,
#: i.e. the attached bridge's work without sharing the server's process, GIL and loop.
PATHS: dict[str, tuple[str, str, str]] = {
    "LT": ("grpclib", "tcp", "grpclib server, TCP"),
    "LW": ("grpclib", "ws", "grpclib server, WebSocket (GrpclibBackend)"),
    "GT": ("grpcio", "tcp", "grpcio server, TCP"),
    "GW": ("grpcio", "ws", "grpcio server, WebSocket (attach_grpcio)"),
    "GU": ("grpcio", "ws_thread", "grpcio server, WebSocket (attach_grpcio, bridge thread)"),
    "GS": ("grpcio", "serve", "grpcio server, WebSocket via a separate `grpcbridge serve`"),
}
DEFAULT_PATHS = "LT,LW,GT,GW,GU"
#: Processes whose CPU counts as "server side" on each path.
SERVER_SIDE = {"LT": ["grpclib"], "LW": ["grpclib"], "GT": ["grpcio"], "GW": ["grpcio"],
               "GU": ["grpcio"], "GS": ["grpcio", "bridge"]}
RATIO_PAIRS = [("LW", "LT"), ("GW", "GT"), ("GU", "GT"), ("GU", "GW"), ("GT", "LT"),
               ("GW", "LW"), ("GS", "GT"), ("GW", "GS")]

#: (key, description, kind, threshold, (mode, field, numerator, denominator))
TARGETS: list[tuple[str, str, str, float, tuple[str, str, str, str]]] = [
    ("grpclib_seq_p50", "grpclib server: sequential p50 WS/TCP", "<=", 1.15,
     ("seq", "p50_us", "LW", "LT")),
    ("grpclib_stream", "grpclib server: streaming WS/TCP", ">=", 0.9,
     ("stream", "mib_per_s", "LW", "LT")),
    ("grpcio_seq_p50", "attached grpcio server: sequential p50 WS/TCP", "<=", 1.2,
     ("seq", "p50_us", "GW", "GT")),
    ("grpcio_stream", "attached grpcio server: streaming WS/TCP", ">=", round(1 / 1.2, 3),
     ("stream", "mib_per_s", "GW", "GT")),
    ("grpcio_thread_seq_p50", "attached grpcio, bridge thread: sequential p50 WS/TCP", "<=",
     1.2, ("seq", "p50_us", "GU", "GT")),
    ("grpcio_thread_stream", "attached grpcio, bridge thread: streaming WS/TCP", ">=",
     round(1 / 1.2, 3), ("stream", "mib_per_s", "GU", "GT")),
]

#: Reported metrics: (mode, result field, label, digits)
METRICS = [
    ("seq", "p50_us", "sequential unary p50 (µs, {unary_size} B)", 0),
    ("seq", "p99_us", "sequential unary p99 (µs)", 0),
    ("stream", "mib_per_s", "bidi stream echo, {stream_kib} KiB msgs (MiB/s each way)", 1),
]


@dataclass
class Settings:
    rounds: int
    seq_calls: int
    seq_warmup: int
    unary_size: int
    stream_size: int
    stream_duration: float
    stream_warmup: float


FULL = Settings(rounds=5, seq_calls=2000, seq_warmup=200, unary_size=16,
                stream_size=64 * KiB, stream_duration=4.0, stream_warmup=1.0)
QUICK = Settings(rounds=2, seq_calls=300, seq_warmup=50, unary_size=16,
                 stream_size=64 * KiB, stream_duration=1.0, stream_warmup=0.3)
PROFILE = Settings(rounds=1, seq_calls=6000, seq_warmup=200, unary_size=16,
                   stream_size=64 * KiB, stream_duration=8.0, stream_warmup=1.0)


# ------------------------------------------------------------------ processes


@dataclass
class Rig:
    procs: Processes
    servers: dict[str, Proc]  # "grpclib", "grpcio", "bridge" -> server process
    targets: dict[str, str]  # path -> what the client dials
    settings: Settings


def start_servers(procs: Processes, paths: Sequence[str], grpcio: str
                  ) -> tuple[dict[str, Proc], dict[str, str]]:
    servers: dict[str, Proc] = {}
    targets: dict[str, str] = {}
    for name in ("grpclib", "grpcio"):
        if not any(PATHS[p][0] == name for p in paths):
            continue
        argv = [PY, str(HERE / "native_server.py"), "--kind", name, "--grpcio", grpcio]
        server = procs.start(f"server-{name}", argv)
        endpoints = server.read_json(60)
        servers[name] = server
        if "GS" in paths and name == "grpcio":
            bridge = procs.start("bridge", [
                PY, "-m", "grpcbridge.cli", "serve", "--backend", endpoints["tcp"],
                "--listen", "127.0.0.1:0", "--path", "/grpc", *RELAY_FLAGS])
            servers["bridge"] = bridge
            endpoints["serve"] = f"ws://127.0.0.1:{listening_port(bridge)}/grpc"
        for path in paths:
            if PATHS[path][0] == name:
                targets[path] = endpoints[PATHS[path][1]]
    return servers, targets


def client_argv(rig: Rig, mode: str, path: str) -> tuple[list[str], float]:
    s = rig.settings
    argv = [PY, str(HERE / "native_client.py"), mode, "--target", rig.targets[path]]
    if mode == "seq":
        argv += ["--calls", str(s.seq_calls), "--warmup-calls", str(s.seq_warmup),
                 "--size", str(s.unary_size)]
        return argv, 120.0 + s.seq_calls * 0.01
    argv += ["--duration", str(s.stream_duration), "--warmup", str(s.stream_warmup),
             "--size", str(s.stream_size)]
    return argv, s.stream_duration + 120.0


def run_worker(rig: Rig, mode: str, path: str,
               around: Callable[[dict[str, Proc], Proc], Callable[[], None]] | None = None
               ) -> dict[str, Any]:
    """One measurement in a fresh client process. ``around(server_side, client)`` is
    called right before the measured part and returns what to call right after it."""
    side = {name: rig.servers[name] for name in SERVER_SIDE[path]}
    argv, budget = client_argv(rig, mode, path)
    worker = rig.procs.start(f"client-{mode}-{path}", argv, stdin=True)
    finish: Callable[[], None] | None = None
    try:
        worker.read_json(90)  # ready: connected and warmed up
        finish = around(side, worker) if around is not None else None
        time.sleep(0.1)
        load = os.getloadavg()[0]
        before = {name: cpu_times(proc.pid) for name, proc in side.items()}
        worker.send("go")
        result: dict[str, Any] = worker.read_json(budget)["result"]
        after = {name: cpu_times(proc.pid) for name, proc in side.items()}
        if finish is not None:
            stop_tools = finish
            finish = None
            stop_tools()
        worker.send("bye")  # now the worker closes its channel and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.popen.wait(15)
    finally:
        if finish is not None:
            finish()  # profilers, on errors too
        rig.procs.stop(worker)
    result["server_cpu_by_process_s"] = {
        name: sum(after[name]) - sum(before[name]) for name in side}
    result["server_cpu_s"] = sum(result["server_cpu_by_process_s"].values())
    result["server_sys_s"] = sum(after[name][1] - before[name][1] for name in side)
    result["loadavg_1m"] = load
    if mode == "stream":
        mib = (result["bytes_sent"] + result["bytes_received"]) / MiB
        result["server_ms_per_mib"] = result["server_cpu_s"] * 1000 / mib
        result["client_ms_per_mib"] = result["client_cpu_s"] * 1000 / mib
    else:
        result["server_us_per_call"] = result["server_cpu_s"] * 1e6 / result["calls"]
        result["client_us_per_call"] = result["client_cpu_s"] * 1e6 / result["calls"]
    result["server_sys_share"] = (result["server_sys_s"] / result["server_cpu_s"]
                                  if result["server_cpu_s"] > 0 else float("nan"))
    return result


def _brief(mode: str, result: dict[str, Any]) -> str:
    if mode == "seq":
        return (f"p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs; CPU/call "
                f"server {result['server_us_per_call']:.0f} µs, client "
                f"{result['client_us_per_call']:.0f} µs (load {result['loadavg_1m']:.1f})")
    return (f"{result['mib_per_s']:.1f} MiB/s; CPU/MiB server "
            f"{result['server_ms_per_mib']:.2f} ms, client {result['client_ms_per_mib']:.2f} ms"
            f" (load {result['loadavg_1m']:.1f})")


def measure_rounds(rig: Rig, paths: Sequence[str], modes: Sequence[str],
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for r in range(rig.settings.rounds):
        k = r % len(paths)
        order = [*paths[k:], *paths[:k]]  # rotate: LT LW GT GW, LW GT GW LT, ...
        entry: dict[str, Any] = {"round": r + 1, "order": order}
        for mode in modes:
            entry[mode] = {}
            for path in order:
                result = run_worker(rig, mode, path)
                entry[mode][path] = result
                log(f"round {r + 1} {mode:6} {path}: {_brief(mode, result)}")
        rounds.append(entry)
    return rounds


# ------------------------------------------------------------------ summary


def summarize(rounds: list[dict[str, Any]], paths: Sequence[str],
              modes: Sequence[str]) -> dict[str, Any]:
    def per_round(mode: str, key: str, num: str, den: str) -> list[float]:
        if num not in paths or den not in paths or mode not in modes:
            return []
        return [r[mode][num][key] / r[mode][den][key] for r in rounds]

    medians = {path: {f"{mode}_{key}": _median([r[mode][path][key] for r in rounds])
                      for mode, key, _l, _d in METRICS if mode in modes}
               for path in paths}
    ratios: dict[str, dict[str, Any]] = {}
    for mode, key, _label, _digits in METRICS:
        metric = f"{mode}_{key}"
        ratios[metric] = {}
        for num, den in RATIO_PAIRS:
            values = per_round(mode, key, num, den)
            if values:
                ratios[metric][f"{num}/{den}"] = {
                    "median": _median(values), "min": min(values), "max": max(values),
                    "per_round": values}
    cpu: dict[str, dict[str, float]] = {}
    for path in paths:
        cpu[path] = {}
        if "seq" in modes:
            for field in ("server_us_per_call", "client_us_per_call"):
                cpu[path][field] = _median([r["seq"][path][field] for r in rounds])
            cpu[path]["seq_server_sys_share"] = _median(
                [r["seq"][path]["server_sys_share"] for r in rounds])
        if "stream" in modes:
            for field in ("server_ms_per_mib", "client_ms_per_mib"):
                cpu[path][field] = _median([r["stream"][path][field] for r in rounds])
            cpu[path]["stream_server_sys_share"] = _median(
                [r["stream"][path]["server_sys_share"] for r in rounds])
    verdicts: list[dict[str, Any]] = []
    for key, label, kind, threshold, (mode, field, num, den) in TARGETS:
        values = per_round(mode, field, num, den)
        target = f"{label} {kind} {threshold:g}"
        if not values:
            verdicts.append({"key": key, "target": target, "measured": None, "pass": None,
                             "margin": None})
            continue
        value = _median(values)
        ok = value >= threshold if kind == ">=" else value <= threshold
        verdicts.append({"key": key, "target": target, "measured": value, "pass": ok,
                         "margin": value / threshold - 1, "kind": kind,
                         "threshold": threshold, "min": min(values), "max": max(values)})
    return {"medians": medians, "ratios": ratios, "cpu": cpu, "targets": verdicts}


def margin_text(verdict: dict[str, Any]) -> str:
    margin = verdict["margin"] * 100
    if verdict["kind"] == "<=":
        return f"{abs(margin):.1f} % {'under' if margin <= 0 else 'over'}"
    return f"{abs(margin):.1f} % {'above' if margin >= 0 else 'short'}"


def markdown(summary: dict[str, Any], paths: Sequence[str], settings: Settings) -> str:
    med = summary["medians"]
    pairs = [f"{n}/{d}" for n, d in RATIO_PAIRS if n in paths and d in paths]
    lines = ["| metric (median of rounds) | " + " | ".join(
        f"{PATHS[p][2]} ({p})" for p in paths) + " | " + " | ".join(pairs) + " |",
        "|---|" + "---:|" * (len(paths) + len(pairs))]
    names = {"unary_size": settings.unary_size, "stream_kib": settings.stream_size // KiB}
    for mode, key, label, digits in METRICS:
        metric = f"{mode}_{key}"
        if metric not in med[paths[0]]:
            continue
        cells = [_fmt(med[p][metric], digits) for p in paths]
        cells += [_fmt(summary["ratios"][metric].get(pair, {}).get("median")) for pair in pairs]
        lines.append(f"| {label.format(**names)} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are medians of per-round ratios (each round runs the paths back to"
              " back). Per-round range of the target ratios:", ""]
    for metric, by_pair in summary["ratios"].items():
        for pair in ("LW/LT", "GW/GT", "GU/GT", "GS/GT"):
            if pair in by_pair:
                lines.append(f"* {metric} {pair}: {by_pair[pair]['min']:.2f}\u2013"
                             f"{by_pair[pair]['max']:.2f}")
    lines += ["", "CPU per unit of work (median of rounds; utime+stime, kernel share of the"
              " server in brackets):", "",
              "| path | server µs / seq call | client µs / seq call |"
              " server ms / MiB streamed | client ms / MiB streamed |",
              "|---|---:|---:|---:|---:|"]
    for path in paths:
        c = summary["cpu"][path]

        def share(key: str, c: dict[str, float] = c) -> str:
            value = c.get(key)
            return f" [{value * 100:.0f}%]" if value is not None and value == value else ""

        lines.append(
            f"| {PATHS[path][2]} ({path}) | "
            f"{_fmt(c.get('server_us_per_call'), 0)}{share('seq_server_sys_share')} | "
            f"{_fmt(c.get('client_us_per_call'), 0)} | "
            f"{_fmt(c.get('server_ms_per_mib'), 2)}{share('stream_server_sys_share')} | "
            f"{_fmt(c.get('client_ms_per_mib'), 2)} |")
    lines += ["", "MiB streamed counts both directions (bytes sent + received)." + (
        " The server side of GS is the grpcio server plus the `grpcbridge serve` process."
        if "GS" in paths else ""), "",
              "| target | measured (median) | per-round range | result | by how much |",
              "|---|---:|---:|---|---:|"]
    for verdict in summary["targets"]:
        if verdict["measured"] is None:
            lines.append(f"| {verdict['target']} | n/a | | not measured | |")
            continue
        lines.append(f"| {verdict['target']} | {verdict['measured']:.2f} | "
                     f"{verdict['min']:.2f}\u2013{verdict['max']:.2f} | "
                     f"{'pass' if verdict['pass'] else '**MISS**'} | {margin_text(verdict)} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info = relay_machine()
    for package in ("grpclib", "h2", "protobuf", "py-spy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info["versions"][package] = version(package)
    return info


# ------------------------------------------------------------------ profiling


def profile(rig: Rig, mode: str, paths: Sequence[str], outdir: Path, rate: int,
            native: bool, log: Callable[[str], None]) -> str:
    """One longer measurement per path with py-spy on the server and on the client."""
    from profile_relay import top_frames

    report: list[str] = []
    for path in paths:
        outputs: list[tuple[str, Path]] = []

        def around(side: dict[str, Proc], client: Proc, path: str = path,
                   outputs: list[tuple[str, Path]] = outputs) -> Callable[[], None]:
            tools: list[subprocess.Popen[bytes]] = []
            for role, proc in [*side.items(), ("client", client)]:
                out = outdir / f"{path}-{mode}-{role}.collapsed.txt"
                cmd = [str(BIN / "py-spy"), "record", "--pid", str(proc.pid), "--format",
                       "raw", "--rate", str(rate), "--output", str(out)]
                cmd += ["--native"] if native else ["--nonblocking"]
                tools.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
                outputs.append((role, out))
            time.sleep(1.0)  # let the samplers attach

            def finish() -> None:
                for tool in tools:
                    tool.send_signal(signal.SIGINT)  # py-spy writes its output and exits
                for tool in tools:
                    try:
                        tool.wait(30)
                    except subprocess.TimeoutExpired:
                        tool.kill()
                        tool.wait(5)

            return finish

        result = run_worker(rig, mode, path, around)
        log(f"profile {mode} {path}: {_brief(mode, result)}")
        report.append(f"### {path}: {PATHS[path][2]} — {_brief(mode, result)}")
        for role, out in outputs:
            report.append(f"\n{role} ({out.name}):")
            report.append(top_frames(out, 22) if out.exists() else "  (no output)")
        report.append("")
    return "\n".join(report)


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--paths", default=DEFAULT_PATHS,
                        help="comma-separated subset of LT,LW,GT,GW,GU,GS (GS: diagnostic)")
    parser.add_argument("--modes", default="seq,stream", help="subset of seq,stream")
    parser.add_argument("--grpcio", choices=["aio", "sync"], default="aio",
                        help="grpcio server flavour for GT/GW (default: grpc.aio)")
    parser.add_argument("--commit", metavar="REV",
                        help="run grpcbridge from `git archive REV` instead of the work tree")
    parser.add_argument("--profile", choices=["seq", "stream"],
                        help="py-spy the server and client of each path instead of rounds")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples/s")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native (C frames; pauses the process per sample)")
    parser.add_argument("--output", type=Path, help="JSON path (default: results/...)")
    args = parser.parse_args()
    settings = PROFILE if args.profile else (QUICK if args.quick else FULL)
    if args.rounds:
        settings.rounds = args.rounds
    wanted = [p.strip().upper() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PATHS]
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {list(PATHS)}")
    if args.grpcio == "sync" and "GU" in wanted:
        wanted.remove("GU")  # with grpc.server, GW's bridge already has its own thread
    paths = [p for p in PATHS if p in wanted]
    modes = [args.profile] if args.profile else [
        m for m in ("seq", "stream") if m in args.modes.split(",")]
    run = begin_run("grpcbridge-native-", args.commit, machine())
    stamp, results_dir, logdir, env, info = (run.stamp, run.results_dir, run.logdir, run.env,
                                             run.info)
    output = args.output or results_dir / f"native-{stamp}.json"
    log(f"grpcbridge from {info['code']['source']} ({info['code']['module_file']})")
    procs = Processes(logdir, env)
    ok = False
    started = time.monotonic()
    try:
        with _terminate_on_signals():
            servers, targets = start_servers(procs, paths, args.grpcio)
            log(f"targets: {targets}; logs in {logdir}")
            rig = Rig(procs, servers, targets, settings)
            if args.profile:
                outdir = results_dir / f"native-profile-{stamp}"
                outdir.mkdir()
                text = profile(rig, args.profile, paths, outdir, args.rate, args.native, log)
                (outdir / "summary.txt").write_text(text + "\n")
                print(text)
                print(f"\ncollapsed stacks: {outdir.relative_to(ROOT)}")
                ok = True
                return 0
            rounds = measure_rounds(rig, paths, modes, log)
            summary = summarize(rounds, paths, modes)
            report = markdown(summary, paths, settings)
            info["loadavg_end"] = os.getloadavg()
            document: dict[str, Any] = {
                "timestamp": stamp, "command": " ".join([Path(PY).name, *sys.argv]),
                "quick": args.quick, "grpcio": args.grpcio,
                "machine": info,
                "settings": settings.__dict__, "paths": paths, "modes": modes,
                "duration_s": time.monotonic() - started,
                "summary": summary, "rounds": rounds,
            }
            output.write_text(json.dumps(document, indent=2) + "\n")
            print(report)
            print(f"\nJSON: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}"
                  f"  (load average {info['loadavg_start'][0]:.2f} -> "
                  f"{info['loadavg_end'][0]:.2f}; {document['duration_s']:.0f} s)")
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
