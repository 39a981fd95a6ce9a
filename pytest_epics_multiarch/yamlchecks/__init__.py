"""Declarative PV checks: ``test_*.ioc.yaml`` files collected as pytest tests.

IOC authors who don't write Python state, next to their IOC, what a booted IOC must show; the
same file runs on every selected target. :mod:`.parser` reads the format into :mod:`.model`
(errors name file and line), :mod:`.runner` runs a check's steps against an IOC, and
:mod:`.nodes` makes the pytest items. The README's "YAML checks" section is the reference.
"""

from __future__ import annotations

from .model import CheckFile, CheckFileError
from .nodes import IocCheckFile, IocCheckItem, collect_file
from .parser import load_check_file, parse_check_file
from .runner import StepFailed, run_check

__all__ = [
    "CheckFile",
    "CheckFileError",
    "IocCheckFile",
    "IocCheckItem",
    "StepFailed",
    "collect_file",
    "load_check_file",
    "parse_check_file",
    "run_check",
]
