#!/usr/bin/env bash
# The GPU runs of the edge-batching, energy and deployment issues, on the device tool's H100/H200 machine.
# Here first: benchmarks/gpu_wheels.sh (the project wheel and what the image lacks, into .whl/). Then, through the
# device tool, from the repo root with `.whl` carried:  bash benchmarks/gpu_run.sh
# Results go to $1, else $OUT (the tool brings them back), else benchmarks/results/gpu_run: nvml_check_<gpu>.json,
# gpu_tests_<gpu>.txt, device_nvml_<gpu>.jsonl (a real edge + device run metered by NVML),
# edge_batching_<gpu>.{json,md}, qwen_round_<gpu>.jsonl + qwen_trace_<gpu>.jsonl (Qwen2.5-shaped
# pair, both processes on the GPU) and gpu_run.log; copy them into benchmarks/results/gpu_<gpu>/ and commit.
# Every stage has its own time limit and a failing stage does not stop the later ones, so one
# call of the device tool (at most 10 minutes, 15 minutes of device time in all) returns what it can;
# the exit status is 1 when a stage failed. GPU_RUN_SKIP=name,... skips stages (e.g. gpu_tests when
# a first call already ran them).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu_run}}
mkdir -p "$out"
# Knobs for a dry run of this script on a CPU host (GPU_RUN_DEVICE=cpu GPU_RUN_METER=cpu-model
# GPU_RUN_LAYERS=1 GPU_RUN_SESSIONS=1,2): defaults are the GPU run's.
dev=${GPU_RUN_DEVICE:-cuda} meter=${GPU_RUN_METER:-nvml} layers=${GPU_RUN_LAYERS:-0}
sessions=${GPU_RUN_SESSIONS:-1,2,4,8,16,32,64}
export out dev meter
# The device runs' prompts (arithmetic questions written for this script, not GSM8K's text).
prompts=(--prompt "A baker makes 24 rolls and sells a third of them." --prompt "A cyclist rides 15 km a day for 4 days."
  --prompt "Tom has 3 boxes with 12 pencils each." --prompt "A train travels 60 miles per hour for 3 hours.")
exec > >(tee "$out/gpu_run.log") 2>&1
# The project and what the image lacks, from benchmarks/gpu_wheels.sh: the checkout alone does not
# import (`gelato.edge` and friends exist only installed).
if ! compgen -G ".whl/gelato-*.whl" > /dev/null; then
  echo "gpu_run.sh: no .whl/gelato-*.whl: run benchmarks/gpu_wheels.sh here first and carry .whl" >&2
  exit 2
fi
wheels=(.whl/*.whl)
[ "$dev" = cpu ] && wheels=(.whl/gelato-*.whl)  # a dry run here: the host's own gRPC (its Python may not be 3.12)
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 2
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1  # `python3 -m` must not put the checkout first: its gelato/ lacks gelato.edge (installed only)
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")  # h100, h200
export tag
t0=$SECONDS
failed=0
stage() {  # stage NAME SECONDS CMD...: run with a limit, report its exit status and time, go on
  local name=$1 limit=$2 s=$SECONDS
  shift 2
  case ",${GPU_RUN_SKIP:-}," in *",$name,"*) echo "=== $name: skipped (GPU_RUN_SKIP)"; return 0 ;; esac
  echo "=== $name (limit ${limit}s, at $((SECONDS - t0))s)"
  # timeout kills the command's whole process group (a stage's edge too); functions run in a bash -c
  timeout -k 5 "$limit" bash -c "set -o pipefail; $(declare -p prompts); $(declare -f edge_up edge_down gpu_tests device_runs qwen_round); \"\$@\"" _ "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - s))s"
  [ $rc = 0 ] || failed=$((failed + 1))
}
edge_up() {  # edge_up LOGFILE ARGS...: a gelato-edge on 127.0.0.1:50051, waited for through its health check
  local log=$1
  shift
  python3 -m gelato.edge.cli --host 127.0.0.1 --port 50051 "$@" > "$log" 2>&1 &
  edge_pid=$!
  for _ in $(seq 240); do
    python3 -m gelato.edge.cli --health-check 127.0.0.1:50051 > /dev/null 2>&1 && return 0
    kill -0 $edge_pid 2> /dev/null || break
    sleep 0.5
  done
  echo "edge did not come up:"; tail -20 "$log"
  kill $edge_pid 2> /dev/null  # or it could hold the port and answer the next stage's health check
  return 1
}
edge_down() { kill $edge_pid 2> /dev/null; wait $edge_pid 2> /dev/null; tail -3 "$1"; }

# 1. NVML meter against a known load (energy issue).
stage nvml_check 60 python3 -m gelato.benchmarks.nvml_check --seconds 5 --out "$out/nvml_check_$tag.json"

# 2. The KV placement tests, the gpu-marked ones (a layer on CUDA) included, from a copy of tests/ so that the
# installed `gelato` is the one imported (the checkout's own gelato/ folder lacks gelato.edge).
rm -rf /tmp/gpu_tests && mkdir -p /tmp/gpu_tests && cp -r tests pyproject.toml /tmp/gpu_tests/
gpu_tests() { cd /tmp/gpu_tests && PYTHONPATH=/tmp/site:/tmp/gpu_tests python3 -m pytest -q -p no:cacheprovider -rs \
  tests/edge/test_kv_placement.py tests/benchmarks/test_gpu_tools.py 2>&1 | tee "$out/gpu_tests_$tag.txt"; }
stage gpu_tests 120 gpu_tests

# 3. Real edge + device runs, built-in pair. (a) The drafter on the GPU metered by NVML, the edge on the
# CPU, so the GPU's energy is the device's alone: energy_source nvml, energy_kind measured. (b) Lossless
# on CUDA: the edge's target on the GPU in float32; fixed-4 speculation must emit exactly the tokens of
# fixed-0 (the target decoding alone).
device_runs() {
  local dev_cli=(python3 -m gelato.device.cli --edge 127.0.0.1:50051 --json --max-new-tokens 64 "${prompts[@]}")
  edge_up /tmp/edge_tiny.log --device cpu --threads 4 || return 1
  "${dev_cli[@]}" --device "$dev" --meter "$meter" --policy fixed-4 > "$out/device_nvml_$tag.jsonl"
  local rc=$?
  edge_down /tmp/edge_tiny.log
  edge_up /tmp/edge_tiny_gpu.log --device "$dev" --dtype float32 || return 1
  "${dev_cli[@]}" --device "$dev" --meter cpu-model --policy fixed-4 > /tmp/lossless_4.jsonl || rc=1
  "${dev_cli[@]}" --device "$dev" --meter cpu-model --policy fixed-0 > /tmp/lossless_0.jsonl || rc=1
  edge_down /tmp/edge_tiny_gpu.log
  python3 - << 'PY' || rc=1
import json
runs = [[json.loads(line) for line in open(f"/tmp/lossless_{k}.jsonl")] for k in (4, 0)]
same = [a["token_ids"] == b["token_ids"] for a, b in zip(*runs, strict=True)]
acc = sum(r["accepted"] for r in runs[0]) / max(1, sum(r["drafted"] for r in runs[0]))
print(f"lossless on the edge's device: fixed-4 == fixed-0 tokens for {sum(same)}/{len(same)} prompts "
      f"({sum(r['n_tokens'] for r in runs[0])} tokens, acceptance {acc:.2f})")
raise SystemExit(0 if all(same) else 1)
PY
  return $rc
}
stage device_runs 150 device_runs

# 4. Qwen2.5-7B / 0.5B-shaped random checkpoints (bf16), the batching benchmark up to 64 sessions (edge issue).
stage shape_7b 150 python3 -m gelato.benchmarks.qwen_shapes --shape 7b --out /tmp/qwen7b --device "$dev" --layers "$layers"
stage shape_05b 60 python3 -m gelato.benchmarks.qwen_shapes --shape 0.5b --out /tmp/qwen05b --device "$dev" --layers "$layers"
stage edge_batching 240 python3 -m gelato.benchmarks.edge_batching --target /tmp/qwen7b --drafter /tmp/qwen05b \
  --device "$dev" --dtype bfloat16 --sessions "$sessions" --unique-prompts 4 --k 4 \
  --max-new-tokens 64 --reps 3 --out "$out/edge_batching_$tag"

# 5. The same pair as two real processes on the GPU: per-round timings of a Qwen2.5-shaped round.
qwen_round() {
  edge_up /tmp/edge_qwen.log --target /tmp/qwen7b --device "$dev" --dtype bfloat16 || return 1
  python3 -m gelato.device.cli --edge 127.0.0.1:50051 --drafter /tmp/qwen05b --device "$dev" --dtype bfloat16 \
    --meter "$meter" --policy fixed-4 --json --max-new-tokens 64 --trace "$out/qwen_trace_$tag.jsonl" \
    "${prompts[@]}" > "$out/qwen_round_$tag.jsonl"
  local rc=$?
  edge_down /tmp/edge_qwen.log
  return $rc
}
stage qwen_round 120 qwen_round
echo "gpu_run.sh: done in $((SECONDS - t0))s, $failed stage(s) failed"
[ $failed = 0 ]
