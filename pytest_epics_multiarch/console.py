"""An expect-style IOC console: a byte stream read in the background, commands written to it.

The same class drives a container's attached tty and an emulator's serial console. Commands are
framed with an ``echo`` of a unique marker (iocsh has ``echo`` on every target), so the output
of one command is what came between its echoed line and the marker, whatever the prompt looks
like (``epics> `` on Linux, ``<hostname>> `` on RTEMS).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import IocError, tail_lines

# CSI sequences (readline's bracketed paste and cursor moves) and stray carriage returns.
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")
_markers = itertools.count(1)
#: An iocsh prompt waiting for input at the end of the output: ``epics> `` or ``<hostname>> ``.
_PROMPT_AT_END = re.compile(r"(?:^|\n)[\w.:-]*> $")


def clean(text: str) -> str:
    return _ANSI_RE.sub("", text)


class Console:
    """Collects a stream into a buffer (and a log file) and runs commands on it."""

    def __init__(
        self,
        read: Callable[[], bytes],
        write: Callable[[bytes], None],
        *,
        name: str,
        target: str,
        log_path: Path | None = None,
    ) -> None:
        self._read = read
        self._write = write
        self.name = name
        self.target = target
        self.log_path = log_path
        self._log_file: IO[str] | None = open(log_path, "a") if log_path else None
        self._buffer: list[str] = []
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False
        self._lock = threading.Lock()  # one command at a time
        self._thread = threading.Thread(target=self._pump, name=f"console-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._read()
            except (OSError, ValueError):
                chunk = b""
            if not chunk:
                break
            text = clean(chunk.decode("utf-8", errors="replace"))
            with self._cond:
                self._buffer.append(text)
                self._size += len(text)
                if self._log_file is not None:
                    self._log_file.write(text)
                    self._log_file.flush()
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def text(self, start: int = 0) -> str:
        with self._cond:
            joined = "".join(self._buffer)
            self._buffer = [joined]
            return joined[start:]

    def position(self) -> int:
        with self._cond:
            return self._size

    def expect(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        *,
        start: int = 0,
        alive: Callable[[], bool] | None = None,
        what: str | None = None,
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears after ``start``; fail fast when the stream ends."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text(), start)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed or (alive is not None and not alive()):
                reason = (
                    f"no match within {timeout:.0f} s"
                    if remaining <= 0
                    else "the console closed (the IOC is no longer running)"
                )
                raise IocError(
                    f"waiting for {what or regex.pattern!r} on the console of {self.name}",
                    target=self.target,
                    seen=reason,
                    tail=tail_lines(self.text(), 20),
                    hint="see the IOC log for what it printed last",
                )
            with self._cond:
                self._cond.wait(min(remaining, 0.25))

    def run(self, command: str, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> str:
        """Send one iocsh command and return its output (without echo, prompts or marker)."""
        if "\n" in command:
            raise ValueError("one iocsh command at a time (no newlines)")
        with self._lock:
            marker = f"EPICS_MULTIARCH_DONE_{next(_markers)}"
            start = self.position()
            deadline = time.monotonic() + timeout
            self._write(f"{command}\n".encode())
            # A serial console echoes input as it arrives: typing the marker line while the
            # command still prints would interleave the two. Wait until the shell is idle.
            self._wait_idle(start, deadline)
            self._write(f"echo {marker}\n".encode())
            # echo's output ends a line, maybe right after the prompt (``epics> MARKER``); the
            # tty's echo of our input has "echo " in front of it.
            done = self.expect(
                rf"(?m)(?<!echo ){marker}[ \t]*$",
                max(deadline - time.monotonic(), 0.1),
                start=start,
                alive=alive,
                what=f"output of {command!r}",
            )
            return _strip_command_output(self.text()[start : done.start()], command, marker)

    def _wait_idle(self, start: int, deadline: float, quiet: float = 0.3) -> None:
        """Until a prompt ends the output after ``start``, or nothing arrived for ``quiet`` s."""
        last_size, last_change = self.position(), time.monotonic()
        while time.monotonic() < deadline and not self._closed:
            text = self.text(start)
            if text and _PROMPT_AT_END.search(text):
                return
            size = self.position()
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change >= quiet and size > start:
                return
            with self._cond:
                self._cond.wait(0.05)

    def close(self) -> None:
        if self._log_file is not None:
            with self._cond:
                self._log_file.close()
                self._log_file = None


def _strip_command_output(raw: str, command: str, marker: str) -> str:
    """Drop the echoed command line, the echoed marker line and prompt-only lines."""
    lines = raw.split("\n")
    kept: list[str] = []
    seen_command = False
    for line in lines:
        stripped = line.strip()
        if not seen_command and stripped.endswith(command.strip()):
            seen_command = True
            continue
        if marker in stripped:
            continue
        if re.fullmatch(r"[\w.:-]*>\s*", stripped) and not kept:
            continue  # a bare prompt before the output
        kept.append(line.rstrip())
    while kept and (not kept[-1].strip() or re.fullmatch(r"[\w.:-]*>\s*", kept[-1].strip())):
        kept.pop()
    return "\n".join(kept).strip("\n")
