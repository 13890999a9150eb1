#!/usr/bin/env bash
# GELATO's two quickstart commands (and CI's entry to the tests):
#   ./gelato.sh demo [ARGS]   edge + device processes on the embedded tiny pair, a results table
#   ./gelato.sh test [ARGS]   the test suite (pytest ARGS)
# Both create ./.venv on first use with torch 2.13.0 and the project installed editable (`test`
# and `setup` with its dev tools too: pytest, the linters, the stub generator; `demo` needs none of
# them, so a platform without a wheel for one still runs it); later runs reuse it while
# pyproject.toml, the torch pin and the torch choice are unchanged.
#
# Which torch build: on PyPI, torch for Linux is the CUDA build (several GB of nvidia-* wheels).
# GELATO_TORCH=auto (default) takes the CUDA build where `nvidia-smi` sees a GPU whose driver runs
# it (>= 580: PyPI's torch 2.13.0 is built for CUDA 13.0) and the CPU build otherwise, from
# PyTorch's CPU wheel index (asked with a short timeout and no retries; when it cannot be reached,
# PyPI with a message; when it answers but the install fails, an error rather than PyPI's CUDA
# build on a machine that asked for the CPU one). Torch alone comes from that index (--no-deps): its
# dependencies, as the project's, come from PyPI. A wheel folder in your pip configuration
# (find-links) is used either way, and the build installed is checked against the one asked for.
# GELATO_TORCH=cpu|cuda forces a build (a venv holding the other one has its torch reinstalled);
# GELATO_TORCH=skip keeps what is there. The project's install is constrained to the torch just
# installed: a dependency that asks for another torch is an error, not a silent swap of builds.
# The venv is made from GELATO_PYTHON (default python3), which must be Python >= 3.11.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
py=$venv/bin/python
torch_req="torch==2.13.0"
torch_cpu_index="https://download.pytorch.org/whl/cpu"
cuda_min_driver=580  # CUDA 13.0, what PyPI's $torch_req is built for, needs this NVIDIA driver
cuda_min_cap=75      # and its kernels start at compute capability 7.5 (Turing)

torch_build() {
  local choice=${GELATO_TORCH:-auto}
  if [ "$choice" = auto ]; then
    choice=cpu
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      choice=cuda
      # An older driver would get several GB of wheels and a torch that sees no GPU.
      local driver
      driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)
      if [[ ${driver%%.*} =~ ^[0-9]+$ ]] && [ "${driver%%.*}" -lt "$cuda_min_driver" ]; then
        echo "gelato.sh: NVIDIA driver $driver is older than the $cuda_min_driver PyPI's CUDA build of" \
          "$torch_req needs: taking the CPU build (update the driver, or set GELATO_TORCH=cuda)" >&2
        choice=cpu
      fi
      # CUDA 13.0 builds no kernels for GPUs before Turing (compute capability < 7.5: Maxwell,
      # Pascal, Volta), which driver 580 still runs: torch would see the GPU and fail at its first
      # kernel ("no kernel image is available").
      local cap
      cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)
      if [ "$choice" = cuda ] && [[ $cap =~ ^([0-9]+)\.([0-9]+)$ ]] \
        && [ $((BASH_REMATCH[1] * 10 + BASH_REMATCH[2])) -lt "$cuda_min_cap" ]; then
        echo "gelato.sh: the GPU's compute capability $cap is below the 7.5 PyPI's CUDA build of" \
          "$torch_req has kernels for: taking the CPU build (or set GELATO_TORCH=skip with a torch built for it)" >&2
        choice=cpu
      fi
    fi
  fi
  case "$choice" in
    cpu|cuda|skip) echo "$choice" ;;
    *) echo "gelato.sh: GELATO_TORCH must be auto, cpu, cuda or skip (got '$choice')" >&2; exit 2 ;;
  esac
}

# The build of the torch in the venv: cuda (torch.version.cuda set), cpu (none: the CPU build, or
# ROCm's, which GELATO_TORCH does not offer), or nothing when the venv has no (importable) torch.
installed_torch_build() {
  "$py" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true
}

# pip's extra arguments to install torch build $1 over what the venv has. The other build satisfies
# the same pin (2.13.0+cpu satisfies torch==2.13.0), so pip would keep it: reinstall torch itself
# then (--no-deps: the dependencies it lacks, e.g. the nvidia-* wheels of the CUDA build, come with
# the project's install that follows, which resolves the installed torch's requirements).
torch_switch_args() {
  local have
  have=$(installed_torch_build)
  if [ -n "$have" ] && [ "$have" != "$1" ]; then
    echo "gelato.sh: replacing the $have build of torch in $venv with the $1 build" >&2
    echo "--force-reinstall --no-deps"
  fi
}

# The build install_torch really put in (what setup records): the one asked for, or `pypi` when
# the CPU index did not answer and PyPI's build was taken instead (the next setup tries again).
torch_got=""

# Whether PyTorch's CPU index answers at all (5 s), through the proxy settings pip would use.
index_answers() {
  "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
    "$torch_cpu_index" >/dev/null 2>&1
}

install_torch() {
  torch_got=$1
  local switch=""
  if [ "$1" != skip ]; then switch=$(torch_switch_args "$1"); fi
  # shellcheck disable=SC2086  # $switch unquoted on purpose: no words, or the two options
  case "$1" in
    skip)
      # Without a torch already there, installing the project would pull PyPI's (CUDA) build.
      if ! "$py" -c "import torch" >/dev/null 2>&1; then
        echo "gelato.sh: GELATO_TORCH=skip keeps the torch in $venv, but it has none:" \
          "install one into it first, or set GELATO_TORCH=cpu|cuda" >&2
        exit 2
      fi
      echo "gelato.sh: GELATO_TORCH=skip: keeping the installed torch" >&2 ;;
    cuda) "$py" -m pip install -q $switch "$torch_req" ;;  # PyPI's Linux wheel is the CUDA build
    cpu)
      # Asked quickly first (an unreachable index costs 5 s, not minutes of retries); a failure
      # while the index does answer (a download that stalled) is retried with pip's usual
      # patience, so that one slow moment does not cost the CUDA build's gigabytes.
      # --no-deps: the index mirrors torch's dependencies only partly (a setuptools or sympy
      # version torch needs may be missing there); they come from PyPI with the project. ($switch
      # has it already when it forces the reinstall.)
      local only_torch=${switch:---no-deps}
      if "$py" -m pip install -q $only_torch --timeout 5 --retries 0 --index-url "$torch_cpu_index" "$torch_req"; then
        :
      elif index_answers; then
        if ! "$py" -m pip install -q $only_torch --index-url "$torch_cpu_index" "$torch_req"; then
          echo "gelato.sh: PyTorch's CPU index answers but installing $torch_req from it failed (pip's" \
            "error above): not taking PyPI's CUDA build instead; set GELATO_TORCH=cuda for that, or" \
            "install a torch into $venv and set GELATO_TORCH=skip" >&2
          exit 2
        fi
      else
        echo "gelato.sh: PyTorch's CPU index did not answer; installing $torch_req from PyPI instead" \
          "(on Linux that is the CUDA build, several GB)" >&2
        "$py" -m pip install -q "$torch_req"  # not forced: over a CUDA build that would fetch it again
        torch_got=pypi
      fi ;;
  esac
}

# The build installed is the one asked for: a CPU wheel in a find-links folder satisfies the CUDA
# pin too (2.13.0+cpu matches torch==2.13.0 and sorts above it), and the reverse can come from an
# extra index. A mismatch would be recorded as the build asked for and never repaired. After the
# project's install: a torch installed without its dependencies does not import before.
check_torch_build() {
  local have
  have=$(installed_torch_build)
  case "$1" in
    cpu|cuda)
      if [ "$have" != "$1" ]; then
        echo "gelato.sh: asked for the $1 build of torch but pip installed the ${have:-no} build (a wheel" \
          "in your pip configuration's find-links or extra index?); install the $1 build into $venv and set" \
          "GELATO_TORCH=skip, or set GELATO_TORCH to the build you have" >&2
        exit 2
      fi ;;
  esac
}

# The installed torch as a pip constraint (e.g. torch==2.13.0+cpu), so that the project's install
# keeps exactly the build chosen above.
torch_constraint() {
  "$py" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))'
}

digest() {  # sha256 of stdin, on Linux (sha256sum) and macOS (shasum)
  if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi
}

# The interpreter the venv is made from: $GELATO_PYTHON, else python3. Checked before anything is
# installed, so that an old one fails here in one line rather than deep inside pip.
check_python() {
  local base=${GELATO_PYTHON:-python3}
  if ! command -v "$base" >/dev/null 2>&1; then
    echo "gelato.sh: $base not found; GELATO needs Python >= 3.11 (set GELATO_PYTHON to its path)" >&2
    exit 2
  fi
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "gelato.sh: GELATO needs Python >= 3.11, and $base is $("$base" -V 2>&1);" \
      "set GELATO_PYTHON to a newer one" >&2
    exit 2
  fi
  if ! "$base" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "gelato.sh: $base cannot make a virtual environment (on Debian/Ubuntu: apt install python3-venv)" >&2
    exit 2
  fi
  echo "$base"
}

py_version() {  # MAJOR.MINOR of interpreter $1, "unknown" when it does not run
  local v
  v=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
  echo "${v:-unknown}"
}

setup() {
  local extras=${1:-}  # dev: the test tools too
  if [ ! -x "$py" ]; then
    local base
    base=$(check_python)
    "$base" -m venv "$venv"
  elif [ -n "${GELATO_PYTHON:-}" ] && [ "$(py_version "$py")" != "$(py_version "$GELATO_PYTHON")" ]; then
    # GELATO_PYTHON makes a venv; one already here is kept, which must not pass unsaid.
    echo "gelato.sh: note: $venv (Python $(py_version "$py")) is kept; GELATO_PYTHON ($GELATO_PYTHON, Python" \
      "$(py_version "$GELATO_PYTHON")) only picks the interpreter a new one is made from: rm -rf $venv to remake it" >&2
  fi
  local want have build
  build=$(torch_build)
  # What was installed: the project's dependencies, the torch pin and the build (a new pin in
  # this script, e.g. torch 2.14, must reach venvs made before it).
  want="$({ cat pyproject.toml; echo "$torch_req"; } | digest | cut -c1-16)-$build"
  have=$(cat "$venv/.gelato-installed" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "gelato.sh: installing into $venv (first run takes a few minutes)" >&2
    # A .venv this script did not make (uv, an IDE, an older Python) or a setup cut short: said in
    # one line before anything is installed, not deep inside pip at every run.
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      echo "gelato.sh: $venv holds $("$py" -V 2>&1) and GELATO needs Python >= 3.11: delete $venv" \
        "(rm -rf $venv) and run again (GELATO_PYTHON picks the interpreter)" >&2
      exit 2
    fi
    if ! "$py" -m pip install -q --upgrade pip; then
      echo "gelato.sh: $venv has no working pip (made by another tool, or a setup cut short?): delete" \
        "$venv (rm -rf $venv) and run again" >&2
      exit 2
    fi
    # torch first, the chosen build: left to the project's dependencies, pip would take PyPI's.
    install_torch "$build"
    torch_constraint > "$venv/torch-constraint.txt"  # a failure here stops setup (set -e)
    "$py" -m pip install -q -e ".${extras:+[$extras]}" -c "$venv/torch-constraint.txt"
    check_torch_build "$torch_got"
    : > "$venv/.gelato-dev"  # the test tools: none recorded yet
    echo "${want%-*}-$torch_got" > "$venv/.gelato-installed"  # not the build asked for: tried again next time
  elif [ -n "$extras" ] && [ "$(cat "$venv/.gelato-dev" 2>/dev/null || true)" != "$have" ]; then
    # Installed for the demo alone: the test tools now, held to the torch there.
    echo "gelato.sh: installing the test tools into $venv" >&2
    # Venvs set up by older versions of this script have no constraint file: written from their torch.
    [ -f "$venv/torch-constraint.txt" ] || torch_constraint > "$venv/torch-constraint.txt"
    "$py" -m pip install -q -e ".[$extras]" -c "$venv/torch-constraint.txt"
  fi
  if [ -n "$extras" ]; then
    cat "$venv/.gelato-installed" > "$venv/.gelato-dev"  # what the tools were installed on
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup; exec "$py" -m gelato.benchmarks.demo "$@" ;;
  test) setup dev; exec "$py" -m pytest -q "$@" ;;
  setup) setup dev ;;
  *) echo "usage: ./gelato.sh demo|test|setup [ARGS]" >&2; exit 2 ;;
esac
