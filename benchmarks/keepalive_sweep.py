"""CPU cost of the bridge's keepalive sweep over tunnels that have a deadline (every tunnel
does with ``--max-tunnel-age``): how many timers a sweep re-arms, and µs per tunnel. No
sockets, one core.

    .venv/bin/python benchmarks/keepalive_sweep.py [--tunnels 2000] [--rounds 20]

The sweep ticks every tunnel's machine once a second (``ping_interval``/``idle_timeout``
checks); a tick sets a tunnel's timer only when its deadline changed, so a quiet aged tunnel
costs no timer per second (the event loop keeps one handle per tunnel, not one per sweep).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from framing_micro import _NullTransport, open_pair

from grpcbridge import relay
from grpcbridge.core.tunnel import TunnelIO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    tunnels = []
    for _ in range(args.tunnels):
        tunnel = relay.Tunnel(loop, open_pair()[1], stream_name="backend")
        tunnel.ws_transport = _NullTransport()  # type: ignore[assignment]
        tunnel.attach_stream(_NullTransport())  # type: ignore[arg-type]
        tunnel.machine.websocket_opened()
        tunnel.machine.retire_after(3600.0, 30.0)
        tunnels.append(tunnel)
    armed = 0
    set_timer = TunnelIO.set_timer

    def counted(self: Any, deadline: float | None) -> None:
        nonlocal armed
        armed += 1
        set_timer(self, deadline)

    TunnelIO.set_timer = counted  # type: ignore[method-assign]
    try:
        for _ in range(args.rounds):
            for tunnel in tunnels:
                tunnel.machine.tick(20.0, 60.0)
    finally:
        TunnelIO.set_timer = set_timer  # type: ignore[method-assign]
    best = float("inf")
    for _ in range(args.rounds):
        started = time.process_time()
        for tunnel in tunnels:
            tunnel.machine.tick(20.0, 60.0)
        best = min(best, time.process_time() - started)
    print(f"{args.tunnels} aged tunnels: {armed / args.rounds:.0f} timers set per sweep, "
          f"{best / args.tunnels * 1e6:.2f} µs per tunnel per sweep (best of {args.rounds}), "
          f"{len(loop._scheduled)} timer handles in the loop")  # type: ignore[attr-defined]
    loop.close()


if __name__ == "__main__":
    main()
