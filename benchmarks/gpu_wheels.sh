#!/usr/bin/env bash
# Fetch and build, HERE (where pip reaches the registry), what the GPU machine's image lacks, into
# .whl/ (git-ignored through .git/info/exclude), for the device tool to carry. That image has
# Python 3.12, torch, transformers, accelerate, pytest, nvidia-ml-py, prometheus-client and psutil,
# but not the gRPC and protobuf versions the generated stubs need; the image's own accelerate and
# pytest are used (carried older ones would shadow them and may not fit its transformers). The project
# itself goes as its own wheel: `gelato.edge`, `gelato.device` and `gelato.benchmarks` exist only
# installed (a package-directory mapping), so the checkout alone on PYTHONPATH does not import.
# Then see benchmarks/gpu_run.sh.
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
python3 -m pip wheel -q --no-deps -w .whl .
rm -rf build ./*.egg-info
ls -la .whl
