"""Profile the relays of path B (client -> forward -> serve -> echo server) under one load.

    .venv/bin/python benchmarks/profile_relay.py stream          # py-spy, 64 KiB bidi echo
    .venv/bin/python benchmarks/profile_relay.py seq --tool strace

``--tool pyspy`` (default; ``.venv/bin/pip install py-spy``) samples the bridge and the
forwarder while the load runs and prints the hottest frames (self time, and inclusive time
of grpcbridge/websockets/asyncio functions); collapsed stacks are kept under
benchmarks/results/profile-<timestamp>/ (feed them to speedscope or flamegraph.pl).
``--tool strace`` counts the relays' system calls per unit of work instead (strace slows
the relays down a lot: use it for counts, not for times).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import relay
from relay import BIN, HERE, PY, RELAY_FLAGS, Processes, listening_port, relay_argv, source_tree


def top_frames(collapsed: Path, limit: int) -> str:
    """Self and inclusive sample shares from py-spy's collapsed ("raw") output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \((?:[^()]*/)?([^/()]+)\)$", r" (\1)", f)
                  for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; self time:"]
    for frame, count in self_time.most_common(limit):
        lines.append(f"    {count / total * 100:5.1f}%  {frame}")
    lines.append("  inclusive (grpcbridge, websockets, asyncio transports):")
    interesting = [(f, c) for f, c in inclusive.items()
                   if re.search(r"relay\.py|protocol\.py|frames\.py|streams\.py|"
                                r"selector_events\.py|bridge\.py|forwarder\.py", f)]
    for frame, count in sorted(interesting, key=lambda fc: -fc[1])[:limit]:
        lines.append(f"    {count / total * 100:5.1f}%  {frame}")
    return "\n".join(lines)


def strace_summary(path: Path) -> tuple[int, list[tuple[str, int]]]:
    counts: list[tuple[str, int]] = []
    total = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
            name = parts[-1]
            calls = int(parts[3])
            counts.append((name, calls))
    for _name, calls in counts:
        total += calls
    return total, sorted(counts, key=lambda nc: -nc[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["seq", "conc", "stream"])
    parser.add_argument("--tool", choices=["pyspy", "strace"], default="pyspy")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load")
    parser.add_argument("--calls", type=int, default=6000, help="seq: calls")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples/s")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--commit", metavar="REV",
                        help="profile `git archive REV` instead of the working tree")
    args = parser.parse_args()

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = HERE / "results" / f"profile-{stamp}"
    outdir.mkdir(parents=True)
    logdir = Path(tempfile.mkdtemp(prefix="grpcbridge-prof-"))
    try:
        env, code = source_tree(args.commit, logdir)
        print(f"relays run {code['source']}")
    except BaseException:
        shutil.rmtree(logdir, ignore_errors=True)
        raise
    procs = Processes(logdir, env)
    try:
        server = procs.start("server", [PY, str(HERE / "echo_server.py"),
                                        "--listen", "127.0.0.1:0"])
        match = re.search(r":(\d+)\s*$", server.read_line(30))
        assert match, "echo server did not print its port"
        server_port = int(match.group(1))
        bridge = procs.start("bridge", relay_argv(None, "bridge", [
            "serve", "--backend", f"127.0.0.1:{server_port}",
            "--listen", "127.0.0.1:0", "--path", "/grpc", *RELAY_FLAGS]))
        bridge_port = listening_port(bridge)
        forwarder = procs.start("forwarder", relay_argv(None, "forwarder", [
            "forward", "--target", f"ws://127.0.0.1:{bridge_port}/grpc",
            "--listen", "127.0.0.1:0", *RELAY_FLAGS[-2:]]))
        target = f"127.0.0.1:{listening_port(forwarder)}"
        argv = [PY, str(HERE / "bench_client.py"), args.mode, "--target", target]
        if args.mode == "seq":
            argv += ["--calls", str(args.calls), "--size", "16"]
        elif args.mode == "conc":
            argv += ["--duration", str(args.duration), "--size", "16"]
        else:
            argv += ["--duration", str(args.duration), "--size", str(64 * 1024)]
        worker = procs.start("client", argv, stdin=True)
        worker.read_json(60)
        tools = []
        for name, proc in (("bridge", bridge), ("forwarder", forwarder)):
            if args.tool == "pyspy":
                out = outdir / f"{name}-{args.mode}.collapsed.txt"
                cmd = [str(BIN / "py-spy"), "record", "--pid", str(proc.pid), "--format", "raw",
                       "--rate", str(args.rate), "--nonblocking", "--output", str(out)]
            else:
                out = outdir / f"{name}-{args.mode}.strace.txt"
                cmd = ["strace", "-c", "-f", "-p", str(proc.pid), "-o", str(out)]
            tools.append((name, out, subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(1.0)  # let the samplers attach
        before = {n: relay.cpu_times(p.pid) for n, p in (("bridge", bridge),
                                                         ("forwarder", forwarder))}
        worker.send("go")
        result = worker.read_json(args.duration + 600)["result"]
        after = {n: relay.cpu_times(p.pid) for n, p in (("bridge", bridge),
                                                        ("forwarder", forwarder))}
        for _name, _out, tool in tools:
            tool.send_signal(2)  # SIGINT: py-spy and strace write their output and exit
        for _name, _out, tool in tools:
            tool.wait(30)
        worker.send("bye")
        if args.mode == "stream":
            units = (result["bytes_sent"] + result["bytes_received"]) / relay.MiB
            unit = "MiB (both directions)"
        else:
            units = result["calls"]
            unit = "call"
        print(f"{args.mode} through path B with {args.tool}: {result}")
        for name, out, _tool in tools:
            user, system = (a - b for a, b in zip(after[name], before[name], strict=True))
            print(f"\n{name}: CPU {user + system:.2f} s (user {user:.2f}, sys {system:.2f});"
                  f" {(user + system) / units * 1e6:.0f} µs per {unit}")
            if args.tool == "pyspy":
                print(top_frames(out, args.top))
            else:
                total, counts = strace_summary(out)
                print(f"  {total / units:.1f} syscalls per {unit}: " + ", ".join(
                    f"{n} {c / units:.2f}" for n, c in counts[:8]))
        print(f"\noutput: {outdir}")
    finally:
        procs.stop_all()
        shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
