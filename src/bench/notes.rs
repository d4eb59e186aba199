//! The notes under the table: how to read its figures, given the flags and what the run saw.

use super::report::{CHANGELIST, DELAYED, MANIFEST, REFLINK};
use super::rsync::RsyncSetup;
use super::BenchArgs;

/// The notes of a run with `args`; `cached` is the share of each prepared file in the page cache when its timed sync
/// started (evicted with `--cold`, read whole otherwise), `load` the load average when it started.
pub fn notes(
    args: &BenchArgs,
    cached: &[f64],
    load: Option<f64>,
    setups: &[RsyncSetup],
) -> Vec<String> {
    let mut notes = vec![
        "duration is wall time until the target is durable: blockmover's source exits only after the destination \
         fsynced the target and confirmed the volume digest; each rsync run is timed together with an fsync of its \
         target file. Daemons (blockmover destination, rsync daemon, stunnel) are started before the clock."
            .to_owned(),
        "wire: blockmover counts TCP payload bytes including TLS at its sockets; rsync reports its own protocol \
         bytes (`sent`/`received`), so stunnel's TLS overhead is not in volsync-rsync-tls's figures."
            .to_owned(),
        "scan rate = volume / duration; max RPO = interval + duration; hashed = bytes both agents hash per second \
         (2 x volume / duration) over the raw all-core BLAKE3 rate above (all-zero chunks are recognised without \
         hashing, so sparse volumes can exceed 100%); not shown for delta syncs, which do not hash both volumes."
            .to_owned(),
        "read src / read dst: bytes each blockmover agent read from its volume or target (its status' bytesRead)."
            .to_owned(),
        if args.cold {
            "volumes and targets were written back and dropped from the page cache (fsync, posix_fadvise \
             DONTNEED) before each timed sync; every target is compared with the volume (BLAKE3) after every sync."
                .to_owned()
        } else {
            "volumes and targets were read whole through the page cache just before each timed sync; every target \
             is compared with the volume (BLAKE3) after every sync."
                .to_owned()
        },
    ];
    if args.delta {
        notes.push(format!(
            "delta (--delta): the blockmover full sync ran with --state-dir on both agents, which keeps a manifest \
             (chunk digests) of the synced image. Each change is then synced three times from the same target and \
             state: blockmover (no state dir: a full comparison, both agents read and hash everything), {MANIFEST} \
             (both state dirs: syncKind delta-manifest, the source hashes its whole volume against its manifest, the \
             destination reads nothing), {CHANGELIST} (both state dirs and source --changed-extents with the exact \
             byte ranges the change wrote: syncKind delta-changelist, the source reads only those chunks). Between \
             them the bench writes the target's old bytes of the changed ranges back, resets its mtime and restores \
             the state dirs (outside the clock); the bench fails if an agent reports another syncKind."
        ));
    }
    if args.repeat > 1 {
        notes.push(format!(
            "repeat (--repeat {}): each incremental sync of a change ran {} times from the same target state, every \
             tool once per round (the target, its mtime and the state dirs put back between runs, outside the \
             clock); each row is its tool's median run, with that run's own CPU, RSS and bytes (for an even count \
             the lower of the two middle runs); every run's duration is listed under the table.",
            args.repeat, args.repeat
        ));
    }
    if args.reflink {
        notes.push(format!(
            "reflink (--reflink): {REFLINK} is a fourth delta row, last: the source clones the volume with FICLONE \
             (source --snapshot reflink, inside the clock) and its change list comes from the FIEMAP extent maps of \
             that clone and the clone kept by the previous sync (syncKind delta-changelist, changeTracker reflink \
             extents): the change as the file system tracked it, against {CHANGELIST}'s exact list."
        ));
    }
    if args.allocated {
        notes.push(
            "allocated: every hole of the volume and of each target was filled with written zeros before each \
             timed sync, as on a block PVC (no hole for a reader to skip); blockmover's own zeroing punches holes \
             in a file target, which the next sync's preparation fills again (then puts the target's mtime back, \
             as a block device has none for a manifest to go stale on)."
                .to_owned(),
        );
    }
    // Warm: the least cached file is what matters; cold: the most cached one.
    let extreme = if args.cold { f64::max } else { f64::min };
    let share = cached.iter().copied().reduce(extreme);
    notes.push(match (args.cold, share) {
        (false, Some(share)) => format!(
            "warm: at least {:.1}% of a volume's or target's pages were cached when the clock started ({} files \
             measured with fincore)",
            share * 100.0,
            cached.len()
        ),
        (true, Some(share)) => format!(
            "cold: after eviction, at most {:.1}% of a volume's or target's pages were still cached when the \
             clock started ({} files measured with fincore)",
            share * 100.0,
            cached.len()
        ),
        (false, None) => "warm: how much was cached could not be measured (fincore missing)".to_owned(),
        (true, None) => "cold: how much stayed cached could not be measured (fincore missing)".to_owned(),
    });
    if let Some(ms) = args.rtt_ms {
        notes.push(format!(
            "{DELAYED}: the same incremental sync as the blockmover row above it, from the same target state, \
             with the source connected through a proxy that delays every byte by {} ms each way ({ms} ms round \
             trip).",
            ms as f64 / 2.0
        ));
    }
    if let Some(load) = load.filter(|l| *l >= 0.5) {
        notes.push(format!(
            "the 1-minute load average was {load:.2} when the bench started: other processes were using the \
             cores, so durations are longer and noisier than on an idle machine"
        ));
    }
    for setup in setups {
        if let Some(tls) = setup.negotiated_tls() {
            notes.push(format!(
                "{}: stunnel negotiated {tls}",
                setup.flavour().name()
            ));
        }
    }
    if !setups.is_empty() {
        notes.push(
            "rsync RSS src is the rsync client (the sender); RSS dst sums the rsync processes serving the \
             connection (generator and receiver), stunnel not counted."
                .to_owned(),
        );
    }
    notes
}
