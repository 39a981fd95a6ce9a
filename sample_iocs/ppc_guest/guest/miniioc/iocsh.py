"""The iocsh subset that a simple ``st.cmd`` and a console session use.

Startup commands: ``epicsEnvSet``, ``epicsEnvShow``, ``epicsEnvUnset``,
``dbLoadRecords``, ``dbLoadDatabase``, ``<name>_registerRecordDeviceDriver``
(no-op), ``cd``, ``pwd``, ``< file`` (include), ``epicsThreadSleep``, ``iocInit``.
Console commands: ``dbl``, ``dbgf``, ``dbpf``, ``dbpr``, ``echo``, ``help``,
``exit``. Anything else prints ``Command <name> not found.`` like iocsh.

Lines are macro-expanded from the environment first (``$(NAME)``,
``${NAME}``); words are separated by blanks, commas and parentheses, so
``dbLoadRecords("x.db", "P=A:")`` and ``dbLoadRecords x.db P=A:`` are the same.
Script lines are echoed as iocsh does (except those starting with ``#-``).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Callable, TextIO, TypeVar

from . import __version__
from .calc import CalcError
from .database import Database
from .dbparse import DbParseError, parse_db
from .dbtest import dbgf, dbl, dbpr
from .files import LocalFiles
from .macros import MacroError, chain_lookup, expand, parse_definitions
from .records import DatabaseError

T = TypeVar("T")

READY_MESSAGE = "iocRun: All initialization complete"


class Runtime:
    """Runs database operations once the IOC is up; this base runs them inline.

    The Channel Access runtime (:class:`miniioc.caserver.CaRuntime`) overrides
    :meth:`start` to bring the server up and :meth:`call` to run each
    operation on the server's event loop and publish what changed.
    """

    def start(self, db: Database) -> None:
        self.db = db
        db.take_posted()

    def call(self, operation: Callable[[], T]) -> T:
        return operation()

    def stop(self) -> None:
        """Release what :meth:`start` acquired (nothing here)."""


class ShellExit(Exception):
    """The ``exit`` command."""


def split_command(line: str) -> list[str]:
    """Split an iocsh line into words: blanks, commas and parentheses separate them."""
    words: list[str] = []
    current: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == "\\" and i + 1 < len(line):
                current.append(line[i + 1])
                i += 2
                continue
            if char == quote:
                quote = ""
            else:
                current.append(char)
            i += 1
            continue
        if char in "\"'":
            quote = char
            in_word = True
        elif char == "\\" and i + 1 < len(line):
            current.append(line[i + 1])
            in_word = True
            i += 2
            continue
        elif char.isspace() or char in ",()":
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
        i += 1
    if quote:
        raise ValueError("Unbalanced quote.")
    if in_word:
        words.append("".join(current))
    return words


_COMMAND_HELP: dict[str, str] = {
    "<": "< 'file name'",
    "cd": "cd 'directory name'",
    "dbLoadDatabase": "dbLoadDatabase 'file name' 'path' 'substitutions'",
    "dbLoadRecords": "dbLoadRecords 'file name' 'substitutions'",
    "dbgf": "dbgf 'record name'",
    "dbl": "dbl 'record type' 'fields'",
    "dbpf": "dbpf 'record name' 'value'",
    "dbpr": "dbpr 'record name' 'interest level'",
    "echo": "echo 'string'",
    "epicsEnvSet": "epicsEnvSet 'name' 'value'",
    "epicsEnvShow": "epicsEnvShow 'name'",
    "epicsEnvUnset": "epicsEnvUnset 'name'",
    "epicsThreadSleep": "epicsThreadSleep 'seconds'",
    "exit": "exit",
    "help": "help '[command ...]'",
    "iocInit": "iocInit",
    "pwd": "pwd",
}


class IocShell:
    """Interprets startup scripts and console commands against one :class:`Database`."""

    def __init__(
        self,
        db: Database,
        files: LocalFiles,
        runtime: Runtime | None = None,
        out: TextIO | None = None,
        hostname: str = "",
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        self.db = db
        self.files = files
        self.runtime = runtime or Runtime()
        self.out = out or sys.stdout
        self.hostname = hostname
        self.environ = os.environ if environ is None else environ
        self.running = False
        self._include_depth = 0
        self._commands: dict[str, Callable[[list[str]], None]] = {
            "<": self._cmd_include,
            "cd": self._cmd_cd,
            "dbLoadDatabase": self._cmd_load_database,
            "dbLoadRecords": self._cmd_load_records,
            "dbgf": self._cmd_dbgf,
            "dbl": self._cmd_dbl,
            "dbpf": self._cmd_dbpf,
            "dbpr": self._cmd_dbpr,
            "echo": self._cmd_echo,
            "epicsEnvSet": self._cmd_env_set,
            "epicsEnvShow": self._cmd_env_show,
            "epicsEnvUnset": self._cmd_env_unset,
            "epicsThreadSleep": self._cmd_sleep,
            "exit": self._cmd_exit,
            "help": self._cmd_help,
            "iocInit": self._cmd_ioc_init,
            "pwd": self._cmd_pwd,
        }

    @property
    def prompt(self) -> str:
        return f"{self.hostname}> " if self.hostname else "epics> "

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # -- running ------------------------------------------------------------------

    def run_script(self, name: str) -> bool:
        """Run a script file; returns False when it ran ``exit``."""
        try:
            _, text = self.files.read_text(name)
        except OSError as exc:
            self.write(f"Can't open {name}: {exc}\n")
            return True
        for raw in text.splitlines():
            line = raw.strip()
            if not line.startswith("#-"):
                self.write(raw.rstrip() + "\n")
            if not self.execute(line):
                return False
        return True

    def interact(self, stdin: TextIO) -> bool:
        """Read commands until end of input (True) or ``exit`` (False)."""
        while True:
            self.write(self.prompt)
            line = stdin.readline()
            if not line:
                self.write("\n")
                return True
            if not self.execute(line):
                return False

    def execute(self, line: str) -> bool:
        """Run one command line; returns False after ``exit``."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        try:
            line = expand(line, chain_lookup(self.environ), self._undefined_macro)
            if line.startswith("<"):
                words = ["<", *split_command(line[1:])]
            else:
                words = split_command(line)
        except (ValueError, MacroError) as exc:
            self.write(f"{exc}\n")
            return True
        if not words:
            return True
        name, args = words[0], words[1:]
        handler = self._commands.get(name)
        if handler is None and name.endswith("_registerRecordDeviceDriver"):
            return True
        if handler is None:
            self.write(f"Command {name} not found.\n")
            return True
        try:
            handler(args)
        except ShellExit:
            return False
        except (DatabaseError, DbParseError, CalcError, MacroError, OSError, ValueError) as exc:
            self.write(f"{name}: {exc}\n")
        return True

    def _undefined_macro(self, name: str) -> None:
        self.write(f"macLib: macro {name} is undefined\n")

    # -- startup commands --------------------------------------------------------------

    def _cmd_env_set(self, args: list[str]) -> None:
        if len(args) < 2:
            raise ValueError("Usage: epicsEnvSet name value")
        self.environ[args[0]] = args[1]

    def _cmd_env_show(self, args: list[str]) -> None:
        if args:
            value = self.environ.get(args[0])
            self.write(
                f"{args[0]} is not an environment variable.\n" if value is None else f"{args[0]}={value}\n"
            )
            return
        self.write("".join(f"{key}={value}\n" for key, value in sorted(self.environ.items())))

    def _cmd_env_unset(self, args: list[str]) -> None:
        if args:
            self.environ.pop(args[0], None)

    def _load(self, command: str, args: list[str], macro_index: int) -> None:
        if not args:
            raise ValueError(f"Usage: {_COMMAND_HELP[command]}")
        if self.running:
            self.write(f"{command}: ERROR: Records cannot be loaded after iocInit!\n")
            return
        macros = parse_definitions(args[macro_index]) if len(args) > macro_index else {}
        lookup = chain_lookup(macros, self.environ)
        try:
            path, text = self.files.read_text(args[0])
        except OSError as exc:
            self.write(f"ERROR: {command}: can't open file '{args[0]}': {exc}\n")
            return

        def read_include(name: str) -> tuple[str, str]:
            folder = os.path.dirname(path)
            return self.files.read_text(os.path.join(os.path.relpath(folder, self.files.cwd), name))

        contents = parse_db(text, args[0], lookup, read_include, self._undefined_macro)
        self.db.load(contents)

    def _cmd_load_records(self, args: list[str]) -> None:
        self._load("dbLoadRecords", args, 1)

    def _cmd_load_database(self, args: list[str]) -> None:
        # dbLoadDatabase(file, path, substitutions): the record parts of a .dbd or .db.
        self._load("dbLoadDatabase", args, 2)

    def _cmd_cd(self, args: list[str]) -> None:
        if not args:
            raise ValueError("Usage: cd 'directory name'")
        self.files.chdir(args[0])

    def _cmd_pwd(self, args: list[str]) -> None:
        self.write(self.files.cwd + "\n")

    def _cmd_include(self, args: list[str]) -> None:
        if not args:
            raise ValueError("Usage: < 'file name'")
        if self._include_depth > 10:
            raise ValueError("include nesting too deep")
        self._include_depth += 1
        try:
            if not self.run_script(args[0]):
                raise ShellExit()
        finally:
            self._include_depth -= 1

    def _cmd_sleep(self, args: list[str]) -> None:
        time.sleep(float(args[0]) if args else 0.0)

    def _cmd_ioc_init(self, args: list[str]) -> None:
        if self.running:
            self.write("iocInit can only be called once\n")
            return
        self.write("Starting iocInit\n")
        self.write("#" * 76 + "\n")
        self.write(f"## miniioc {__version__}: an EPICS IOC look-alike serving CA with caproto\n")
        self.write(f"## on {platform.system()} {platform.machine()}, Python {platform.python_version()}\n")
        self.write("#" * 76 + "\n")
        for warning in self.db.initialize():
            self.write(f"Warning: {warning}\n")
        self.runtime.start(self.db)
        self.running = True
        self.write(READY_MESSAGE + "\n")

    def _cmd_exit(self, args: list[str]) -> None:
        raise ShellExit()

    # -- console commands ----------------------------------------------------------------

    def _after_init(self, command: str) -> bool:
        if not self.running:
            self.write(f"{command} only works after iocInit\n")
        return self.running

    def _cmd_dbgf(self, args: list[str]) -> None:
        if not args or not args[0]:
            self.write('Usage: dbgf "pv name"\n')
            return
        if self._after_init("dbgf"):
            self.write(self.runtime.call(lambda: dbgf(self.db, args[0])))

    def _cmd_dbpf(self, args: list[str]) -> None:
        if len(args) < 2 or not args[0]:
            self.write('Usage: dbpf "pv name", "value"\n')
            return
        if not self._after_init("dbpf"):
            return
        name, value = args[0], args[1]

        def put_and_get() -> str:
            try:
                self.db.put(name, value)
            except KeyError:
                return f"PV '{name}' not found\n"
            except DatabaseError as exc:
                return f"dbpf: {exc}\n" + dbgf(self.db, name)
            return dbgf(self.db, name)

        self.write(self.runtime.call(put_and_get))

    def _cmd_dbpr(self, args: list[str]) -> None:
        if not args:
            self.write('Usage: dbpr "pv name", level\n')
            return
        record = self.db.find_record(args[0])
        if record is None:
            self.write(f"PV '{args[0]}' not found\n")
            return
        self.write(self.runtime.call(lambda: dbpr(record)))

    def _cmd_dbl(self, args: list[str]) -> None:
        self.write(dbl(self.db, args[0] if args else ""))

    def _cmd_echo(self, args: list[str]) -> None:
        self.write(" ".join(args) + "\n")

    def _cmd_help(self, args: list[str]) -> None:
        if args:
            for pattern in args:
                regex = re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$")
                for name in sorted(self._commands, key=str.lower):
                    if regex.match(name):
                        self.write(_COMMAND_HELP.get(name, name) + "\n")
            return
        self.write("Type 'help <command>' to see the arguments of <command>.  eg. 'help db*'\n")
        names = sorted(self._commands, key=str.lower)
        for start in range(0, len(names), 4):
            self.write("".join(f"{name:<20}" for name in names[start : start + 4]).rstrip() + "\n")
