"""Spare IOCs for real: the sample's tests with a fresh IOC each, served from spares started in
the background (--epics-spare-iocs), and nothing of the session left afterwards.

A small plugin in the run records which container served each test and its session label; the
engine's own start events count the containers each session started, and the IOC consoles in
--epics-log-dir count the IOCs (each has its own log, spares included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_SESSION

from .conftest import SAMPLE

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.usefixtures("subprocess_env", "no_leftover_containers"),
]

#: Loaded with ``-p spare_recorder``: for every test that has an ``ioc``, the container serving it.
RECORDER = """
import json
import os
import time
from datetime import datetime

import docker
import pytest

from pytest_epics_multiarch.engine import LABEL_CA_PORT, LABEL_SESSION

ASKED = {}


def created(text):
    # The engine prints nanoseconds; datetime takes microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    ASKED[item.nodeid] = time.time()  # before the ioc fixture asks for an IOC
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    ioc = getattr(item, "funcargs", {}).get("ioc")
    if ioc is not None:
        client = docker.from_env()
        try:
            (container,) = client.containers.list(filters={"label": f"{LABEL_CA_PORT}={ioc.ca_address[1]}"})
            record = {
                "test": item.nodeid,
                "container": container.id,
                "session": container.labels[LABEL_SESSION],
                # The container existed before this test asked for an IOC: a spare started ahead.
                "ahead": created(container.attrs["Created"]) < ASKED[item.nodeid],
            }
        finally:
            client.close()
        with open(os.environ["SPARE_RECORDS"], "a") as out:
            out.write(json.dumps(record) + "\\n")
    yield
"""


def run_sample(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, folder: Path, spares: int
) -> tuple[list[dict[str, Any]], int, int]:
    """Run the sample with a fresh IOC per test; return the records, IOC logs and containers started."""
    records = folder / "records.jsonl"
    logs = folder / "logs"
    monkeypatch.setenv("SPARE_RECORDS", str(records))
    since = int(time.time()) - 1
    result = pytester.runpytest_subprocess(
        str(SAMPLE),
        "--arch=linux/amd64",
        "--epics-ioc-scope=function",
        f"--epics-spare-iocs={spares}",
        f"--epics-log-dir={logs}",
        "-p",
        "spare_recorder",
        "-p",
        "no:cacheprovider",
    )
    until = int(time.time()) + 1
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes.get("passed", 0) > 0 and not outcomes.get("failed") and not outcomes.get("errors")
    served = [json.loads(line) for line in records.read_text().splitlines()]
    (session,) = {record["session"] for record in served}
    client = docker.from_env()
    try:
        # No container of the session is left: not an IOC, not a spare.
        assert client.containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session}"}) == []
        events = client.events(
            since=since,
            until=until,
            decode=True,
            filters={"type": "container", "event": "start", "label": f"{LABEL_SESSION}={session}"},
        )
        started = len(list(events))
    finally:
        client.close()
    consoles = len(list(logs.rglob("ioc-linux-amd64-*.log")))
    return served, consoles, started


def test_spares_serve_the_sample_and_only_the_last_one_goes_unused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytester.makepyfile(spare_recorder=RECORDER)
    (tmp_path / "spares").mkdir()
    (tmp_path / "none").mkdir()
    served, consoles, started = run_sample(pytester, monkeypatch, tmp_path / "spares", spares=1)
    # A fresh IOC per test (function scope): more than one IOC served the tests, never one twice.
    containers = [record["container"] for record in served]
    assert len(containers) > 1 and len(set(containers)) == len(containers), served
    # Spares served them: containers started before the test asked (all but the first, unless a
    # test ended before its successor's spare was even created).
    ahead = [record["test"] for record in served if record["ahead"]]
    assert len(ahead) >= len(served) // 2, served
    # Each IOC, spares included, has its own console log.
    assert consoles == started

    served_none, consoles_none, started_none = run_sample(pytester, monkeypatch, tmp_path / "none", spares=0)
    assert [r["test"] for r in served_none] == [r["test"] for r in served]
    assert not [record for record in served_none if record["ahead"]]  # each IOC started when asked for
    # Without spares the session starts exactly the IOCs it hands out; with one spare it starts
    # one more: the spare left when the last test had its IOC, stopped at the session's end.
    # (Spares started but never handed out would make it more; no replacement, the same.)
    assert consoles_none == started_none
    assert started == started_none + 1, (started, started_none)
