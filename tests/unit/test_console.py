"""The expect-style console over a fake stream (a pipe standing in for a tty)."""

from __future__ import annotations

import os
import threading

import pytest

from pytest_epics_multiarch.console import Console, clean
from pytest_epics_multiarch.errors import IocError


class FakeShell:
    """Echoes input like a tty, answers like iocsh: enough to exercise the framing."""

    def __init__(self, prompt: str = "epics> ") -> None:
        self.prompt = prompt
        self.out_r, self.out_w = os.pipe()
        self.lines: list[str] = []

    def read(self) -> bytes:
        return os.read(self.out_r, 4096)

    def write(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            self.lines.append(line)
            reply = f"{line}\r\n"  # the tty echo
            if line.startswith("echo "):
                reply += self.prompt + line[5:] + "\r\n"
            elif line.startswith("dbgf "):
                reply += "DBF_DOUBLE:         3.5\r\n"
            elif line == "dbl":
                reply += "X:A\r\nX:B\r\n"
            reply += self.prompt
            os.write(self.out_w, reply.encode())

    def say(self, text: str) -> None:
        os.write(self.out_w, text.encode())

    def close(self) -> None:
        os.close(self.out_w)


@pytest.fixture
def shell() -> FakeShell:
    return FakeShell()


def test_run_returns_only_the_output(shell: FakeShell) -> None:
    console = Console(shell.read, shell.write, name="fake", target="linux/amd64")
    shell.say("\x1b[?2004hstarting\r\niocRun: All initialization complete\r\nepics> ")
    console.expect("iocRun: All initialization complete", 2)
    assert console.run("dbgf X:A") == "DBF_DOUBLE:         3.5"
    assert console.run("dbl") == "X:A\nX:B"


def test_run_works_with_the_rtems_prompt() -> None:
    shell = FakeShell(prompt="sample> ")
    console = Console(shell.read, shell.write, name="fake", target="rtems/powerpc")
    assert console.run("dbgf X:A") == "DBF_DOUBLE:         3.5"


def test_expect_times_out_with_the_tail(shell: FakeShell) -> None:
    console = Console(shell.read, shell.write, name="fake", target="linux/amd64")
    shell.say("line one\nline two\n")
    with pytest.raises(IocError) as info:
        console.expect("never", 0.3)
    text = str(info.value)
    assert "[linux/amd64]" in text and "no match within" in text and "line two" in text


def test_expect_fails_fast_when_the_stream_ends(shell: FakeShell) -> None:
    console = Console(shell.read, shell.write, name="fake", target="linux/amd64")
    shell.say("fatal: exception\n")
    threading.Timer(0.1, shell.close).start()
    with pytest.raises(IocError, match="console closed"):
        console.expect("never", 30)


def test_log_file_gets_everything(shell: FakeShell, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "console.log"
    console = Console(shell.read, shell.write, name="fake", target="t", log_path=log)
    shell.say("hello\r\n")
    console.expect("hello", 2)
    console.close()
    assert log.read_text() == "hello\n"


def test_clean_strips_escapes() -> None:
    assert clean("\x1b[?2004hepics> \x1b[0mok\r\n") == "epics> ok\n"
