/* main() of the sample IOC's RTEMS boot image.
 *
 * EPICS's RTEMS start-up code (libcom's rtems_init.c) brings up the network, changes into the
 * folder the startup script is served from and calls main() with the script as argv[1]. Doing
 * here what `softIoc -D softIoc.dbd` does on Linux lets one st.cmd serve every target.
 */
#include "dbAccess.h"
#include "dbStaticLib.h"
#include "epicsExit.h"
#include "epicsThread.h"
#include "iocsh.h"

extern "C" int ioc_registerRecordDeviceDriver(struct dbBase *pdbbase);

int main(int argc, char *argv[])
{
    if (dbLoadDatabase("dbd/ioc.dbd", NULL, NULL) != 0 ||
        ioc_registerRecordDeviceDriver(pdbbase) != 0) {
        epicsExit(1);
    }
    if (argc >= 2) {
        iocsh(argv[1]);
        epicsThreadSleep(.2);
    }
    iocsh(NULL);
    epicsExit(0);
    return 0;
}
