"""The target matrix: per-target outcomes, the terminal table, the JSON report and the gate."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_SCHEMA = 1


@dataclass
class TargetResult:
    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    image: str = ""
    digest: str = ""
    image_how: str = ""
    build_s: float = 0.0
    start_s: float = 0.0
    reason: str = ""
    failures: list[dict[str, str]] = field(default_factory=list)
    #: The plugin skipped tests because the target itself could not run (a build-only BSP, a
    #: missing toolchain image, no engine): the target counts as skipped whatever else passed.
    blocked: bool = False

    @property
    def ran(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def status(self) -> str:
        if self.errors and not (self.passed or self.failed):
            return "error"
        if self.failed or self.errors:
            return "failed"
        if self.passed and not self.blocked:
            return "passed"
        return "skipped"

    def gate_problem(self) -> str | None:
        """Why this target blocks a release, or None when it passes the gate."""
        if self.failed or self.errors:
            return f"{self.failed} failed, {self.errors} errors"
        if self.blocked or not self.passed:
            return "skipped: " + self.reason if self.reason else "ran no test"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "errors": self.errors,
            "image": self.image,
            "digest": self.digest,
            "build_s": round(self.build_s, 3),
            "start_s": round(self.start_s, 3),
            "reason": self.reason,
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> TargetResult:
        return cls(
            name=name,
            passed=int(data.get("passed", 0)),
            failed=int(data.get("failed", 0)),
            skipped=int(data.get("skipped", 0)),
            errors=int(data.get("errors", 0)),
            image=str(data.get("image", "")),
            digest=str(data.get("digest", "")),
            build_s=float(data.get("build_s", 0.0)),
            start_s=float(data.get("start_s", 0.0)),
            reason=str(data.get("reason", "")),
            failures=[dict(f) for f in data.get("failures", [])],
            blocked=data.get("status") == "skipped",
        )


class Matrix:
    """Outcomes of the selected targets, filled from test reports."""

    def __init__(self, targets: Iterable[str] = ()) -> None:
        self.targets: dict[str, TargetResult] = {name: TargetResult(name) for name in targets}

    def result(self, name: str) -> TargetResult:
        if name not in self.targets:
            self.targets[name] = TargetResult(name)
        return self.targets[name]

    def record(self, target: str, outcome: str, nodeid: str, reason: str = "") -> None:
        """Count one test outcome: passed, failed, skipped or error."""
        result = self.result(target)
        if outcome == "passed":
            result.passed += 1
        elif outcome == "skipped":
            result.skipped += 1
            # The plugin's own skips name their target first: "[rtems/powerpc/beatnik] ...".
            target_level = reason.startswith(f"[{target}]")
            if target_level and not result.blocked:
                result.blocked, result.reason = True, reason.splitlines()[0]
            elif reason and not result.reason:
                result.reason = reason
        else:
            if outcome == "error":
                result.errors += 1
            else:
                result.failed += 1
            result.failures.append({"test": nodeid, "reason": reason.splitlines()[0] if reason else outcome})

    def counted(self) -> int:
        """How many test outcomes were recorded, all targets together."""
        return sum(r.passed + r.failed + r.skipped + r.errors for r in self.targets.values())

    def note(self, target: str, info: Mapping[str, Any]) -> None:
        """Image and start-up facts of a target, as a test report carries them."""
        result = self.result(target)
        if info.get("image"):
            result.image = str(info["image"])
            result.digest = str(info.get("digest", ""))
            result.image_how = str(info.get("how", ""))
            result.build_s = max(result.build_s, float(info.get("build_s", 0.0)))
        result.start_s = max(result.start_s, float(info.get("start_s", 0.0)))
        if info.get("reason") and not result.reason:
            result.reason = str(info["reason"])

    def gate_problems(self) -> dict[str, str]:
        return {name: why for name, r in self.targets.items() if (why := r.gate_problem())}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "gate": "fail" if self.gate_problems() or not self.targets else "pass",
            "targets": {name: r.to_json() for name, r in self.targets.items()},
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> list[str]:
        """The terminal summary: one row per target."""
        rows = [("target", "status", "image", "start", "passed", "failed", "skipped", "errors")]
        for name, r in self.targets.items():
            image = f"{r.image_how} {r.build_s:.1f} s" if r.image_how else "-"
            start = f"{r.start_s:.1f} s" if r.start_s else "-"
            rows.append(
                (
                    name,
                    r.status,
                    image,
                    start,
                    str(r.passed),
                    str(r.failed),
                    str(r.skipped),
                    str(r.errors),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        for name, r in self.targets.items():
            if r.reason and r.status in ("skipped", "error"):
                lines.append(f"{name}: {r.reason}")
        return lines


class ReportError(ValueError):
    """A report file that can't be read or isn't a pytest-epics-multiarch report."""


def load_report(path: Path) -> Matrix:
    """Read one ``--epics-report`` file back into a matrix."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise ReportError(f"{path}: not a schema {REPORT_SCHEMA} pytest-epics-multiarch report")
    targets = data.get("targets")
    if not isinstance(targets, dict):
        raise ReportError(f"{path}: 'targets' must be a mapping of target name to result")
    matrix = Matrix()
    for name, entry in targets.items():
        if not isinstance(entry, dict):
            raise ReportError(f"{path}: targets.{name} must be a mapping")
        try:
            matrix.targets[str(name)] = TargetResult.from_json(str(name), entry)
        except (TypeError, ValueError) as exc:
            raise ReportError(f"{path}: targets.{name}: {exc}") from exc
    return matrix


def merge(matrices: Iterable[Matrix]) -> Matrix:
    """One matrix from several (a CI job per target): counts of a target seen twice add up."""
    merged = Matrix()
    for matrix in matrices:
        for name, result in matrix.targets.items():
            into = merged.result(name)
            into.passed += result.passed
            into.failed += result.failed
            into.skipped += result.skipped
            into.errors += result.errors
            into.failures.extend(result.failures)
            into.image = into.image or result.image
            into.digest = into.digest or result.digest
            into.build_s = max(into.build_s, result.build_s)
            into.start_s = max(into.start_s, result.start_s)
            into.reason = into.reason or result.reason
            into.blocked = into.blocked or result.blocked
    return merged
