"""Where the startup script and the files it names come from.

On a board the IOC's files live on a TFTP (or NFS) server; the guest mirrors
that: :class:`TftpFiles` fetches each file the first time the shell opens it
(``epics/<hostname>/<path>`` on the server, stored under ``/epics/<hostname>``),
so every path that ``st.cmd`` loads, after macro expansion and ``cd``, is
fetched exactly when EPICS would read it. :class:`LocalFiles` is the same
without the network, for the host.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
from collections.abc import Sequence


class LocalFiles:
    """Files in a local folder; ``cd`` moves within it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.cwd = self.root

    def path(self, name: str) -> str:
        return os.path.normpath(os.path.join(self.cwd, name))

    def read_text(self, name: str) -> tuple[str, str]:
        """Return (path, text) of a file named relative to the current folder."""
        path = self.path(name)
        self._ensure(path)
        with open(path, encoding="latin-1") as handle:
            return path, handle.read()

    def chdir(self, name: str) -> None:
        path = self.path(name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"No such directory: {name}")
        self.cwd = path

    def _ensure(self, path: str) -> None:
        """Hook for subclasses that bring files in on first use."""


class TftpFiles(LocalFiles):
    """Files fetched on first use from a TFTP server with busybox's ``tftp``."""

    def __init__(
        self,
        root: str,
        server: str,
        remote_root: str,
        tftp_command: Sequence[str] = ("busybox", "tftp"),
        timeout: float = 30.0,
    ) -> None:
        super().__init__(root)
        self.server = server
        self.remote_root = remote_root.strip("/")
        self.tftp_command = list(tftp_command)
        self.timeout = timeout

    def chdir(self, name: str) -> None:
        # TFTP cannot list folders: any folder below the root may hold files.
        path = self.path(name)
        os.makedirs(path, exist_ok=True)
        self.cwd = path

    def remote_name(self, path: str) -> str:
        relative = os.path.relpath(path, self.root)
        if relative.startswith(".."):
            raise FileNotFoundError(f"{path} is outside the IOC's TFTP folder")
        return posixpath.join(self.remote_root, relative.replace(os.sep, "/"))

    def _ensure(self, path: str) -> None:
        if os.path.isfile(path):
            return
        remote = self.remote_name(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".part"
        result = subprocess.run(
            [*self.tftp_command, "-g", "-r", remote, "-l", partial, self.server],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if result.returncode != 0:
            if os.path.exists(partial):
                os.unlink(partial)
            detail = result.stdout.strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"tftp {self.server}:{remote} failed: {detail[0]}")
        os.replace(partial, path)
