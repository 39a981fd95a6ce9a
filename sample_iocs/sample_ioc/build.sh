#!/bin/sh
# Builds the sample IOC: the one build step of the Dockerfile's developer stage, the same for
# every target. Reads EPICS_TARGET_ARCH and EPICS_BASE from the toolchain stage's environment.
#
# 1. Lays out $IOC (/epics/ioc): config/st.cmd and db/*.db; for an RTEMS target also the boot
#    image bin/$EPICS_TARGET_ARCH/ioc.boot (and dbd/ioc.dbd), cross-built with EPICS's make; for
#    the PowerPC Linux guest (linux-ppc64le) its kernel and initramfs, bin/linux-ppc64le/vmlinux
#    and initrd.cpio, from /guest (the toolchain-guest stage).
# 2. Collects what the runtime image needs into $ASSETS, which the runtime stage copies to /:
#    the IOC folder and, on Linux x86_64, the part of EPICS base that runs it (softIoc, the
#    shared libraries it links, softIoc.dbd).
set -eu

src="$(cd "$(dirname "$0")" && pwd)/ioc"
: "${EPICS_TARGET_ARCH:?set by the toolchain stage}" "${EPICS_BASE:?set by the toolchain stage}"
IOC="${IOC:-/epics/ioc}"
ASSETS="${ASSETS:-/assets}"

echo "build: laying out $IOC for $EPICS_TARGET_ARCH"
mkdir -p "$IOC/config" "$IOC/db"
cp "$src"/config/* "$IOC/config/"
cp "$src"/db/*.db "$IOC/db/"

case "$EPICS_TARGET_ARCH" in
RTEMS-*)
    echo "build: cross-building the boot image with EPICS base at $EPICS_BASE"
    make -C "$src/app/src" EPICS_BASE="$EPICS_BASE" \
        CROSS_COMPILER_TARGET_ARCHS="$EPICS_TARGET_ARCH" INSTALL_LOCATION="$IOC"
    bindir="$IOC/bin/$EPICS_TARGET_ARCH"
    if [ ! -f "$bindir/ioc.boot" ]; then
        # A BSP config without MUNCH_SUFFIX = .boot installs only the ELF; QEMU's PReP board
        # loads a raw binary at 0x01000000, so make one the way EPICS's MUNCH_CMD does.
        for elf in "$bindir/ioc.elf" "$bindir/ioc"; do
            [ -f "$elf" ] && break
        done
        "${OBJCOPY:-powerpc-rtems5-objcopy}" -O binary -R .comment -S "$elf" "$bindir/ioc.boot"
    fi
    ;;
linux-ppc64le)
    # The guest runs st.cmd with its own IOC (miniioc): nothing to compile, only its boot files.
    echo "build: nothing to compile, taking the PowerPC guest's kernel and initramfs from /guest"
    bindir="$IOC/bin/$EPICS_TARGET_ARCH"
    mkdir -p "$bindir"
    cp /guest/vmlinux /guest/initrd.cpio "$bindir/"
    ;;
linux-*)
    echo "build: nothing to compile, EPICS base's softIoc is this IOC's binary"
    ;;
*)
    echo "build: unknown EPICS_TARGET_ARCH '$EPICS_TARGET_ARCH'" >&2
    exit 1
    ;;
esac

echo "build: collecting runtime files into $ASSETS"
mkdir -p "$ASSETS/epics"
cp -a "$IOC" "$ASSETS/epics/"
case "$EPICS_TARGET_ARCH" in
linux-ppc64le)
    # Booted under QEMU, not run in a container: no softIoc, only the boot payload in $IOC.
    ;;
linux-*)
    base="$ASSETS/epics/epics-base"
    mkdir -p "$base/bin" "$base/lib" "$base/dbd"
    cp -L "$EPICS_BASE/bin/softIoc" "$base/bin/"
    cp -L "$EPICS_BASE/dbd/softIoc.dbd" "$base/dbd/"
    # Only the libraries softIoc links that come from EPICS base; the rest are the OS's.
    for lib in $(ldd "$EPICS_BASE/bin/softIoc" | awk '{ print $1 }'); do
        if [ -e "$EPICS_BASE/lib/$lib" ]; then
            cp -L "$EPICS_BASE/lib/$lib" "$base/lib/"
        fi
    done
    ;;
esac
