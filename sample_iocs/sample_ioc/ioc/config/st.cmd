# Startup script of the sample IOC, the same on every target.
#
# The working directory is the IOC's folder (/epics/ioc in the container; on RTEMS the folder the
# startup files are served from), so paths are relative. The database definition is loaded
# before this script runs: by `softIoc -D .../softIoc.dbd` on Linux, by the IOC's main() on RTEMS.

dbLoadRecords("db/sample.db", "P=SAMPLE:")

iocInit
