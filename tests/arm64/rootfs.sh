#!/usr/bin/env bash
# The Debian bookworm arm64 root file system in which tests/test_arm64.py runs distnn under
# qemu-user: a venv /opt/venv with numpy, h5py, mpi4py, mpich, threadpoolctl and pytest at
# the host venv's versions. Cached in $DISTNN_ARM64_CACHE (default /var/cache/distnn-arm64)
# under a key of this script and those versions; .distnn-complete, written last, marks it done.
#   rootfs.sh build|path|remove|binfmt   build it unless complete | print its folder |
#                                        remove it | register qemu-aarch64 with binfmt_misc
# Needs root, debootstrap, qemu-user-static, the host's Debian mirror and PyPI.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/../.." && pwd)
CACHE=${DISTNN_ARM64_CACHE:-/var/cache/distnn-arm64}
MARKER=.distnn-complete
PACKAGES=(numpy h5py mpi4py mpich threadpoolctl pytest)
export QEMU_CPU=neoverse-n1   # qemu's default "max" CPU model is 3-10x slower

die() { echo "rootfs.sh: $*" >&2; exit 1; }

# "name==version" for each package as the host venv has it ("name" alone when it has none)
pins() {
    local venv=${DISTNN_HOST_VENV:-$REPO/.venv} pkg found
    for pkg in "${PACKAGES[@]}"; do
        found=$(compgen -G "$venv/lib/python3*/site-packages/$pkg-*.dist-info" | head -n 1 || true)
        if [ -n "$found" ]; then
            found=${found##*/}
            found=${found%.dist-info}
            echo "$pkg==${found#"$pkg"-}"
        else
            echo "$pkg"
        fi
    done
}

folder() {
    local key
    key=$({ cat "$SCRIPT"; pins; } | sha256sum | cut -c1-12)
    echo "$CACHE/$key"
}

# the first mirror of the host's apt sources that serves bookworm (deb822 or one-line form)
mirror() {
    local found=""
    if [ -n "${DISTNN_ARM64_MIRROR:-}" ]; then echo "$DISTNN_ARM64_MIRROR"; return; fi
    shopt -s nullglob
    local sources=(/etc/apt/sources.list.d/*.sources) lists=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    shopt -u nullglob
    if [ ${#sources[@]} -gt 0 ]; then
        found=$(awk 'BEGIN { RS = ""; FS = "\n" }
            { uris = ""; suites = ""
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                  if ($i ~ /^Suites:/) suites = $i " "
              }
              if (suites ~ /[ \t]bookworm[ \t]/ && uris != "") { split(uris, u, " "); print u[1]; exit } }' \
            "${sources[@]}")
    fi
    if [ -z "$found" ]; then
        found=$(cat "${lists[@]}" 2>/dev/null | awk '$1 == "deb" {
            for (i = 2; i < NF; i++) if ($i ~ /:\/\// && $(i + 1) == "bookworm") { print $i; exit } }')
    fi
    [ -n "$found" ] || die "no bookworm mirror in the host's apt sources: set DISTNN_ARM64_MIRROR"
    echo "$found"
}

binfmt() {
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    [ -x /usr/bin/qemu-aarch64-static ] || die "qemu-user-static is not installed (apt-get install qemu-user-static binfmt-support)"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e "$entry" ] || ! grep -qx enabled "$entry"; then
        update-binfmts --enable qemu-aarch64
    fi
    grep -qx enabled "$entry" || die "qemu-aarch64 is not registered with binfmt_misc"
    # F: qemu is opened when registered, so it runs inside a chroot without a copy there
    grep -q '^flags:.*F' "$entry" || die "qemu-aarch64's binfmt entry lacks the F flag"
}

# run a shell command inside the rootfs, in private mount and PID namespaces (its /proc
# mount and its processes end with it, whatever happens)
inside() {
    local dir=$1 command=$2
    unshare --mount --propagation private --pid --fork --kill-child -- /bin/bash -c '
        set -euo pipefail
        trap "umount \"$1/proc\" 2>/dev/null || true" EXIT
        mount -t proc proc "$1/proc"
        chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            QEMU_CPU="$QEMU_CPU" PIP_CONFIG_FILE=/dev/null PIP_CERT=/opt/host-ca.crt \
            PIP_DISABLE_PIP_VERSION_CHECK=1 \
            PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180 /bin/sh -euc "$2"' _ "$dir" "$command"
}

build() {
    local dir start mirror pinned
    [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    binfmt
    dir=$(folder)
    if [ -e "$dir/$MARKER" ]; then
        echo "$dir"
        return
    fi
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9                                   # one build at a time
    if [ -e "$dir/$MARKER" ]; then echo "$dir"; return; fi
    if [ -e "$dir" ]; then
        echo "rootfs.sh: removing the half-built $dir" >&2
        remove_folder "$dir"
    fi
    start=$SECONDS
    mirror=$(mirror)
    mapfile -t pinned < <(pins)
    echo "rootfs.sh: debootstrap arm64 bookworm from $mirror into $dir" >&2
    # its second stage runs under qemu (binfmt) and mounts /proc and /sys in the target: in
    # a private mount namespace, so that no mount outlives it even when it is killed
    unshare --mount --propagation private -- \
        debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$dir" "$mirror" >&2
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/opt/host-ca.crt"   # PyPI as the host reaches it
    mkdir -p "$dir/distnn" "$dir/out"                                # test_arm64.py's mount points
    echo "rootfs.sh: pip install ${pinned[*]} into /opt/venv (under qemu)" >&2
    inside "$dir" "python3 -m venv /opt/venv
        /opt/venv/bin/pip install --quiet --only-binary=:all: ${pinned[*]}
        /opt/venv/bin/python -c 'import numpy, h5py, mpi4py, threadpoolctl, pytest'
        rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/*" >&2
    {
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s from $mirror"
        inside "$dir" "/opt/venv/bin/pip freeze --all"
    } >"$dir/$MARKER.tmp"
    mv "$dir/$MARKER.tmp" "$dir/$MARKER"
    echo "rootfs.sh: built in $((SECONDS - start)) s" >&2
    echo "$dir"
}

remove_folder() {
    local dir=$1
    if findmnt -rn -o TARGET | grep -q "^$dir\(/\|$\)"; then
        die "something is mounted under $dir: unmount it first"
    fi
    rm -rf --one-file-system "$dir"
}

case "${1:-}" in
    build) build ;;
    path) folder ;;
    remove)
        [ "$(id -u)" = 0 ] || die "needs root"
        dir=$(folder)
        [ ! -e "$dir" ] || remove_folder "$dir"
        ;;
    binfmt) binfmt ;;
    *) echo "usage: $0 build|path|remove|binfmt" >&2; exit 2 ;;
esac
