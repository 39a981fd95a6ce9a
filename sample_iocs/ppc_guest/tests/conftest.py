"""Make the guest's ``miniioc`` package and ``build_guest.py`` importable on the host."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent / "guest", HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
