"""`./gelato.sh setup` and the torch build (GELATO_TORCH): a venv holding the other build gets its
torch reinstalled. It did not: the CPU build (2.13.0+cpu) satisfies `torch==2.13.0`, so pip kept
it while the marker recorded the CUDA build (and the other way round).

Run on a copy of gelato.sh whose `.venv/bin/python` is a stand-in: `-m pip ...` is recorded, not
run, except that installing torch puts a fake torch in place (the CPU build from the CPU index, or
from a find-links wheel, FIND_LINKS_CPU; PyPI's CUDA build otherwise); anything else runs on this
Python without site-packages, `import torch` finding a fake torch (its `torch.version.cuda` set or
None, with its dist-info) or none at all. Nothing is installed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIN = re.search(r'^torch_req="([^"]+)"$', (ROOT / "gelato.sh").read_text(), re.M)
assert PIN, "gelato.sh sets torch_req"
TORCH_REQ = PIN.group(1)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The project's install, held to the torch just installed (a dependency cannot swap its build).
PROJECT = "install -q -e .[dev] -c .venv/torch-constraint.txt"

FAKE_PYTHON = """#!/bin/sh
case "$2" in *version_info*) [ -n "$OLD_PYTHON" ] && exit 1 ;; esac
if [ "$1" = -V ] && [ -n "$OLD_PYTHON" ]; then echo "Python 3.10.12"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
  [ -n "$NO_PIP" ] && { echo "No module named pip" >&2; exit 1; }
  shift 2; echo "$*" >> "$PIP_LOG"
  case "$*" in *--index-url*) [ -n "$CPU_INDEX_DOWN" ] && exit 1 ;; esac
  case "$*" in *"--timeout 5"*) [ -n "$CPU_INDEX_STALL" ] && exit 1 ;; esac
  case "$*" in *--index-url*) [ -n "$CPU_INDEX_BROKEN" ] && exit 1 ;; esac
  case "$*" in
    *" torch=="*)
      build=cuda
      case "$*" in *--index-url*) build=cpu ;; esac
      [ -n "$FIND_LINKS_CPU" ] && build=cpu
      exec "$REAL_PYTHON" -S "$FAKE_TORCH" "$build" ;;
  esac
  exit 0
fi
case "$2" in *urlopen*) echo "probe $3" >> "$PIP_LOG"; [ -z "$CPU_INDEX_DOWN" ]; exit $? ;; esac
if [ "$1" = -m ]; then case "$2" in gelato.benchmarks.demo|pytest) echo "ran $2" >> "$PIP_LOG"; exit 0 ;; esac; fi
exec "$REAL_PYTHON" -S "$@"
"""


# Puts a fake torch of build argv[1] (cpu/cuda) where the stand-in python imports it from.
FAKE_TORCH = """import os, shutil, sys
site, build = os.environ["PYTHONPATH"], sys.argv[1]
for name in os.listdir(site):
    shutil.rmtree(os.path.join(site, name))
os.makedirs(os.path.join(site, "torch"))
with open(os.path.join(site, "torch", "__init__.py"), "w") as f:
    f.write("from . import version\\n")
with open(os.path.join(site, "torch", "version.py"), "w") as f:
    f.write("cuda = %r\\n" % ("13.0" if build == "cuda" else None))
version = "2.13.0" + ("+cpu" if build == "cpu" else "")
info = os.path.join(site, "torch-%s.dist-info" % version)
os.makedirs(info)
with open(os.path.join(info, "METADATA"), "w") as f:
    f.write("Metadata-Version: 2.1\\nName: torch\\nVersion: %s\\n" % version)
"""


class Checkout:
    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copy(ROOT / "gelato.sh", root / "gelato.sh")
        (root / "pyproject.toml").write_text("[project]\nname = 'stand-in'\n")
        python = root / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
        self.marker = root / ".venv" / ".gelato-installed"
        self.pip_log = root / "pip.log"
        self.torch_path = root / "site"
        self.torch_path.mkdir()
        (root / "fake_torch.py").write_text(FAKE_TORCH)

    def installed(self, build: str) -> None:
        """What the last setup recorded: this pyproject.toml and `build`."""
        pins = (self.root / "pyproject.toml").read_bytes() + f"{TORCH_REQ}\n".encode()
        digest = hashlib.sha256(pins).hexdigest()[:16]
        self.marker.write_text(f"{digest}-{build}\n")
        (self.root / ".venv" / ".gelato-dev").write_text(f"{digest}-{build}\n")  # by `setup`: the dev tools too

    def has_torch(self, cuda: str | None) -> None:
        subprocess.run(
            [sys.executable, "-S", str(self.root / "fake_torch.py"), "cuda" if cuda else "cpu"],
            env={"PYTHONPATH": str(self.torch_path)},
            check=True,
        )

    def setup(
        self,
        torch: str,
        command: str = "setup",
        cpu_index_down: bool = False,
        stall: bool = False,
        broken: bool = False,
        driver: str | None = None,
        compute_cap: str | None = None,
        rc: int = 0,
        find_links_cpu: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[list[str], str]:
        """`GELATO_TORCH=torch ./gelato.sh setup`: pip's argument lines, and stderr. `driver`: an
        `nvidia-smi` on PATH that sees a GPU with this driver version (None: none on PATH)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GELATO_", "PYTHON", "PIP_"))}
        env.update(
            GELATO_TORCH=torch,
            PIP_LOG=str(self.pip_log),
            REAL_PYTHON=sys.executable,
            PYTHONPATH=str(self.torch_path),
            FAKE_TORCH=str(self.root / "fake_torch.py"),
        )
        env.update(extra_env or {})
        if find_links_cpu:  # a CPU wheel in pip's find-links: it satisfies the CUDA pin too
            env["FIND_LINKS_CPU"] = "1"
        bin_dir = self.root / "bin"  # PATH without any real nvidia-smi: the host's GPU must not decide
        bin_dir.mkdir(exist_ok=True)
        for tool in ("bash", "sha256sum", "cut", "cat", "head", "tr", "dirname", "env", "sh"):
            found = shutil.which(tool)
            if found and not (bin_dir / tool).exists():
                (bin_dir / tool).symlink_to(found)
        if driver is not None:
            smi = bin_dir / "nvidia-smi"
            cap = f'--query-gpu=compute_cap) echo "{compute_cap}";; ' if compute_cap else ""
            smi.write_text(f'#!/bin/sh\ncase "$1" in -L) echo "GPU 0: Fake";; {cap}*) echo "{driver}";; esac\n')
            smi.chmod(0o755)
        env["PATH"] = str(bin_dir)
        if broken:  # the index answers, every install from it fails (no wheel for this platform)
            env["CPU_INDEX_BROKEN"] = "1"
        if cpu_index_down:
            env["CPU_INDEX_DOWN"] = "1"
        if stall:  # the index answers, the quick install fails (a download that stalled 5 s)
            env["CPU_INDEX_STALL"] = "1"
        res = subprocess.run(
            ["bash", str(self.root / "gelato.sh"), command], env=env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == rc, res.stderr
        return (self.pip_log.read_text().splitlines() if self.pip_log.exists() else []), res.stderr

    def recorded(self) -> str:
        return self.marker.read_text().strip().rsplit("-", 1)[1]


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path)


def test_switching_to_the_cpu_build_replaces_a_cuda_torch(checkout: Checkout) -> None:
    checkout.installed("cuda")
    checkout.has_torch("12.8")
    pip, err = checkout.setup("cpu")
    forced = f"install -q --force-reinstall --no-deps --timeout 5 --retries 0 --index-url {CPU_INDEX} {TORCH_REQ}"
    assert forced in pip, pip
    assert pip[-1] == PROJECT, pip  # brings what the new build needs
    assert "replacing the cuda build of torch in .venv with the cpu build" in err
    assert checkout.recorded() == "cpu"


def test_switching_to_the_cuda_build_replaces_a_cpu_torch(checkout: Checkout) -> None:
    checkout.installed("cpu")
    checkout.has_torch(None)
    pip, err = checkout.setup("cuda")
    assert f"install -q --force-reinstall --no-deps {TORCH_REQ}" in pip, pip
    assert pip[-1] == PROJECT, pip  # the nvidia-* wheels the CUDA build requires
    assert "replacing the cpu build of torch in .venv with the cuda build" in err
    assert checkout.recorded() == "cuda"


def test_the_same_build_is_not_reinstalled(checkout: Checkout) -> None:
    """pyproject.toml changed, the build did not: pip keeps the torch there."""
    checkout.marker.write_text("0123456789abcdef-cpu\n")
    checkout.has_torch(None)
    pip, err = checkout.setup("cpu")
    assert f"install -q --no-deps --timeout 5 --retries 0 --index-url {CPU_INDEX} {TORCH_REQ}" in pip, pip
    assert not any("--force-reinstall" in line for line in pip) and "replacing" not in err, pip


def test_a_venv_without_torch_installs_it_plainly(checkout: Checkout) -> None:
    pip, _ = checkout.setup("cuda")
    assert f"install -q {TORCH_REQ}" in pip and not any("--force-reinstall" in line for line in pip), pip
    assert checkout.recorded() == "cuda"


def test_an_unchanged_setup_installs_nothing(checkout: Checkout) -> None:
    checkout.installed("cpu")
    checkout.has_torch(None)
    checkout.pip_log.write_text("")
    pip, _ = checkout.setup("cpu")
    assert pip == []


def test_the_demo_installs_no_test_tools_and_the_tests_add_them_once(checkout: Checkout) -> None:
    """`demo` installs the project alone (a tool without a wheel for this platform cannot stop it);
    `test` adds the dev tools over it, without touching torch, once; neither reinstalls after."""
    pip, _ = checkout.setup("cpu", command="demo")
    assert pip[-2:] == ["install -q -e . -c .venv/torch-constraint.txt", "ran gelato.benchmarks.demo"], pip
    checkout.pip_log.write_text("")
    pip, err = checkout.setup("cpu", command="test")
    assert pip == [PROJECT, "ran pytest"] and "installing the test tools" in err, pip
    for command in ("test", "demo", "setup"):
        checkout.pip_log.write_text("")
        pip, _ = checkout.setup("cpu", command=command)
        assert pip in ([], [f"ran {'pytest' if command == 'test' else 'gelato.benchmarks.demo'}"]), (command, pip)
    # A new pin reinstalls for the demo alone again, and the tests then add their tools again.
    (checkout.root / "pyproject.toml").write_text("[project]\nname = 'stand-in'\nversion = '2'\n")
    checkout.pip_log.write_text("")
    pip, _ = checkout.setup("cpu", command="demo")
    assert "install -q -e . -c .venv/torch-constraint.txt" in pip and PROJECT not in pip, pip
    checkout.pip_log.write_text("")
    pip, _ = checkout.setup("cpu", command="test")
    assert pip == [PROJECT, "ran pytest"], pip


def test_a_cpu_build_that_fell_back_to_pypi_is_tried_again(checkout: Checkout) -> None:
    """The CPU index did not answer: PyPI's build went in, which is not the CPU build asked for;
    the marker says so, so the next setup (index back) installs the CPU build (once the marker
    recorded `cpu` and nothing ever switched)."""
    checkout.installed("cuda")
    checkout.has_torch("12.8")
    _, err = checkout.setup("cpu", cpu_index_down=True)
    assert "did not answer; installing" in err and checkout.recorded() == "pypi"
    checkout.pip_log.write_text("")
    pip, _ = checkout.setup("cpu")
    assert any(f"--index-url {CPU_INDEX} {TORCH_REQ}" in line for line in pip), pip
    assert checkout.recorded() == "cpu"


def test_a_stalled_cpu_download_is_retried_not_replaced_by_the_cuda_build(checkout: Checkout) -> None:
    """The quick first try (5 s timeout, no retries) failed while the CPU index answers: the CPU
    build is installed with pip's usual patience; the fallback to PyPI's several-GB CUDA build
    is only for an index that does not answer."""
    pip, err = checkout.setup("cpu", stall=True)
    quick, probe, patient = (i for i, line in enumerate(pip) if CPU_INDEX in line)
    assert "--timeout 5" in pip[quick] and pip[probe] == f"probe {CPU_INDEX}"
    assert pip[patient].endswith(f"--index-url {CPU_INDEX} {TORCH_REQ}") and "--timeout" not in pip[patient]
    assert "did not answer" not in err and checkout.recorded() == "cpu"
    assert not any(line.endswith(f" {TORCH_REQ}") and CPU_INDEX not in line for line in pip), pip


@pytest.mark.parametrize(("driver", "build"), [("550.54.15", "cpu"), ("580.65.06", "cuda"), (None, "cpu")])
def test_auto_takes_the_cuda_build_only_for_a_driver_that_runs_it(
    checkout: Checkout, driver: str | None, build: str
) -> None:
    """GELATO_TORCH=auto: a GPU whose driver is older than CUDA 13.0 needs (< 580) gets the CPU
    build, with a message, not several GB of wheels and a torch that sees no GPU."""
    pip, err = checkout.setup("auto", driver=driver)
    assert checkout.recorded() == build
    cpu_index = any(CPU_INDEX in line for line in pip)
    assert cpu_index == (build == "cpu"), pip
    assert ("is older than the 580" in err) == (driver == "550.54.15"), err


@pytest.mark.parametrize(("cap", "build"), [("7.0", "cpu"), ("6.1", "cpu"), ("7.5", "cuda"), ("9.0", "cuda")])
def test_auto_takes_the_cuda_build_only_for_a_gpu_it_has_kernels_for(checkout: Checkout, cap: str, build: str) -> None:
    """A V100 (7.0) or a GTX 10xx (6.1) on driver 580: PyPI's CUDA 13.0 build has no kernels for it
    (it starts at Turing, 7.5), so auto took several GB of wheels and a torch that failed at its
    first kernel."""
    pip, err = checkout.setup("auto", driver="580.65.06", compute_cap=cap)
    assert checkout.recorded() == build
    assert any(CPU_INDEX in line for line in pip) == (build == "cpu"), pip
    assert (f"compute capability {cap} is below the 7.5" in err) == (build == "cpu"), err


def test_a_cpu_index_that_answers_but_fails_is_an_error_not_the_cuda_build(checkout: Checkout) -> None:
    """The CPU index answers, yet installing from it fails (no wheel for this Python or platform):
    an error naming the way out, not PyPI's several-GB CUDA build on a machine that asked for CPU."""
    pip, err = checkout.setup("cpu", broken=True, rc=2)
    assert "answers but installing" in err and "GELATO_TORCH=skip" in err, err
    assert not any(line.endswith(f" {TORCH_REQ}") and CPU_INDEX not in line for line in pip), pip
    assert not checkout.marker.exists()


def test_a_new_torch_pin_reaches_an_existing_venv(checkout: Checkout) -> None:
    """The marker records the torch pin too: a venv whose marker does not name this pin (made by
    a gelato.sh with another pin, whose marker covered pyproject.toml alone; same build) is
    installed again, not kept on its old torch."""
    digest = hashlib.sha256((checkout.root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    checkout.marker.write_text(f"{digest}-cpu\n")
    checkout.has_torch(None)
    pip, _ = checkout.setup("cpu")
    assert any(line.endswith(f"--index-url {CPU_INDEX} {TORCH_REQ}") for line in pip), pip


def test_a_build_other_than_the_one_asked_for_is_an_error(checkout: Checkout) -> None:
    """A CPU wheel in pip's find-links satisfies the CUDA pin (2.13.0+cpu matches torch==2.13.0
    and sorts above it): pip takes it, and the venv was recorded as CUDA, never repaired."""
    _, err = checkout.setup("cuda", find_links_cpu=True, rc=2)
    assert "asked for the cuda build of torch but pip installed the cpu build" in err, err
    assert not checkout.marker.exists()


def test_the_project_install_is_held_to_the_torch_just_installed(checkout: Checkout) -> None:
    """The project's dependencies are resolved with the installed torch as a constraint (exactly
    its version and build): one that wanted another torch would fail, not swap PyPI's CUDA build
    in under a venv recorded as CPU."""
    pip, _ = checkout.setup("cpu")
    assert pip[-1] == PROJECT, pip
    assert (checkout.root / ".venv" / "torch-constraint.txt").read_text() == "torch==2.13.0+cpu\n"
    assert checkout.recorded() == "cpu"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OLD_PYTHON": "1"}, "gelato.sh: .venv holds Python 3.10.12 and GELATO needs Python >= 3.11: delete .venv"),
        ({"NO_PIP": "1"}, "gelato.sh: .venv has no working pip (made by another tool, or a setup cut short?)"),
    ],
)
def test_a_venv_this_script_cannot_use_is_named_before_any_install(
    checkout: Checkout, env: dict[str, str], says: str
) -> None:
    """A .venv made by another tool without pip, or from Python 3.10: one line naming the fix,
    nothing installed (it failed in pip at every run, or after downloading torch)."""
    pip, err = checkout.setup("cpu", rc=2, extra_env=env)
    assert says in err and pip == [], (err, pip)


def test_the_test_tools_over_a_venv_without_a_constraint_file_write_it(checkout: Checkout) -> None:
    """A venv set up for the demo by a version of this script that wrote no constraint file: the
    test tools' install would fail on the missing `-c` file at every run."""
    checkout.installed("cpu")
    checkout.has_torch(None)
    (checkout.root / ".venv" / ".gelato-dev").write_text("")  # the demo's setup: no test tools yet
    pip, _ = checkout.setup("cpu")
    assert pip == [PROJECT], pip
    assert (checkout.root / ".venv" / "torch-constraint.txt").read_text().strip() == "torch==2.13.0+cpu"


def test_a_gelato_python_the_existing_venv_was_not_made_from_is_said(checkout: Checkout) -> None:
    """GELATO_PYTHON only makes a venv: with one already here it was ignored without a word."""
    checkout.installed("cpu")
    checkout.has_torch(None)
    other = checkout.root / "python3.99"
    other.write_text("#!/bin/sh\necho 3.99\n")
    other.chmod(0o755)
    _, err = checkout.setup("cpu", extra_env={"GELATO_PYTHON": str(other)})
    assert "is kept; GELATO_PYTHON" in err and "Python 3.99) only picks the interpreter" in err, err
    _, err = checkout.setup("cpu", extra_env={"GELATO_PYTHON": sys.executable})  # the venv's own version
    assert "GELATO_PYTHON" not in err, err
