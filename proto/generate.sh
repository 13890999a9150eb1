#!/usr/bin/env bash
# Regenerate the Python stubs for proto/gelato/v1/*.proto into OUT (default: the repo root, so
# they land in gelato/v1/). The proto path mirrors the package path, so generated imports resolve.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
mkdir -p "$out"
python -m grpc_tools.protoc -I"$root/proto" --python_out="$out" --grpc_python_out="$out" \
  --pyi_out="$out" "$root"/proto/gelato/v1/*.proto
