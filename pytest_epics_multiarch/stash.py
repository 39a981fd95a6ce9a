"""Keys of what the plugin keeps in pytest's stashes (config, items), shared by its modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from .ioc import Ioc
from .reporting import Matrix
from .session import EpicsSession

#: The session's machinery (config.stash).
session_key = pytest.StashKey[EpicsSession]()
#: The target matrix (config.stash).
matrix_key = pytest.StashKey[Matrix]()
#: How to reach IOCs kept with --epics-keep-iocs (config.stash).
kept_key = pytest.StashKey[list[str]]()
#: Where a failing run's build logs and IOC consoles were kept (config.stash).
logs_key = pytest.StashKey[Path]()
#: The target an item runs on (item.stash).
item_target_key = pytest.StashKey[str]()
#: The IOCs an item used, whose logs go into its report when it fails (item.stash).
item_iocs_key = pytest.StashKey[list[Ioc]]()
