"""Errors raised by the plugin.

Every error a user meets says four things: which target, what was tried, what was seen, and a
hint. :class:`EpicsMultiarchError` formats them the same way everywhere so that a failing test,
a usage error and a log line all read alike.
"""

from __future__ import annotations

from collections.abc import Sequence


class EpicsMultiarchError(Exception):
    """Base class: a failure with the target, the attempt, the observation and a hint."""

    def __init__(
        self,
        what: str,
        *,
        target: str | None = None,
        seen: str | None = None,
        hint: str | None = None,
        tail: Sequence[str] | str | None = None,
    ) -> None:
        self.what = what
        self.target = target
        self.seen = seen
        self.hint = hint
        if isinstance(tail, str):
            tail = tail.splitlines()
        self.tail: list[str] = list(tail or [])
        super().__init__(self.render())

    def render(self) -> str:
        head = f"[{self.target}] {self.what}" if self.target else self.what
        lines = [head]
        if self.seen:
            lines.append(f"  seen: {self.seen}")
        if self.tail:
            lines.append(f"  last {len(self.tail)} lines:")
            lines.extend(f"    | {line}" for line in self.tail)
        if self.hint:
            lines.append(f"  Hint: {self.hint}")
        return "\n".join(lines)


class ConfigError(EpicsMultiarchError):
    """The config file, an option or a target name is not what was expected."""


class EngineError(EpicsMultiarchError):
    """The container engine (or the build CLI) is missing or refused a request."""


class EngineUnavailable(EngineError):
    """No container engine answers: a missing prerequisite, not a test failure."""


class ImageError(EpicsMultiarchError):
    """An image could not be built, pulled or found."""


class PrerequisiteMissing(EpicsMultiarchError):
    """Something the target needs is absent (e.g. a toolchain image): its tests skip."""


class IocStartError(EpicsMultiarchError):
    """The IOC exited, or never became ready, while starting."""


class IocError(EpicsMultiarchError):
    """The running IOC did not do what was asked (e.g. an iocsh command timed out)."""


class CAError(EpicsMultiarchError):
    """A Channel Access operation failed."""


class CATimeoutError(CAError):
    """A PV did not connect, answer, or reach the expected value in time."""


class CAPutError(CAError):
    """The IOC rejected a put (or its completion reported failure)."""


def tail_lines(text: str, count: int = 30) -> list[str]:
    """The last ``count`` non-empty lines of ``text``, for error messages and reports."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-count:]
