"""A small EPICS-IOC look-alike for the PowerPC test guest.

It reads an EPICS startup script (``st.cmd``) and database files (``.db``),
keeps the records in memory and serves them over Channel Access with
caproto's server. It exists so that the project's QEMU runner can be proven
end to end on machines that have no RTEMS toolchain: the guest boots like a
board (network by DHCP, startup files over TFTP, ``iocRun: All
initialization complete`` on the console, the ``<hostname>> `` prompt).

Everything except :mod:`miniioc.caserver` is plain Python with no
dependencies, so the parsers and the record engine run and are tested on the
host too.
"""

__version__ = "0.1.0"
