#!/usr/bin/env bash
# GELATO's two quickstart commands (and CI's entry to the tests):
#   ./gelato.sh demo [ARGS]   edge + device processes on the embedded tiny pair, a results table
#   ./gelato.sh test [ARGS]   the test suite (pytest ARGS)
# Both create ./.venv on first use with torch 2.13.0 (CPU) and the project installed editable;
# later runs reuse it while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
py=$venv/bin/python

setup() {
  if [ ! -x "$py" ]; then
    python3 -m venv "$venv"
  fi
  local want have
  want=$(sha256sum pyproject.toml | cut -c1-16)
  have=$(cat "$venv/.gelato-installed" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "gelato.sh: installing into $venv (first run takes a few minutes)" >&2
    "$py" -m pip install -q --upgrade pip
    # torch first and pinned: a plain 'torch' would pull a multi-GB CUDA build.
    "$py" -m pip install -q "torch==2.13.0"
    "$py" -m pip install -q -e ".[dev]"
    echo "$want" > "$venv/.gelato-installed"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup; exec "$py" -m benchmarks.demo "$@" ;;
  test) setup; exec "$py" -m pytest -q "$@" ;;
  setup) setup ;;
  *) echo "usage: ./gelato.sh demo|test|setup [ARGS]" >&2; exit 2 ;;
esac
