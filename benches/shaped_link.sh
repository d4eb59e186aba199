#!/bin/bash
# The zstd level against the link: full syncs of a volume over loopback TLS with --zstd-level 1, 3 and
# --compress auto (the level chosen during the sync), the destination's port shaped by tc htb to each of RATES
# (other loopback traffic untouched). Needs root (tc) and a release build. Every target is compared with the volume.
#
#   (tar cf - /usr/lib /usr/share /usr/include /usr/bin | head -c 536870912) > /dev/shm/real/vol512.img
#   VOL=/dev/shm/real/vol512.img RATES="100mbit 1gbit none" benches/shaped_link.sh
#
# Prints one line per sync: duration (source start to exit, i.e. until the target is durable and verified), wire
# bytes sent, and the level at the end (and the highest) from the source's status.
set -u
B=${B:-$(cd "$(dirname "$0")/.." && pwd)/target/release/blockmover}
VOL=${VOL:?set VOL to the volume file}
D=/dev/shm/shaped; mkdir -p $D; cd $D
[ -f psk.txt ] || $B keygen --out psk.txt >/dev/null 2>&1 || exit 1
PORT=47200
shape() {
  tc qdisc del dev lo root 2>/dev/null
  [ "$1" = none ] && return
  # htb (prio is not in this kernel): the destination's port in a class of $1, everything else unshaped.
  tc qdisc add dev lo root handle 1: htb default 20 || exit 1
  tc class add dev lo parent 1: classid 1:10 htb rate $1 ceil $1 burst 256kb || exit 1
  tc class add dev lo parent 1: classid 1:20 htb rate 100gbit ceil 100gbit || exit 1
  tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport $PORT 0xffff flowid 1:10 || exit 1
}
for rate in ${RATES:-100mbit 1gbit none}; do
  shape $rate
  for mode in "--zstd-level 1" "--zstd-level 3" "--compress auto"; do
    rm -f t.img; truncate -s $(stat -c %s $VOL) t.img
    $B destination --listen 127.0.0.1:$PORT --target t.img --psk psk.txt --status d.json >d.log 2>&1 &
    dpid=$!; sleep 0.3
    start=$(date +%s.%N)
    $B source --connect 127.0.0.1:$PORT --volume $VOL --psk psk.txt $mode --status s.json >s.log 2>&1; rc=$?
    end=$(date +%s.%N)
    wait $dpid
    python3 - "$rate" "$mode" "$rc" "$start" "$end" <<'PY'
import json,sys
rate,mode,rc,start,end=sys.argv[1:]
e=json.load(open('s.json')); e=e.get('external',e)
print(f"{rate:8} {mode:16} rc={rc} {float(end)-float(start):6.2f} s  wire {int(e['wireBytesSent'])/2**20:7.1f} MiB  level {e.get('zstdLevel','-')} (max {e.get('zstdLevelMax','-')})")
PY
    cmp -s $VOL t.img || echo "TARGET DIFFERS"
  done
done
shape none
