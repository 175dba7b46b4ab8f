"""A raw TCP backend for the backpressure tests, run as its own process.

``python tests/peer_stream.py`` listens on 127.0.0.1 (random port), prints ``listening
<port>`` and serves every connection in its own thread. The first line a connection sends
says what to do:

* ``SINK <nbytes> <bytes_per_second>`` -- read exactly ``nbytes`` more bytes in small reads,
  sleeping so the average rate stays at or below ``bytes_per_second`` (0: as fast as
  possible), then answer ``<count> <sha256 hex>\\n`` and close.
* ``SOURCE <nbytes> <seed>`` -- write :func:`payload` ``(nbytes, seed)`` as fast as the
  connection takes it, then close.

After each command it prints ``done <command> <arguments> seconds=<time it took>``.
:func:`payload` is also imported by the tests, so both ends produce the same bytes.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator

KiB = 1024
MiB = 1024 * KiB
_POOL_BYTES = 4 * MiB
_pools: dict[int, bytes] = {}


def payload(total: int, seed: int, *, max_chunk: int = 64 * KiB) -> Iterator[memoryview]:
    """Deterministic pseudo-random bytes: ``total`` bytes in chunks of 1..``max_chunk``.

    Each chunk is a slice at a random offset of a 4 MiB random pool (both drawn from
    ``random.Random(seed)``), so the stream never repeats in a way that would hide
    reordered, duplicated or dropped chunks from a checksum, and costs no CPU to produce.
    """
    rng = random.Random(seed)
    pool = _pools.get(seed)
    if pool is None:
        pool = _pools[seed] = random.Random(seed ^ 0x5EED).randbytes(_POOL_BYTES)
    view = memoryview(pool)
    left = total
    while left > 0:
        size = min(left, rng.randint(1, max_chunk))
        start = rng.randrange(0, _POOL_BYTES - size + 1)
        yield view[start:start + size]
        left -= size


def digest(total: int, seed: int) -> str:
    sha = hashlib.sha256()
    for chunk in payload(total, seed):
        sha.update(chunk)
    return sha.hexdigest()


def _read_line(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\n" not in data:
        more = conn.recv(4096)
        if not more:
            raise ConnectionError("closed before the command line")
        data += more
    line, _, rest = data.partition(b"\n")
    return line, rest


def _sink(conn: socket.socket, total: int, rate: int, first: bytes) -> None:
    sha = hashlib.sha256(first)
    count = len(first)
    buffer = bytearray(16 * KiB)
    started = time.monotonic()
    while count < total:
        n = conn.recv_into(buffer, min(len(buffer), total - count))
        if n == 0:
            break
        sha.update(memoryview(buffer)[:n])
        count += n
        if rate:
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    conn.sendall(f"{count} {sha.hexdigest()}\n".encode())


def _source(conn: socket.socket, total: int, seed: int) -> None:
    batch: list[memoryview] = []
    size = 0
    for chunk in payload(total, seed):
        batch.append(chunk)
        size += len(chunk)
        if size >= 256 * KiB:
            conn.sendall(b"".join(batch))
            batch, size = [], 0
    if batch:
        conn.sendall(b"".join(batch))


def _serve(conn: socket.socket) -> None:
    try:
        with conn:
            line, rest = _read_line(conn)
            command, *args = line.decode().split()
            started = time.monotonic()
            if command == "SINK":
                _sink(conn, int(args[0]), int(args[1]), rest)
            elif command == "SOURCE":
                _source(conn, int(args[0]), int(args[1]))
            print(f"done {command} {' '.join(args)} seconds={time.monotonic() - started:.3f}",
                  flush=True)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            while conn.recv(65536):  # wait for the other side to close too
                pass
    except OSError as exc:
        print(f"connection failed: {exc!r}", file=sys.stderr, flush=True)


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
