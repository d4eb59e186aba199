#!/bin/bash
# The source side of the blockmover image, run by VolSync as `/bin/bash -c /mover-rsync-tls/client.sh`:
# sends the snapshot at /dev/block to DESTINATION_ADDRESS:DESTINATION_PORT with the key at /keys/psk.txt.
#
# Retries like VolSync's rsync-tls client (5 tries, 2 4 8 16 s apart), but only failures the binary calls
# retryable (exit 75: network, a vanished peer, a timeout). A permanent failure (exit 1: keys do not match,
# target too small, ...) stops at once. A retry costs little: both sides compare digests, so only what is still
# missing on the destination travels. Exits 0 only when the destination confirmed the data durable, 1 otherwise.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

RETRY_DELAYS=${RETRY_DELAYS:-2 4 8 16 32}

[[ -n ${DESTINATION_ADDRESS:-} ]] ||
    die "DESTINATION_ADDRESS is not set: the source needs the address of the destination (its Service name or IP)"
DESTINATION_PORT=${DESTINATION_PORT:-8000}
check_port DESTINATION_PORT "$DESTINATION_PORT"

# An IPv6 literal needs brackets in host:port.
host=$DESTINATION_ADDRESS
if [[ $host == *:* && $host != \[* ]]; then
    host="[$host]"
fi
connect="$host:$((10#$DESTINATION_PORT))"

# One try per delay; delay N is slept after a retryable failure of try N. VolSync also sleeps after its last
# try, which only delays the failure report, so the last delay is not slept.
read -r -a delays <<<"$RETRY_DELAYS"
tries=${#delays[@]}
((tries > 0)) || die "RETRY_DELAYS is empty: it needs one delay (seconds) per try"
for delay in "${delays[@]}"; do
    [[ $delay =~ ^[0-9]+([.][0-9]+)?$ ]] || die "RETRY_DELAYS=\"$RETRY_DELAYS\": \"$delay\" is not a number of seconds"
done

check_volume_and_key read

# Who this source is, for its HELLO (a destination lets only the same source supersede a sync under way, and turns
# other sources away as busy) and for the metrics' obj_name: VolSync names the mover pod <job>-<5 characters>, and
# the Job (volsync-rsync-tls-src-<ReplicationSource>) stays the same across the pods of its retries.
if [[ -z ${BLOCKMOVER_NAME:-} && ${HOSTNAME:-} =~ ^(volsync-.+)-[a-z0-9]{5}$ ]]; then
    export BLOCKMOVER_NAME=${BASH_REMATCH[1]}
fi

for ((try = 1; try <= tries; try++)); do
    run_mover source --connect "$connect" --volume "$BLOCK_DEVICE" --psk "$KEY_FILE" --status "$STATUS_FILE" \
        "${MOVER_OPTIONS[@]}"
    [[ -z $SIGNAL ]] || die "interrupted by $SIGNAL: sync to $connect failed: $MOVER_ERROR"
    case $MOVER_RC in
    0) succeed "source, to $connect, try $try/$tries" ;;
    75)
        if ((try < tries)); then
            delay=${delays[try - 1]}
            say "try $try/$tries failed (retryable), retrying in ${delay}s: $MOVER_ERROR"
            pause "$delay"
            [[ -z $SIGNAL ]] || die "interrupted by $SIGNAL while waiting to retry: sync to $connect failed"
        fi
        ;;
    *) die "sync to $connect failed permanently on try $try/$tries (exit $MOVER_RC), not retrying: $MOVER_ERROR" ;;
    esac
done
die "sync to $connect failed after $tries tries: $MOVER_ERROR"
