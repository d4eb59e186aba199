# shellcheck shell=bash
# Shared by client.sh and server.sh (sourced, never run): settings with VolSync's defaults, log lines that
# VolSync's log filter keeps, preconditions, and running the blockmover binary so that a signal sent to the
# script (PID 1 in the mover pod) reaches the binary, which then records the interruption in its status file.
#
# Every path is an environment variable defaulting to VolSync's rsync-tls mover contract, so the tests can run
# these scripts outside a container (see README.md).

BLOCKMOVER_BIN=${BLOCKMOVER_BIN:-blockmover}
BLOCK_DEVICE=${BLOCK_DEVICE:-/dev/block}
DATA_DIR=${DATA_DIR:-/data}
KEY_FILE=${KEY_FILE:-/keys/psk.txt}
STATUS_FILE=${STATUS_FILE:-/tmp/blockmover-status.json}
# ADDR:PORT to serve Prometheus metrics on (http://ADDR:PORT/metrics) while the binary runs; empty: none.
METRICS_LISTEN=${METRICS_LISTEN:-}
# The binary's options both entrypoints pass after their own.
MOVER_OPTIONS=()
if [[ -n $METRICS_LISTEN ]]; then
    MOVER_OPTIONS+=(--metrics-listen "$METRICS_LISTEN")
fi

if [[ ${DEBUG_MOVER:-0} == 1 ]]; then
    set -x
    export BLOCKMOVER_LOG=debug
fi

# Microseconds since the epoch; EPOCHREALTIME's decimal point depends on the locale, so keep the digits only.
now_us() { printf '%s' "${EPOCHREALTIME//[!0-9]/}"; }
STARTED_US=$(now_us)

# Seconds since the script started, e.g. "12.34".
elapsed() {
    local us=$(($(now_us) - STARTED_US))
    printf '%d.%02d' $((us / 1000000)) $((us % 1000000 / 10000))
}

# One log line. Script lines start with "blockmover: " so they never look like the binary's own "error: " line.
say() { printf 'blockmover: %s\n' "$*" >&2; }

# The failure line (VolSync keeps lines matching "[eE]rror" and "[fF]ail" when a mover fails), then exit 1:
# never any other non-zero code, so nothing can wrap around to 0.
die() {
    printf 'blockmover: error: %s\n' "$*" >&2
    exit 1
}

# "[rR]sync completed in" is what VolSync keeps of a successful run besides the binary's summary lines.
succeed() {
    say "rsync completed in $(elapsed)s ($*)"
    exit 0
}

# Dies unless NAME's value is a TCP port number.
check_port() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[0-9]{1,5}$ ]] || ((10#$value < 1 || 10#$value > 65535)); then
        die "$name=$value is not a port number (1-65535)"
    fi
}

# Who this process is, for permission errors: "uid:gid 65532:65532 (groups 65532 6)".
whoami_ids() { printf 'uid:gid %s:%s (groups %s)' "$(id -u)" "$(id -g)" "$(id -G)"; }

# Owner, group and mode of PATH (following symlinks), e.g. "root:disk 660".
node_mode() { stat -L -c '%U:%G %a' -- "$1" 2>/dev/null || printf 'unknown owner and mode'; }

# check_volume_and_key read|readwrite: dies with a clear reason, naming the fix, unless a block device (or,
# outside a cluster, a file) is at BLOCK_DEVICE and can be opened as needed, and the key file is readable.
check_volume_and_key() {
    local access=$1
    if [[ ! -e $BLOCK_DEVICE ]]; then
        if [[ -d $DATA_DIR ]]; then
            die "filesystem PVCs are not supported by this mover: found $DATA_DIR but no block device at" \
                "$BLOCK_DEVICE; use a PVC with volumeMode: Block"
        fi
        die "no block device at $BLOCK_DEVICE: mount a PVC with volumeMode: Block at devicePath $BLOCK_DEVICE"
    fi
    if [[ ! -r $BLOCK_DEVICE || ($access == readwrite && ! -w $BLOCK_DEVICE) ]]; then
        local how=reading
        [[ $access == readwrite ]] && how="reading and writing"
        die "permission denied: $BLOCK_DEVICE ($(node_mode "$BLOCK_DEVICE")) cannot be opened for $how by" \
            "$(whoami_ids): give the pod's user the device (containerd/CRI-O" \
            "device_ownership_from_security_context = true makes it owned by runAsUser:runAsGroup), or add the" \
            "device's group to the pod's supplementalGroups, or run the mover privileged (uid 0)"
    fi
    if [[ ! -e $KEY_FILE ]]; then
        die "no key file at $KEY_FILE: mount the key Secret at ${KEY_FILE%/*}"
    fi
    if [[ ! -r $KEY_FILE ]]; then
        die "the key file $KEY_FILE exists but is not readable by $(whoami_ids): it is" \
            "$(node_mode "$KEY_FILE"); set the pod's securityContext.fsGroup (the kubelet then gives the Secret's" \
            "files that group and group read) and mount the Secret with defaultMode 0600 (384), or run as its owner"
    fi
    # The binary refuses a key file that group or others can read. VolSync mounts the Secret with mode 0600, but
    # under a pod fsGroup the kubelet adds group read (0640), and the file belongs to root, not to a non-root mover:
    # hand the binary a private copy, mode 0600, in the work directory (under /tmp, an in-memory emptyDir in the
    # mover pod; removed on exit).
    local private=$WORK_DIR/psk.txt
    (umask 077 && cat -- "$KEY_FILE" >"$private") || die "cannot copy the key file $KEY_FILE to $private"
    KEY_FILE=$private
}

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/blockmover.XXXXXX") || die "cannot create a work directory in ${TMPDIR:-/tmp}"
on_exit() {
    local rc=$?
    rm -rf "$WORK_DIR"
    # Whatever ended the script, it exits 0 or 1: never a code that could wrap around to 0.
    if ((rc != 0 && rc != 1)); then
        exit 1
    fi
}
trap on_exit EXIT

# The background process being waited for (the binary or a retry pause) and the signal that asked us to stop.
CHILD=
SIGNAL=
on_signal() {
    # shellcheck disable=SC2034 # read by client.sh and server.sh
    SIGNAL=$1
    if [[ -n $CHILD ]]; then
        kill -TERM "$CHILD" 2>/dev/null || true
    fi
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT

# Waits for CHILD and returns its exit status. A trapped signal interrupts `wait` (status > 128) while the child
# still runs (it was just sent SIGTERM): wait again for its own status.
wait_child() {
    local rc
    while :; do
        rc=0
        wait "$CHILD" || rc=$?
        if ((rc > 128)) && kill -0 "$CHILD" 2>/dev/null; then
            continue
        fi
        CHILD=
        return "$rc"
    done
}

# Sleeps SECONDS in the background, so that a signal ends the pause at once.
pause() {
    sleep "$1" &
    CHILD=$!
    wait_child || true
}

# run_mover ARGS...: runs "$BLOCKMOVER_BIN ARGS..." in the background with its stdout and stderr copied to ours
# (live) and to files. Always returns 0 and sets:
#   MOVER_RC        the binary's exit status (0 synced and durable, 1 permanent, 75 retryable, 2 usage, ...)
#   MOVER_ERROR     the text of its last "error: " line (or why it could not run)
#   MOVER_LISTENED  1 if it printed "listening on ADDR" (the destination got past binding its port)
run_mover() {
    local out=$WORK_DIR/stdout err=$WORK_DIR/stderr tee_out tee_err line
    rm -f "$out.fifo" "$err.fifo"
    mkfifo -m 600 "$out.fifo" "$err.fifo"
    tee "$out" <"$out.fifo" &
    tee_out=$!
    tee "$err" <"$err.fifo" >&2 &
    tee_err=$!
    "$BLOCKMOVER_BIN" "$@" </dev/null >"$out.fifo" 2>"$err.fifo" &
    CHILD=$!
    MOVER_RC=0
    wait_child || MOVER_RC=$?
    # The copies end when the binary closes its output; wait so that the files are complete.
    wait "$tee_out" "$tee_err" || true

    MOVER_ERROR=
    while IFS= read -r line; do
        if [[ $line == "error: "* ]]; then
            MOVER_ERROR=${line#error: }
        fi
    done <"$err"
    if [[ -z $MOVER_ERROR ]]; then
        case $MOVER_RC in
        126 | 127) MOVER_ERROR="cannot run $BLOCKMOVER_BIN" ;;
        *) MOVER_ERROR="$BLOCKMOVER_BIN exited with status $MOVER_RC without an error line" ;;
        esac
    fi
    MOVER_LISTENED=0
    while IFS= read -r line; do
        if [[ $line == "listening on "* ]]; then
            # shellcheck disable=SC2034 # read by server.sh
            MOVER_LISTENED=1
        fi
    done <"$out"
    return 0
}
