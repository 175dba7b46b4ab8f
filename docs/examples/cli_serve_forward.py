"""`grpcbridge serve` in front of a gRPC server, `grpcbridge forward` in front of a client.

In a shell this is:

    grpcbridge serve --listen 127.0.0.1:8080 --backend 127.0.0.1:50051
    grpcbridge forward --listen 127.0.0.1:50052 --target ws://127.0.0.1:8080/grpc

Here both run on free ports (port 0) and the script reads the chosen ones from their logs.
"""

import re
import subprocess
import sys

import grpc

from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.service import serve


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Run `grpcbridge <args>`; return the process and the address it logged."""
    process = subprocess.Popen([sys.executable, "-m", "grpcbridge.cli", *args],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"_started listen=(\S+)", line)
        if match:  # (its later log lines wait in the pipe; communicate() reads them)
            return process, match.group(1)
    raise RuntimeError(f"grpcbridge {args[0]} exited with {process.wait()}")


server, _, port = serve("127.0.0.1:0")  # the grpcio Todo service: any h2c gRPC server
bridge, url = start("serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}")
forwarder, address = start("forward", "--listen", "127.0.0.1:0", "--target", url)
try:
    with grpc.insecure_channel(address) as channel:  # plain grpcio, no idea of WebSockets
        stub = todo_pb2_grpc.TodoServiceStub(channel)
        todo = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="through the CLI"), timeout=10)
        print("created:", todo.text)
finally:
    for process in (forwarder, bridge):
        process.terminate()  # SIGTERM: drain, close tunnels, exit 0
        process.communicate(timeout=10)
    server.stop(grace=None).wait()
