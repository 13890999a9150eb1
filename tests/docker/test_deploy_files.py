"""docker/: the files an operator deploys from agree with the CLIs. A misspelt GELATO_* variable
would be ignored silently, so every one named in the Dockerfile and compose.yaml must be a real
option's; compose keeps the edge and the device on separate networks, the edge's key out of the
device; the image pins every runtime dependency within pyproject.toml's ranges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from gelato.device.cli import build_parser as device_parser
from gelato.edge.cli import build_parser as edge_parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ROOT = DOCKER.parent


def known_variables() -> set[str]:
    return set(edge_parser().env_names().values()) | set(device_parser().env_names().values())  # type: ignore[attr-defined]


def test_every_gelato_variable_is_an_option() -> None:
    known = known_variables()
    for path in (DOCKER / "Dockerfile", DOCKER / "compose.yaml"):
        named = set(re.findall(r"\bGELATO_(?:EDGE|DEVICE)_[A-Z0-9_]+", path.read_text()))
        assert named, path
        assert named <= known, f"{path.name}: {sorted(named - known)} set no option"


def test_compose_services() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    edge, device = spec["services"]["edge"], spec["services"]["device"]
    assert set(edge["networks"]).isdisjoint(device["networks"])  # joined only through the published port
    assert edge["ports"] and not device.get("ports")
    assert edge["healthcheck"]["test"] == ["CMD", "gelato-edge", "--health-check"]
    assert edge["build"]["target"] == "edge" and device["build"]["target"] == "device"
    assert all(k in edge["environment"] for k in ("GELATO_EDGE_TLS_CERT", "GELATO_EDGE_AUTH_TOKEN_FILE"))
    assert not any("edge.key" in v for v in device["volumes"])  # the device never sees the edge's key
    grace = float(edge["environment"]["GELATO_EDGE_SHUTDOWN_GRACE_S"])
    assert grace < float(edge["stop_grace_period"].removesuffix("s"))  # the drain ends before the kill
    assert any(v.endswith(":/data/gsm8k:ro") for v in device["volumes"])  # mounted read-only, never copied
    # No writable volume is shared: a device that could write the edge's hub cache could swap its weights.
    writable = [{v.split(":")[0] for v in svc["volumes"] if not v.endswith(":ro")} for svc in (edge, device)]
    assert writable[0].isdisjoint(writable[1]), writable


def test_the_docker_engine_override_maps_the_default_edge_address() -> None:
    """Docker Engine on Linux names the host nothing: the override maps the host name that
    compose.yaml's default EDGE_ADDRESS uses (Podman's), on the device alone, and changes nothing else."""
    base = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["device"]
    override = yaml.safe_load((DOCKER / "compose.docker.yaml").read_text())
    default = re.fullmatch(r"\$\{EDGE_ADDRESS:-([^:}]+):(\d+)\}", base["environment"]["GELATO_DEVICE_EDGE"])
    assert default is not None
    assert override == {"services": {"device": {"extra_hosts": [f"{default.group(1)}:host-gateway"]}}}


def test_dockerfile_basics() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert re.search(r"^USER 10001", text, re.M) and "--no-cache-dir" in text
    assert "HEALTHCHECK" in text and '["gelato-edge", "--health-check"]' in text
    assert {m for m in re.findall(r"^FROM .* AS (\w[\w-]*)$", text, re.M)} >= {"edge", "device"}


def _seconds(duration: str) -> float:
    """A Docker duration such as `15s`, `30m` or `1h` in seconds."""
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return float(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_healthcheck_agrees_and_waits_out_a_download() -> None:
    """The image's HEALTHCHECK and compose's healthcheck time the same probe; the start period covers
    a first start that downloads a 7B target from the hub (failures in it do not count)."""
    line = re.search(r"^HEALTHCHECK (.*) CMD", (DOCKER / "Dockerfile").read_text(), re.M)
    assert line, "no HEALTHCHECK"
    image = dict(re.findall(r"--([a-z-]+)=(\S+)", line.group(1)))
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["edge"]["healthcheck"]
    for key in ("interval", "timeout", "start_period"):
        assert _seconds(image[key.replace("_", "-")]) == _seconds(compose[key]), key
    assert int(image["retries"]) == compose["retries"]
    assert _seconds(compose["start_period"]) >= 1200


def test_build_context_holds_what_the_images_copy_and_no_secrets() -> None:
    """Every COPY source is in the repository and not left out of the build context by
    .dockerignore; LICENSE and NOTICE travel into the wheel (NOTICE credits GSM8K); the secrets
    and models the compose file mounts, and the virtual environment, stay out of the context."""
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    assert {"LICENSE", "NOTICE", "pyproject.toml", "README.md"} <= set(sources), sources
    for src in sources:
        assert list(ROOT.glob(src)), f"COPY {src}: not in the repository"
        assert not any(src == pat or src.startswith(pat + "/") for pat in ignored), f"COPY {src} is .dockerignored"
    assert {"docker/secrets", "docker/models", ".venv", ".git"} <= set(ignored)


def test_image_pins_every_dependency_within_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"not pinned exactly: {line}"
            pins[re.sub(r"[-_.]+", "-", req.name).lower()] = spec[0].version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = re.sub(r"[-_.]+", "-", dep.name).lower()
        if name == "torch":  # pinned per variant by the Dockerfile's TORCH_VERSION
            version = re.search(r"^ARG TORCH_VERSION=(\S+)$", (DOCKER / "Dockerfile").read_text(), re.M)
            assert version and dep.specifier.contains(version.group(1)), (dep, version)
            continue
        assert name in pins, f"{dep.name} is not pinned in docker/requirements.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {dep}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[_norm(req.name)] = next(iter(req.specifier)).version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_image_pins_the_whole_dependency_closure_and_its_python() -> None:
    """Every package the installed `gelato` pulls in (its dependencies' dependencies too, extras
    off, torch's own left to the torch variant) is pinned: once transformers' `kernels` and its
    `tomlkit` were not, and pip chose them at build time. And the Python the Dockerfile's check
    asks for satisfies every pinned package's Requires-Python (once it said 3.10, which the pinned
    transformers refuses)."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    pins, seen, todo = _pins(), set(), ["gelato"]
    while todo:
        dist = metadata.distribution(todo.pop())
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _norm(req.name)
            if name in seen or name == "torch":
                continue
            seen.add(name)
            todo.append(req.name)
    assert sorted(seen - set(pins)) == [], "installed dependencies missing from docker/requirements.txt"
    check = re.search(r"sys\.version_info >= \((\d+), (\d+)\)", (DOCKER / "Dockerfile").read_text())
    assert check, "the Dockerfile's python stage checks the base's python3"
    floor = f"{check.group(1)}.{check.group(2)}"
    for name in sorted(seen):
        needs = metadata.distribution(name).metadata.get("Requires-Python")
        assert not needs or SpecifierSet(needs).contains(floor), f"{name} needs Python {needs}, the image: {floor}"


def test_build_arguments_stay_out_of_the_images_history() -> None:
    """An index URL given as a build argument (a mirror's, credentials included) is recorded in
    the history of every layer built after its ARG in that stage and the stages built FROM it:
    the edge and device images must not descend from the stage that declares them (once they did:
    `docker history --no-trunc` showed the URL); they take its /opt/gelato by COPY --from only."""
    stages: dict[str, tuple[str, set[str]]] = {}  # name -> (parent, ARGs declared)
    current = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if m := re.match(r"^FROM (\S+) AS (\S+)$", line):
            current = m.group(2)
            stages[current] = (m.group(1), set())
        elif (m := re.match(r"^ARG (\w+)", line)) and current:
            stages[current][1].add(m.group(1))
    private = {"PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "TORCH_INDEX_URL"}
    assert any(private <= args for _, args in stages.values()), "the stage that installs takes them"
    for image in ("edge", "device"):
        name, chain = image, []
        while name in stages:
            chain.append(name)
            parent, args = stages[name]
            assert not args & private, f"{image} descends from {name}, which declares {sorted(args & private)}"
            name = parent
        assert len(chain) >= 3, chain


def test_a_cuda_image_with_a_cpu_torch_stops_the_build() -> None:
    """`TORCH_VARIANT=cuda` asks for `torch==2.13.0`, which a `+cpu` wheel in `PIP_FIND_LINKS` also
    satisfies (pip chose it in a dry run): the image then ran on the CPU without a word. The deps
    stage's own check, run here as the build runs it, against this CPU-only torch."""
    import os
    import subprocess
    import sys

    import torch

    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", "")
    check = re.search(r'python -c "(import os, sys, torch;.*?)"', text)
    assert check, "the deps stage checks the torch it installed"
    assert torch.version.cuda is None  # this suite's torch is the CPU build
    for variant, code in (("cuda", 1), ("cpu", 0)):
        env = {**os.environ, "TORCH_VARIANT": variant}
        res = subprocess.run([sys.executable, "-c", check.group(1)], env=env, capture_output=True, text=True)
        assert res.returncode == code, (variant, res.stderr)
        assert ("TORCH_VARIANT=cuda installed a CPU-only torch" in res.stderr) == (variant == "cuda")
