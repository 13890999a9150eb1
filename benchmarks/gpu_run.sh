#!/usr/bin/env bash
# The GPU runs of the edge-batching and energy issues, on the device tool's H100/H200 machine.
# Here first: benchmarks/gpu_wheels.sh (the project wheel and what the image lacks, into .whl/). Then, through the
# device tool, from the repo root with `.whl` carried:  bash benchmarks/gpu_run.sh
# Results go to $OUT (the tool brings them back) or benchmarks/results: nvml_check_<gpu>.json and
# edge_batching_<gpu>.{json,md}, gpu_tests_<gpu>.txt; copy them into benchmarks/results/ and commit.
# Budget: ~2 min to make the random Qwen2.5-7B / 0.5B checkpoints, ~1 min to load, a few minutes
# of replay; well inside one 10-minute call on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
# The project and what the image lacks, from benchmarks/gpu_wheels.sh: the checkout alone does not
# import (`gelato.edge` and friends exist only installed).
if ! compgen -G ".whl/gelato-*.whl" > /dev/null; then
  echo "gpu_run.sh: no .whl/gelato-*.whl: run benchmarks/gpu_wheels.sh here first and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")  # h100, h200

python3 -m gelato.benchmarks.nvml_check --seconds 5 --out "$out/nvml_check_$tag.json" || echo "nvml_check: exit $?"
python3 -m gelato.benchmarks.qwen_shapes --shape 7b --out /tmp/qwen7b --device cuda
python3 -m gelato.benchmarks.qwen_shapes --shape 0.5b --out /tmp/qwen05b --device cuda
python3 -m gelato.benchmarks.edge_batching --target /tmp/qwen7b --drafter /tmp/qwen05b --device cuda --dtype bfloat16 \
  --sessions 1,2,4,8,16,32,64 --unique-prompts 8 --k 4 --max-new-tokens 64 --reps 5 --out "$out/edge_batching_$tag"

# The KV placement tests, the gpu-marked ones (a layer on CUDA) included, from a copy of tests/ so that the installed `gelato`
# is the one imported (the checkout's own gelato/ folder lacks gelato.edge).
rm -rf /tmp/gpu_tests && mkdir -p /tmp/gpu_tests && cp -r tests pyproject.toml /tmp/gpu_tests/
(cd /tmp/gpu_tests && PYTHONPATH=/tmp/site:/tmp/gpu_tests python3 -m pytest -q -p no:cacheprovider tests/edge/test_kv_placement.py) \
  2>&1 | tee "$out/gpu_tests_$tag.txt" || echo "gpu tests: exit $?"
