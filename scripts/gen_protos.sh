#!/usr/bin/env bash
# Regenerate the Todo demo stubs (grpcio, grpclib, protobuf + .pyi) from todo.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I src \
  --python_out=src --pyi_out=src --grpc_python_out=src --grpclib_python_out=src \
  src/grpcbridge/demo/todo.proto
