#!/bin/bash
# The destination side of the blockmover image, run by VolSync as `/bin/bash -c /mover-rsync-tls/server.sh`:
# receives one sync into the block device at /dev/block, on port 8000 of every address ([::], dual-stack, or
# 0.0.0.0 when IPv6 is disabled), with the key at /keys/psk.txt.
#
# Unlike VolSync's block mover, a source that vanishes mid-transfer can come back: when a session fails with a
# retryable error (exit 75) the destination listens again for the source's next try, up to SESSION_TRIES
# sessions. Exits 0 only when the binary exits 0 (the data is verified and durable), 1 otherwise.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

LISTEN_PORT=${LISTEN_PORT:-8000}
IPV6_DISABLE_FILE=${IPV6_DISABLE_FILE:-/sys/module/ipv6/parameters/disable}
# 15 = VolSync's 5 tries per source pod times the 3 pods of a Job with backoffLimit 2.
SESSION_TRIES=${SESSION_TRIES:-15}

check_port LISTEN_PORT "$LISTEN_PORT"
if ! [[ $SESSION_TRIES =~ ^[0-9]{1,4}$ ]] || ((10#$SESSION_TRIES < 1)); then
    die "SESSION_TRIES=$SESSION_TRIES is not a positive number"
fi
check_volume_and_key readwrite

listen_host='[::]'
if [[ -r $IPV6_DISABLE_FILE && $(<"$IPV6_DISABLE_FILE") == 1 ]]; then
    listen_host=0.0.0.0
fi
listen="$listen_host:$((10#$LISTEN_PORT))"

for ((session = 1; ; session++)); do
    run_mover destination --listen "$listen" --target "$BLOCK_DEVICE" --psk "$KEY_FILE" --status "$STATUS_FILE" \
        "${MOVER_OPTIONS[@]}"
    [[ -z $SIGNAL ]] || die "interrupted by $SIGNAL: sync into $BLOCK_DEVICE failed: $MOVER_ERROR"
    case $MOVER_RC in
    0) succeed "destination, on $listen, session $session" ;;
    75)
        ((MOVER_LISTENED)) || die "the destination did not start on $listen (exit $MOVER_RC): $MOVER_ERROR"
        ((session < 10#$SESSION_TRIES)) ||
            die "sync into $BLOCK_DEVICE failed in each of $session sessions: $MOVER_ERROR"
        say "session $session failed (retryable), listening again for the source's next try: $MOVER_ERROR"
        ;;
    *) die "sync into $BLOCK_DEVICE failed permanently (exit $MOVER_RC): $MOVER_ERROR" ;;
    esac
done
