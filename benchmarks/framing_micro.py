"""In-process cost of WebSocket framing: per message through grpcbridge.relay.Tunnel, and
per MiB for websockets' sans-I/O protocol (what the relay uses) against a minimal
binary-frame fast path. No sockets, one core.

    .venv/bin/python benchmarks/framing_micro.py [--frame 65536] [--chunk 262144]

Inbound = bytes read from the socket (``--chunk`` at a time) turned into payloads for the
other side; outbound = payloads turned into the bytes handed to ``transport.write``. The
bridge receives masked frames (client -> server) and sends unmasked ones; the forwarder the
other way round. The fast path parses frame headers straight from the received bytes,
unmasks with websockets' C ``apply_mask`` and builds outbound frames with one join.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask  # type: ignore[import-not-found]
from websockets.uri import parse_uri

MiB = 1024 * 1024


def open_pair() -> tuple[ClientProtocol, ServerProtocol]:
    """A client and a server protocol after a real opening handshake."""
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), max_size=16 * MiB)
    server = ServerProtocol(max_size=16 * MiB)
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    request = server.events_received()[0]
    server.send_response(server.accept(request))  # type: ignore[arg-type]
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    assert client.state is OPEN and server.state is OPEN
    return client, server


def open_server() -> ServerProtocol:
    return open_pair()[1]


def open_client() -> ClientProtocol:
    return open_pair()[0]


def wire(payload: bytes, frames: int, masked: bool) -> bytes:
    """``frames`` binary frames of ``payload`` as they appear on the wire."""
    out = bytearray()
    for _ in range(frames):
        out += Frame(Opcode.BINARY, payload).serialize(mask=masked, extensions=[])
    return bytes(out)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def rate(label: str, fn: Callable[[], int], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        nbytes = fn()
        best = min(best, (time.process_time() - t0) / (nbytes / MiB))
    print(f"  {label:60} {best * 1000:6.3f} ms/MiB")
    return best


# ------------------------------------------------------------------ inbound


def inbound_websockets(protocol_factory: Callable[[], object], data: list[bytes]) -> int:
    protocol = protocol_factory()
    total = 0
    for chunk in data:
        protocol.receive_data(chunk)  # type: ignore[attr-defined]
        for event in protocol.events_received():  # type: ignore[attr-defined]
            payload = bytes(event.data)
            total += len(payload)
    return total


class FastReader:
    """Binary data frames only (FIN set, no extensions); anything else would go to the
    generic parser in a real relay."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes, out: Callable[[bytes], None]) -> None:
        buffer = self.buffer
        if buffer:
            buffer += data
            view = memoryview(buffer)
        else:
            view = memoryview(data)
        pos, end = 0, len(view)
        while end - pos >= 2:
            b1 = view[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = struct.unpack_from("!H", view, pos + 2)[0]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = struct.unpack_from("!Q", view, pos + 2)[0]
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head + length:
                break
            payload = view[pos + head:pos + head + length]
            if masked:
                out(apply_mask(payload, view[pos + head - 4:pos + head]))
            else:
                out(bytes(payload))
            pos += head + length
        rest = bytes(view[pos:])
        view.release()
        self.buffer = bytearray(rest)


def inbound_fast(data: list[bytes]) -> int:
    reader = FastReader()
    total = 0

    def out(payload: bytes) -> None:
        nonlocal total
        total += len(payload)

    for chunk in data:
        reader.feed(chunk, out)
    return total


# ------------------------------------------------------------------ outbound


def outbound_websockets(protocol_factory: Callable[[], object], payloads: list[bytes]) -> int:
    protocol = protocol_factory()
    total = 0
    for payload in payloads:
        protocol.send_binary(payload)  # type: ignore[attr-defined]
        wire_bytes = b"".join(protocol.data_to_send())  # type: ignore[attr-defined]
        total += len(payload)
        assert wire_bytes
    return total


class MaskPool:
    """Mask keys from one os.urandom() call per 1,024 frames (not one syscall per frame)."""

    def __init__(self) -> None:
        self.pool = b""
        self.pos = 0

    def key(self) -> bytes:
        if self.pos >= len(self.pool):
            self.pool, self.pos = os.urandom(4096), 0
        self.pos += 4
        return self.pool[self.pos - 4:self.pos]


def header(length: int, mask: bytes | None) -> bytes:
    bit = 0x80 if mask else 0
    if length < 126:
        head = struct.pack("!BB", 0x82, bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x82, bit | 126, length)
    else:
        head = struct.pack("!BBQ", 0x82, bit | 127, length)
    return head + mask if mask else head


def outbound_fast(payloads: list[bytes], masked: bool) -> int:
    pool = MaskPool()
    total = 0
    for payload in payloads:
        if masked:
            key = pool.key()
            wire_bytes = header(len(payload), key) + apply_mask(payload, key)
        else:
            wire_bytes = b"".join((header(len(payload), None), payload))
        total += len(payload)
        assert wire_bytes
    return total


class _NullTransport:
    """Stands in for an asyncio transport: accepts writes, does nothing."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: object) -> None:
        for _ in data:  # type: ignore[attr-defined]
            pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


def per_message(size: int, count: int = 20000) -> None:
    """µs per message through grpcbridge.relay.Tunnel (bridge side) with fake transports:
    the relay's and websockets' Python cost per message, without any syscall."""
    import asyncio

    from grpcbridge.core.limits import MemoryBudget
    from grpcbridge.relay import Tunnel

    loop = asyncio.new_event_loop()

    def bridge_tunnel(server: Any) -> Tunnel:
        """A relaying tunnel as on a bridge: charged to a client's budget, both sides open."""
        tunnel = Tunnel(loop, server, stream_name="backend")
        tunnel.machine.account = MemoryBudget().open("client")
        tunnel.ws_transport = _NullTransport()  # type: ignore[assignment]
        tunnel.attach_stream(_NullTransport())  # type: ignore[arg-type]
        tunnel.machine.websocket_opened()  # as the bridge does once the 101 is sent
        return tunnel

    try:
        client, server = open_pair()
        tunnel = bridge_tunnel(server)
        payload = os.urandom(size)
        client.send_binary(payload)
        frame = b"".join(client.data_to_send())  # one masked frame, as read from the socket
        aged = bridge_tunnel(open_pair()[1])  # the same, differing only by the age
        if hasattr(aged.machine, "retire_after"):  # what --max-tunnel-age adds
            aged.machine.retire_after(3600.0, 30.0)
        try:  # what every grpcbridge channel runs on the bytes it receives
            from grpcbridge.core.age import GoawayFilter
        except ImportError:  # an older grpcbridge (PYTHONPATH): no such row
            GoawayFilter = None  # type: ignore[assignment,misc]
        goaway_filter = None if GoawayFilter is None else GoawayFilter(lambda _: None)
        # Whole HTTP/2 DATA frames, as a backend sends them (the age follows frame headers).
        data_frame = (max(size - 9, 0)).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
        data_frame += payload[:max(size - 9, 0)]
        for label, step in (("WebSocket -> backend (ws_data)", lambda: tunnel.ws_data(frame)),
                            ("backend -> WebSocket (stream_data)",
                             lambda: tunnel.machine.stream_data(payload)),
                            ("backend -> WebSocket, --max-tunnel-age set",
                             lambda: aged.machine.stream_data(data_frame)),
                            ("client: graceful-GOAWAY filter, one HTTP/2 frame",
                             None if goaway_filter is None
                             else lambda: goaway_filter.feed(data_frame))):
            if step is None:
                continue
            best = float("inf")
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(count):
                    step()
                best = min(best, (time.process_time() - t0) / count)
            print(f"  {label:60} {best * 1e6:6.2f} µs/message")
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, default=64 * 1024, help="payload per frame")
    parser.add_argument("--chunk", type=int, default=256 * 1024, help="bytes per socket read")
    parser.add_argument("--mib", type=int, default=64, help="MiB per measurement")
    parser.add_argument("--message", type=int, default=200,
                        help="message size for the per-message relay measurement")
    args = parser.parse_args()
    print(f"grpcbridge.relay.Tunnel per {args.message} B message (fake transports, no syscalls):")
    per_message(args.message)
    baseline = _NullTransport()
    t0 = time.process_time()
    for _ in range(20000):
        baseline.write(b"x" * args.message)
    print(f"  {'plain pass-through (transport.write only), for scale':60} "
          f"{(time.process_time() - t0) / 20000 * 1e6:6.2f} µs/message")
    payload = os.urandom(args.frame)
    frames = max(1, args.mib * MiB // args.frame)
    masked_wire = chunks(wire(payload, frames, masked=True), args.chunk)
    plain_wire = chunks(wire(payload, frames, masked=False), args.chunk)
    payloads = [payload] * frames
    print(f"{args.frame} B frames, {args.chunk} B reads, {args.mib} MiB per run "
          "(best of 5, CPU time)")
    print("bridge, inbound (masked frames from the forwarder):")
    rate("websockets ServerProtocol.receive_data + events_received",
         lambda: inbound_websockets(open_server, masked_wire))
    rate("fast path: header parse + apply_mask", lambda: inbound_fast(masked_wire))
    print("bridge, outbound (unmasked frames to the forwarder):")
    rate("websockets send_binary + data_to_send + join (writelines, 3.11)",
         lambda: outbound_websockets(open_server, payloads))
    rate("fast path: header + one join", lambda: outbound_fast(payloads, masked=False))
    print("forwarder, inbound (unmasked frames from the bridge):")
    rate("websockets ClientProtocol.receive_data + events_received",
         lambda: inbound_websockets(open_client, plain_wire))
    rate("fast path: header parse + bytes(payload)", lambda: inbound_fast(plain_wire))
    print("forwarder, outbound (masked frames to the bridge):")
    rate("websockets send_binary + data_to_send + join (getrandom per frame)",
         lambda: outbound_websockets(open_client, payloads))
    rate("fast path: pooled mask key + apply_mask + one concat",
         lambda: outbound_fast(payloads, masked=True))


if __name__ == "__main__":
    main()
