"""The project's own suite: real engine and real QEMU, or a failure under CI.

Tests marked ``docker`` need a Docker engine, ``podman`` Podman, and ``qemu`` qemu-system. On a
developer's machine without them they skip with the reason; under ``CI=true`` they fail, so a
green CI run always means the integration tests ran.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.cache
def engine_problem(kind: str = "docker") -> str | None:
    from pytest_epics_multiarch.engine import Engine
    from pytest_epics_multiarch.errors import EngineError

    try:
        engine = Engine.connect(choice=kind)
    except EngineError as exc:
        return str(exc)
    try:
        if engine.kind != kind:
            return f"the engine at {engine.url} is {engine.kind}, not {kind}"
    finally:
        engine.close()
    return None


def podman_problem() -> str | None:
    if shutil.which("podman") is None:
        return "no podman command (make setup installs Debian's podman)"
    return engine_problem("podman")


def qemu_problem() -> str | None:
    if shutil.which("qemu-system-ppc64") and shutil.which("qemu-system-ppc"):
        return None
    return "qemu-system-ppc64/qemu-system-ppc not on PATH (make setup installs Debian's qemu-system-ppc)"


@pytest.fixture(autouse=True)
def _require_marked_prerequisites(request: pytest.FixtureRequest) -> None:
    checks = {"docker": engine_problem, "podman": podman_problem, "qemu": qemu_problem}
    for marker, check in checks.items():
        if request.node.get_closest_marker(marker) is None:
            continue
        problem = check()
        if problem is None:
            continue
        if IN_CI:
            pytest.fail(f"CI=true but this {marker} test cannot run: {problem}", pytrace=False)
        pytest.skip(f"needs {marker}: {problem}")
