#!/usr/bin/env bash
# Fetch, HERE (where pip reaches the registry), the wheels the GPU machine's image lacks, into
# .whl/ (git-ignored through .git/info/exclude), for the device tool to carry. That image has
# Python 3.12, torch, transformers, nvidia-ml-py, prometheus-client and psutil, but not the gRPC
# versions the generated stubs need. Then see benchmarks/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
for pkg in grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl
