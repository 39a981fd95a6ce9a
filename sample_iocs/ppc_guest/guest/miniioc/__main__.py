"""Command line: ``python3 -m miniioc [options] st.cmd``.

In the guest, ``/init`` runs::

    python3.11 -m miniioc --hostname NAME --tftp-server 10.0.2.2 \\
        --remote-dir epics/NAME --root /epics/NAME st.cmd

On the host, ``python -m miniioc --root DIR st.cmd`` runs the same IOC from a
local folder (``--no-ca`` gives the shell without a Channel Access server).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .database import Database
from .files import LocalFiles, TftpFiles
from .iocsh import IocShell, Runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miniioc", description=__doc__.splitlines()[0])
    parser.add_argument("script", help="startup script, relative to --root")
    parser.add_argument("--root", default=".", help="folder of the startup files")
    parser.add_argument("--hostname", default="", help="IOC name; the prompt is '<hostname>> '")
    parser.add_argument("--tftp-server", default="", help="fetch missing files from this server")
    parser.add_argument("--remote-dir", default="", help="folder of --root on the TFTP server")
    parser.add_argument("--no-ca", action="store_true", help="run the shell without a CA server")
    parser.add_argument(
        "--interface",
        action="append",
        default=None,
        help="address the CA server binds (repeatable; default 0.0.0.0)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

    files: LocalFiles
    if args.tftp_server:
        files = TftpFiles(args.root, args.tftp_server, args.remote_dir or "")
    else:
        files = LocalFiles(args.root)
    runtime: Runtime
    if args.no_ca:
        runtime = Runtime()
    else:
        from .caserver import CaRuntime

        # Beacons go where the environment says, else only to this machine: never
        # broadcast on a network the IOC was not told about.
        os.environ.setdefault("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO")
        os.environ.setdefault("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1")
        runtime = CaRuntime(interfaces=args.interface or ["0.0.0.0"])

    shell = IocShell(Database(), files, runtime, sys.stdout, args.hostname)
    try:
        if shell.run_script(args.script) and shell.interact(sys.stdin):
            # The console went away (end of input): a booted IOC keeps serving.
            wait = getattr(runtime, "wait", None)
            if shell.running and wait is not None:
                wait()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
