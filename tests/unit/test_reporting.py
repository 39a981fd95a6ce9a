"""The matrix, its JSON report and the gate's verdict."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_epics_multiarch.reporting import Matrix


def test_status_and_gate() -> None:
    matrix = Matrix(["linux/amd64", "rtems/powerpc"])
    matrix.record("linux/amd64", "passed", "t::a[linux/amd64]")
    matrix.record("rtems/powerpc", "skipped", "t::a[rtems/powerpc]", "toolchain image missing")
    assert matrix.result("linux/amd64").status == "passed"
    assert matrix.result("rtems/powerpc").status == "skipped"
    assert matrix.gate_problems() == {"rtems/powerpc": "skipped: toolchain image missing"}
    matrix.record("linux/amd64", "failed", "t::b[linux/amd64]", "assert 1 == 2\nmore")
    assert matrix.result("linux/amd64").status == "failed"
    assert matrix.result("linux/amd64").failures == [{"test": "t::b[linux/amd64]", "reason": "assert 1 == 2"}]


def test_error_only_target_is_error() -> None:
    matrix = Matrix()
    matrix.record("linux/amd64", "error", "t::a", "build failed")
    assert matrix.result("linux/amd64").status == "error"


def test_json_report_shape(tmp_path: Path) -> None:
    matrix = Matrix(["linux/amd64"])
    matrix.record("linux/amd64", "passed", "t::a")
    result = matrix.result("linux/amd64")
    result.image, result.digest, result.build_s, result.start_s = "img:dev", "sha256:1", 1.23456, 0.9
    path = tmp_path / "r" / "report.json"
    matrix.write(path)
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["gate"] == "pass"
    entry = data["targets"]["linux/amd64"]
    assert entry["status"] == "passed" and entry["passed"] == 1 and entry["build_s"] == 1.235
    assert set(entry) == {
        "status",
        "passed",
        "failed",
        "skipped",
        "errors",
        "image",
        "digest",
        "build_s",
        "start_s",
        "reason",
        "failures",
    }


def test_no_targets_fails_the_gate() -> None:
    assert Matrix().to_json()["gate"] == "fail"


def test_table_has_one_row_per_target() -> None:
    matrix = Matrix(["linux/amd64", "rtems/powerpc"])
    matrix.record("rtems/powerpc", "skipped", "x", "no toolchain")
    lines = matrix.table()
    assert lines[0].split()[:2] == ["target", "status"]
    assert lines[1].startswith("linux/amd64") and lines[2].startswith("rtems/powerpc")
    assert lines[-1] == "rtems/powerpc: no toolchain"
