"""merge-reports: one verdict from per-target reports, with the documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_epics_multiarch.__main__ import main
from pytest_epics_multiarch.reporting import Matrix


def report(path: Path, target: str, outcome: str, reason: str = "") -> Path:
    matrix = Matrix([target])
    matrix.record(target, outcome, f"t.py::test_x[{target}]", reason)
    matrix.write(path)
    return path


def test_two_passing_targets_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = report(tmp_path / "a.json", "linux/amd64", "passed")
    b = report(tmp_path / "b.json", "rtems/powerpc", "passed")
    assert main(["merge-reports", str(a), str(b), "-o", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["gate"] == "pass" and set(merged["targets"]) == {"linux/amd64", "rtems/powerpc"}
    assert "gate: pass" in capsys.readouterr().out


def test_a_skipped_target_fails_the_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = report(tmp_path / "a.json", "linux/amd64", "passed")
    b = report(tmp_path / "b.json", "rtems/powerpc", "skipped", "RTEMS toolchain image missing")
    assert main(["merge-reports", str(a), str(b), "-o", str(tmp_path / "all.json")]) == 1
    out = capsys.readouterr().out
    assert "rtems/powerpc: FAIL: skipped: RTEMS toolchain image missing" in out
    assert json.loads((tmp_path / "all.json").read_text())["gate"] == "fail"


def test_a_failure_fails_the_gate(tmp_path: Path) -> None:
    a = report(tmp_path / "a.json", "linux/amd64", "failed", "assert 1 == 2")
    assert main(["merge-reports", str(a)]) == 1


def test_same_target_twice_adds_up(tmp_path: Path) -> None:
    a = report(tmp_path / "a.json", "linux/amd64", "passed")
    b = report(tmp_path / "b.json", "linux/amd64", "failed", "boom")
    assert main(["merge-reports", str(a), str(b), "-o", str(tmp_path / "all.json")]) == 1
    entry = json.loads((tmp_path / "all.json").read_text())["targets"]["linux/amd64"]
    assert (entry["passed"], entry["failed"], entry["status"]) == (1, 1, "failed")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"schema": 2, "targets": {}}', "not a schema 1"),
        ('{"schema": 1, "targets": []}', "'targets' must be a mapping"),
        ('{"schema": 1, "targets": {"linux/amd64": {"passed": "many"}}}', "targets.linux/amd64"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["merge-reports", str(bad)]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_bad_usage_exit_2(tmp_path: Path) -> None:
    assert main(["merge-reports", str(tmp_path / "nope.json")]) == 2
    assert main(["merge-reports"]) == 2
    assert main(["frobnicate"]) == 2
