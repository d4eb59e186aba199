#!/bin/bash
# Builds the blockmover image without any container registry: a Debian bookworm base made with debootstrap
# (from Debian's mirror) and imported into podman once, the binary built by cargo on this machine (same Debian
# release, so the same glibc), and the final stage of container/Containerfile on top, so that both builds give
# the same layout, user and entrypoints. Installs podman, runc, netavark, aardvark-dns, catatonit and debootstrap
# with apt-get when they are missing (as root).
#
#   container/build-local.sh [TAG]                     # default localhost/blockmover:dev
#   container/build-local.sh --install-only            # only install the tools and write the podman configuration
#   BLOCKMOVER_BIN=target/release/blockmover container/build-local.sh   # reuse a built binary
#
# Environment:
#   BLOCKMOVER_BIN   a built binary to put in the image (default: cargo build --release --locked)
#   BASE_IMAGE       the base image, reused when it exists (default localhost/blockmover-base:bookworm)
#   DEBIAN_MIRROR    debootstrap's mirror (default http://deb.debian.org/debian)
#   CONTAINERS_CONF  podman's configuration, used as it is when the file exists; otherwise one is written there
#                    (runc, the host's ulimits, netavark), by default ${XDG_RUNTIME_DIR:-/tmp}/blockmover-containers.conf
# The last line on stdout is the image's tag; everything else goes to stderr.
set -euo pipefail

INSTALL_ONLY=0
if [[ ${1:-} == --install-only ]]; then
    INSTALL_ONLY=1
    shift
fi
TAG=${1:-localhost/blockmover:dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/blockmover-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf 'build-local: %s\n' "$*" >&2; }
die() {
    printf 'build-local: error: %s\n' "$*" >&2
    exit 1
}

# apt-get install PACKAGES when COMMAND is missing (root with apt-get only).
need() {
    local command=$1
    shift
    command -v "$command" >/dev/null 2>&1 && return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "$command is missing: install $* (as root, with apt-get on Debian)"
    fi
    say "installing $*"
    if [[ -z ${APT_UPDATED:-} ]]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 ||
        die "apt-get install $* failed"
}

need podman podman
need runc runc
# Names of containers on a podman network resolve through aardvark-dns, which needs the netavark backend.
need /usr/lib/podman/netavark netavark
need /usr/lib/podman/aardvark-dns aardvark-dns
# The pause process of a pod's infra container, which podman kube play builds its pause image from (no registry).
need catatonit catatonit

# A hard limit of "unlimited" needs no lowering: podman's default (1048576) is then allowed.
hard_limit() {
    local limit
    limit=$(ulimit -H "$1")
    [[ $limit == unlimited ]] && limit=1048576
    printf '%s' "$limit"
}

# runc, not crun ("cgroups in hybrid mode not supported" on hosts with cgroup v1 and v2 mounted); default ulimits
# no higher than this host's hard limits (podman raises nofile to 1048576 by default: "setrlimit RLIMIT_NOFILE:
# Operation not permitted" where the hard limit is lower); netavark for name resolution between containers.
CONTAINERS_CONF=${CONTAINERS_CONF:-${XDG_RUNTIME_DIR:-/tmp}/blockmover-containers.conf}
if [[ ! -e $CONTAINERS_CONF ]]; then
    nofile=$(hard_limit -n)
    nproc=$(hard_limit -u)
    ((nproc <= 32768)) || nproc=32768
    (umask 022 && cat >"$CONTAINERS_CONF.tmp.$$") <<EOF
# Written by blockmover's container/build-local.sh; use with: export CONTAINERS_CONF=$CONTAINERS_CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
events_logger = "file"
[network]
network_backend = "netavark"
EOF
    mv -f "$CONTAINERS_CONF.tmp.$$" "$CONTAINERS_CONF"
    say "podman configuration: $CONTAINERS_CONF (export CONTAINERS_CONF=$CONTAINERS_CONF to run the image)"
fi
export CONTAINERS_CONF
if ((INSTALL_ONLY)); then
    need debootstrap debootstrap
    say "podman, runc, netavark, aardvark-dns, catatonit and debootstrap are installed"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockmover-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The base: Debian bookworm minbase (bash, coreutils, libgcc_s: all the entrypoints and the binary need), without
# apt's caches, documentation and translations. Made once; later builds reuse the imported image.
if podman image exists "$BASE_IMAGE"; then
    say "reusing the base image $BASE_IMAGE"
else
    need debootstrap debootstrap
    [[ $(id -u) == 0 ]] || die "debootstrap needs root to make the base image $BASE_IMAGE"
    say "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
    started=$SECONDS
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 20 "$WORK/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    (cd "$WORK/rootfs" && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* usr/share/doc/* \
        usr/share/man/* usr/share/locale/* usr/share/info/*)
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null ||
        die "podman import of the base image failed"
    rm -rf "$WORK/rootfs"
    say "base image $BASE_IMAGE made in $((SECONDS - started)) s"
fi

# The binary: the one given, or a release build of this tree.
if [[ -z ${BLOCKMOVER_BIN:-} ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust, or give a built binary in BLOCKMOVER_BIN"
    say "cargo build --release --locked --bin blockmover"
    (cd "$ROOT" && cargo build --release --locked --bin blockmover >&2) || die "cargo build failed"
    BLOCKMOVER_BIN=$ROOT/target/release/blockmover
fi
[[ -x $BLOCKMOVER_BIN ]] || die "BLOCKMOVER_BIN=$BLOCKMOVER_BIN is not an executable file"

# The build context holds only what the image gets, laid out as the Containerfile's builder stage lays out /out.
out=$WORK/context/out
install -D -m 0755 "$BLOCKMOVER_BIN" "$out/usr/local/bin/blockmover"
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$out/usr/local/bin/blockmover"
fi
install -d -m 0755 "$out/mover-rsync-tls"
install -m 0755 "$ROOT/container/client.sh" "$ROOT/container/server.sh" "$out/mover-rsync-tls/"
install -m 0644 "$ROOT/container/common.sh" "$out/mover-rsync-tls/"

# The Containerfile's final stage, from its last FROM, on the local base, copying out/ instead of the builder's
# /out/. A Containerfile whose final stage no longer copies /out/ stops this build rather than drifting from it.
containerfile=$ROOT/container/Containerfile
grep -qx 'COPY --from=builder /out/ /' "$containerfile" ||
    die "$containerfile: the final stage no longer has 'COPY --from=builder /out/ /': update build-local.sh"
awk -v base="$BASE_IMAGE" '
    /^FROM / { stage = "" }
    { stage = stage $0 "\n" }
    END {
        sub(/^FROM [^\n]*\n/, "FROM " base "\n", stage)
        sub(/COPY --from=builder \/out\/ \//, "COPY out/ /", stage)
        printf "%s", stage
    }' "$containerfile" >"$WORK/context/Containerfile"

say "podman build --pull=never -t $TAG"
started=$SECONDS
podman build --pull=never --quiet -t "$TAG" -f "$WORK/context/Containerfile" "$WORK/context" >/dev/null ||
    die "podman build failed"
size=$(podman image inspect --format '{{.Size}}' "$TAG")
say "built $TAG in $((SECONDS - started)) s: $((size / 1000000)) MB"
printf '%s\n' "$TAG"
