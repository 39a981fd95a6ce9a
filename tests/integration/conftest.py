"""Helpers for integration tests that run the plugin against the real sample IOC."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_SESSION, Owner, owner_is_alive

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_iocs" / "sample_ioc"
BASE_IMAGE = "pytest-epics-multiarch/debian:bookworm"


def orphaned_containers() -> set[str]:
    """Ids of the plugin's containers whose owning process has ended: what a session leaked.

    Containers of sessions still running (another developer's, a parallel run) don't count.
    """
    client = docker.from_env()
    host = Owner.current().host
    try:
        containers = client.containers.list(all=True, filters={"label": LABEL_SESSION})
        return {c.id for c in containers if not owner_is_alive(c.labels or {}, host)}
    finally:
        client.close()


def sample_config_with_tag(folder: Path, tag: str) -> Path:
    """A copy of the sample's config that names its images with ``tag`` (built from the sample)."""
    text = (SAMPLE / "epics-multiarch.yaml").read_text()
    assert 'tag: "dev"' in text and "context: ." in text
    path = folder / "epics-multiarch.yaml"
    path.write_text(text.replace('tag: "dev"', f'tag: "{tag}"').replace("context: .", f"context: {SAMPLE}"))
    return path


def message_test_args(config: Path, *extra: str) -> list[str]:
    """pytest arguments running the sample's message test on linux/amd64 with ``config``."""
    return [
        str(SAMPLE / "tests" / "test_sample_ioc.py"),
        "--arch=linux/amd64",
        f"--epics-config={config}",
        *extra,
        "-p",
        "no:cacheprovider",
        "-k",
        "message",
    ]


def remove_images_tagged(tag: str) -> list[str]:
    """Remove the image tags ending in ``:tag`` (only names a test made); return them."""
    client = docker.from_env()
    refs = [ref for image in client.images.list() for ref in image.tags if ref.endswith(":" + tag)]
    for ref in refs:
        client.images.remove(ref)
    return refs


@pytest.fixture
def no_leftover_containers() -> Iterator[None]:
    """Fails the test when it leaves a container of the plugin behind."""
    before = orphaned_containers()
    yield
    left = orphaned_containers() - before
    assert not left, f"containers left behind: {left}"


@pytest.fixture
def subprocess_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Runs in a subprocess see the same engine/registry as the outer test run.

    Their build logs and IOC consoles go under this test's folder: a run that fails on purpose
    keeps its logs, and they must not pile up in /tmp.
    """
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    for name in list(os.environ):
        if name.startswith("EPICS_MULTIARCH_") and name != "EPICS_MULTIARCH_REGISTRY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("EPICS_MULTIARCH_LOG_DIR", str(tmp_path / "epics-logs"))
