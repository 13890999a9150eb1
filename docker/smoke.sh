#!/usr/bin/env bash
# The container smoke test, for real, with Podman (no Docker engine, no container registry needed):
#   bash docker/smoke.sh
# 1. tools: podman, buildah, runc, debootstrap from Debian's packages (installed when missing, as
#    root), podman-compose from PyPI into $GELATO_SMOKE_DIR/venv; CONTAINERS_CONF=docker/containers.conf.
# 2. base image localhost/gelato-base:bookworm from debootstrap (minbase + python3, python3-venv),
#    kept between runs (GELATO_SMOKE_REBUILD_BASE=1 makes it anew).
# 3. the edge and device images from docker/Dockerfile on that base, the host's CA bundle mounted
#    (PyPI through this network's TLS proxy), torch's CPU build from the local wheel folder of pip's
#    configuration when it has one (find-links), else from PyTorch's CPU index.
# 4. TLS + token secrets (docker/make-secrets.sh), then a local reference: the host's .venv runs an
#    edge and a device on loopback over a GSM8K slice (greedy, the built-in tiny pair).
# 5. compose up: the edge (TLS, token, published port, health checked with `gelato-edge
#    --health-check` inside the container) and the device on another network running the same slice
#    through the published port; its token ids must equal the local run's, prompt for prompt.
# 6. SIGTERM: `compose stop edge` must end the edge with exit status 0 after its drain; compose down.
# 7. prints the image sizes and the time of each step; the last line is PASS or FAIL.
# Variables: GELATO_SMOKE_DIR (work folder, default /var/tmp/gelato-smoke), GSM8K_DIR (default
# $GELATO_GSM8K_DIR, else ../shared/data/gsm8k from the repository), GELATO_LIMIT (3 questions),
# GELATO_MAX_NEW_TOKENS (48),
# GELATO_SMOKE_PORT (host port of the edge, default 50851), DEBIAN_MIRROR (debootstrap's mirror),
# GELATO_SMOKE_REBUILD_BASE=1 / GELATO_SMOKE_NO_CACHE=1 (a cold run: new base, no build cache).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${GELATO_SMOKE_DIR:-/var/tmp/gelato-smoke}
gsm8k_dir=${GSM8K_DIR:-${GELATO_GSM8K_DIR:-$repo/../shared/data/gsm8k}}
gsm8k=$(cd "$gsm8k_dir" 2>/dev/null && pwd) || {
  echo "smoke: no GSM8K folder at $gsm8k_dir (set GSM8K_DIR, or GELATO_GSM8K_DIR, to the folder holding test.jsonl)" >&2
  exit 2
}
limit=${GELATO_LIMIT:-3}
max_new=${GELATO_MAX_NEW_TOKENS:-48}
port=${GELATO_SMOKE_PORT:-50851}
base=localhost/gelato-base:bookworm
py=$repo/.venv/bin/python
export CONTAINERS_CONF=$repo/docker/containers.conf
mkdir -p "$work"
t0=$SECONDS
last=$SECONDS
times=()
step() {
  local now=$SECONDS
  [ ${#times[@]} -eq 0 ] || times[-1]+=" $((now - last)) s"
  last=$now
  times+=("$*:")
  printf '\n== [%4d s] %s\n' $((now - t0)) "$*"
}
fail() {
  echo "smoke: $*" >&2
  echo "FAIL"
  exit 1
}
[ -x "$py" ] || fail "no $py: run ./gelato.sh setup first (the local reference run uses it)"
[ -s "$gsm8k/test.jsonl" ] || fail "no $gsm8k/test.jsonl"

step "tools"
missing=()
for tool in podman buildah runc debootstrap openssl; do command -v "$tool" > /dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: install podman buildah runc debootstrap openssl (as root)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap openssl > /dev/null
fi
if [ ! -x "$work/venv/bin/podman-compose" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q podman-compose==1.6.0
fi
compose=("$work/venv/bin/podman-compose" -f "$repo/docker/compose.yaml")
podman --version
"${compose[@]}" --version | head -1

step "base image $base"
if [ "${GELATO_SMOKE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$base"; then
  rootfs=$work/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} > "$work/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  podman rmi -f "$base" > /dev/null 2>&1 || true
  tar -C "$rootfs" -c . | podman import - "$base" > /dev/null
  rm -rf "$rootfs"
else
  echo "kept (GELATO_SMOKE_REBUILD_BASE=1 rebuilds it)"
fi

step "images"
build=(podman build --format docker -f "$repo/docker/Dockerfile" --build-arg "BASE_IMAGE=$base")
[ "${GELATO_SMOKE_NO_CACHE:-0}" = 1 ] && build+=(--no-cache)
ca=/etc/ssl/certs/ca-certificates.crt
if [ -s "$ca" ]; then  # beside the image's own bundle, which a base without python replaces (apt)
  build+=(-v "$ca:/mnt/host-ca.crt:ro" --build-arg PIP_CERT=/mnt/host-ca.crt)
fi
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$repo/docker/Dockerfile")
links=""
for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
  if compgen -G "$dir/torch-$torch_version+cpu-*.whl" > /dev/null; then links=$dir; break; fi
done
if [ -n "$links" ]; then
  echo "torch $torch_version+cpu from the local wheel folder $links"
  build+=(-v "$links:/mnt/find-links:ro" --build-arg PIP_FIND_LINKS=/mnt/find-links --build-arg TORCH_INDEX_URL=)
else
  echo "torch $torch_version+cpu from PyTorch's CPU index"
fi
"${build[@]}" --target edge -t localhost/gelato-edge:latest "$repo" > "$work/build-edge.log" 2>&1 ||
  { tail -30 "$work/build-edge.log"; fail "edge image build failed (log: $work/build-edge.log)"; }
"${build[@]}" --target device -t localhost/gelato-device:latest "$repo" > "$work/build-device.log" 2>&1 ||
  { tail -30 "$work/build-device.log"; fail "device image build failed (log: $work/build-device.log)"; }
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^localhost/gelato-(edge|device):latest '

step "secrets and the local reference run"
rm -rf "$work/secrets"
bash "$repo/docker/make-secrets.sh" "$work/secrets" edge localhost 127.0.0.1
mkdir -p "$work/models"
slice=(--prompts-file "$gsm8k/test.jsonl" --limit "$limit" --max-new-tokens "$max_new" --json --threads 1)
edge_log=$work/local-edge.log
(cd "$repo" && exec "$py" -m gelato.edge.cli --port 0 --threads 1 > "$edge_log" 2>&1) &
edge_pid=$!
trap 'kill "$edge_pid" 2> /dev/null || true' EXIT
for _ in $(seq 120); do
  grep -q "listening on" "$edge_log" && break
  kill -0 "$edge_pid" 2> /dev/null || { cat "$edge_log"; fail "the local edge did not start"; }
  sleep 0.5
done
local_port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$edge_log" | head -1)
[ -n "$local_port" ] || fail "the local edge did not start: $(cat "$edge_log")"
(cd "$repo" && "$py" -m gelato.device.cli --edge "127.0.0.1:$local_port" "${slice[@]}" > "$work/local.jsonl") ||
  fail "the local device run failed"
kill "$edge_pid"
wait "$edge_pid" || true
trap - EXIT
echo "local: $(wc -l < "$work/local.jsonl") answers"

step "compose up: edge (TLS + token) on its network, health check inside the container"
export GELATO_SECRETS=$work/secrets GELATO_MODELS=$work/models GSM8K_DIR=$gsm8k
export GELATO_LIMIT=$limit GELATO_MAX_NEW_TOKENS=$max_new GELATO_EDGE_THREADS=1 GELATO_DEVICE_THREADS=1
export EDGE_PUBLISH=$port EDGE_ADDRESS=host.containers.internal:$port
"${compose[@]}" down -v > /dev/null 2>&1 || true
"${compose[@]}" up -d --no-build edge > "$work/compose-up.log" 2>&1 ||
  { cat "$work/compose-up.log"; fail "compose up edge failed"; }
edge_ctr=$(podman ps -q --filter label=io.podman.compose.project=gelato --filter label=com.docker.compose.service=edge)
[ -n "$edge_ctr" ] || fail "no edge container is running"
cleanup() { "${compose[@]}" down -v > /dev/null 2>&1 || true; }
trap cleanup EXIT
healthy=""
for _ in $(seq 90); do  # no systemd here to run the periodic check: run it as the timer would
  if podman healthcheck run "$edge_ctr" > /dev/null 2>&1; then healthy=1; break; fi
  sleep 2
done
podman logs "$edge_ctr" 2>&1 | grep -v systemd | tail -3
[ -n "$healthy" ] || fail "the edge container never became healthy"
podman inspect "$edge_ctr" --format 'edge health: {{.State.Health.Status}}, user {{.Config.User}}'
podman exec "$edge_ctr" gelato-edge --health-check

step "device container: the same slice through the edge's published port (network device-net)"
"${compose[@]}" run --rm -T device > "$work/container.jsonl" 2> "$work/container-device.log" ||
  { tail -20 "$work/container-device.log"; fail "the device container failed"; }
"$py" - "$work/local.jsonl" "$work/container.jsonl" "$limit" << 'EOF' || fail "the container run differs from the local run"
import json, sys
local, container = ([json.loads(line) for line in open(p) if line.startswith("{")] for p in sys.argv[1:3])
n = int(sys.argv[3])
assert len(local) == len(container) == n, f"{len(local)} local and {len(container)} container answers, {n} asked"
for i, (a, b) in enumerate(zip(local, container)):
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert a["token_ids"] == b["token_ids"], f"answer {i}: local {a['token_ids']} container {b['token_ids']}"
    print(f"answer {i}: {len(a['token_ids'])} tokens equal, {b['rounds']} rounds, acceptance {b['acceptance_rate']:.2f}")
print("container output == local output, token for token")
EOF

step "SIGTERM: compose stop edge drains and exits 0"
"${compose[@]}" stop edge > /dev/null 2>&1
code=$(podman inspect "$edge_ctr" --format '{{.State.ExitCode}}')
podman logs "$edge_ctr" 2>&1 | grep "shutting down" || fail "the edge did not log its shutdown"
[ "$code" = 0 ] || fail "the edge exited $code on SIGTERM"
echo "edge exit status $code"

step "compose down"
cleanup
trap - EXIT
step "done"
echo
echo "images:"
podman images --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'localhost/gelato-(base|edge|device)'
echo "times:"
printf '  %s\n' "${times[@]::${#times[@]}-1}"
echo "total $((SECONDS - t0)) s"
echo "PASS"
