//! The figures of one sync (counted by both agents), their `external` status form and the summary log lines.
//!
//! The summary lines are shaped so that VolSync's log filter keeps them in `latestMoverStatus.logs`:
//! `sent N bytes  received M bytes ...` and `total size is N ...` (see `../shared/volsync/CONTRACT.md`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::chunk::Digest;
use crate::codec::{Fallback, SyncKind};
use crate::net::WireCounters;

/// Counters of one sync; shared by the threads of an agent.
#[derive(Debug, Default)]
pub struct Figures {
    /// Volume size in bytes.
    pub volume_size: AtomicU64,
    /// Chunk size in bytes.
    pub chunk_size: AtomicU64,
    /// Chunks in the volume.
    pub chunks_total: AtomicU64,
    /// Chunks whose digests differed.
    pub chunks_changed: AtomicU64,
    /// Chunks that travelled as DATA.
    pub chunks_sent: AtomicU64,
    /// Whole chunks zeroed by marker.
    pub zero_chunks: AtomicU64,
    /// Blocks carried as data.
    pub blocks_sent: AtomicU64,
    /// Blocks zeroed by marker inside DATA.
    pub zero_blocks: AtomicU64,
    /// Raw bytes of the blocks carried.
    pub data_bytes: AtomicU64,
    /// Their size on the wire after compression (or raw).
    pub compressed_bytes: AtomicU64,
    /// Bytes read from the local volume or target.
    pub bytes_read: Arc<AtomicU64>,
    /// Bytes through the socket.
    pub wire: Arc<WireCounters>,
    /// The agreed volume digest, once known.
    pub volume_digest: Mutex<Option<Digest>>,
    /// The session's kind, and why it is a full comparison (`None` until READY).
    pub kind: Mutex<Option<(SyncKind, Fallback)>>,
    /// Source, full comparison with a change list: chunks that changed but were not in the list.
    pub change_list_missed: AtomicU64,
    /// A delta by change list: chunks pushed with their listed blocks (BLOCKS frames).
    pub pushed_chunks: AtomicU64,
    /// Destination: pushed chunks whose listed blocks did not rebuild the source's chunk (the list missed a changed
    /// block of it, or the target drifted); asked for with NEED and repaired in the same sync.
    pub push_missed: AtomicU64,
    /// Destination: target chunks that did not hold what the destination's manifest said (written by something
    /// else, or a stale manifest); a full comparison repairs them.
    pub target_drift: AtomicU64,
    /// Source: `--bwlimit` in bytes per second (0: none).
    pub rate_limit: AtomicU64,
    /// Bytes per second sent on the wire from connect to the end of the session (set when it ends).
    pub wire_send_rate: AtomicU64,
    /// Source: `--read-depth`, the reads kept in flight on the volume (0: not yet known).
    pub read_depth: AtomicU64,
    /// Source: the zstd level of the compression lanes now, and the highest used in the sync (0: none yet).
    pub zstd_level: AtomicU64,
    /// See `zstd_level`.
    pub zstd_level_max: AtomicU64,
    /// Source: what gave the change list (`Tracker::describe`), and why it gave none if it failed.
    pub tracker: Mutex<Option<(String, Option<String>)>>,
}

/// Puts a count that is only worth showing when it is not zero.
fn put_some(m: &mut BTreeMap<String, String>, key: &str, n: u64) {
    if n > 0 {
        m.insert(key.to_owned(), n.to_string());
    }
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Adds to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Figures {
    /// Records the volume's geometry.
    pub fn set_geometry(&self, geometry: &crate::chunk::Geometry) {
        self.volume_size
            .store(geometry.volume_size(), Ordering::Relaxed);
        self.chunk_size
            .store(u64::from(geometry.chunk_size()), Ordering::Relaxed);
        self.chunks_total
            .store(geometry.chunk_count(), Ordering::Relaxed);
    }

    /// Records the level the lanes compress at next, and the highest so far.
    pub fn set_zstd_level(&self, level: i32, highest: i32) {
        self.zstd_level
            .store(level.max(0) as u64, Ordering::Relaxed);
        self.zstd_level_max
            .fetch_max(highest.max(0) as u64, Ordering::Relaxed);
    }

    /// Records the agreed volume digest.
    pub fn set_volume_digest(&self, digest: Digest) {
        if let Ok(mut d) = self.volume_digest.lock() {
            *d = Some(digest);
        }
    }

    /// The figures as the status file's `external` map (camelCase keys, decimal strings).
    pub fn external(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: u64| {
            m.insert(k.to_owned(), v.to_string());
        };
        put("volumeSize", get(&self.volume_size));
        put("chunkSize", get(&self.chunk_size));
        put("chunksTotal", get(&self.chunks_total));
        put("chunksChanged", get(&self.chunks_changed));
        put("chunksSent", get(&self.chunks_sent));
        put("zeroChunks", get(&self.zero_chunks));
        put("blocksSent", get(&self.blocks_sent));
        put("zeroBlocks", get(&self.zero_blocks));
        put("dataBytes", get(&self.data_bytes));
        put("compressedBytes", get(&self.compressed_bytes));
        put("bytesRead", get(&self.bytes_read));
        put("wireBytesSent", get(&self.wire.sent));
        put("wireBytesReceived", get(&self.wire.received));
        if let Some(d) = self.volume_digest.lock().ok().and_then(|d| *d) {
            m.insert("volumeDigest".to_owned(), d.to_hex());
        }
        if let Some((kind, reason)) = self.kind() {
            m.insert("syncKind".to_owned(), kind.name().to_owned());
            if kind == SyncKind::Full {
                m.insert("fullReason".to_owned(), reason.to_string());
            }
            put_some(
                &mut m,
                "changeListMissedChunks",
                get(&self.change_list_missed),
            );
            put_some(&mut m, "targetDriftChunks", get(&self.target_drift));
            put_some(&mut m, "pushedChunks", get(&self.pushed_chunks));
            put_some(&mut m, "pushMissedChunks", get(&self.push_missed));
        }
        put_some(&mut m, "bwlimit", get(&self.rate_limit));
        put_some(&mut m, "wireSendRate", get(&self.wire_send_rate));
        put_some(&mut m, "readDepth", get(&self.read_depth));
        put_some(&mut m, "zstdLevel", get(&self.zstd_level));
        put_some(&mut m, "zstdLevelMax", get(&self.zstd_level_max));
        if let Some((tracker, failure)) = self.tracker.lock().ok().and_then(|t| t.clone()) {
            m.insert("changeTracker".to_owned(), tracker);
            if let Some(why) = failure {
                m.insert("changeTrackerError".to_owned(), why);
            }
        }
        m
    }

    /// Records which tracker the source asked for a change list, and why it gave none if it failed.
    pub fn set_tracker(&self, tracker: String, failure: Option<String>) {
        if let Ok(mut t) = self.tracker.lock() {
            *t = Some((tracker, failure));
        }
    }

    /// Records the session's kind (from READY).
    pub fn set_kind(&self, kind: SyncKind, reason: Fallback) {
        if let Ok(mut k) = self.kind.lock() {
            *k = Some((kind, reason));
        }
    }

    /// The session's kind, once agreed.
    pub fn kind(&self) -> Option<(SyncKind, Fallback)> {
        self.kind.lock().ok().and_then(|k| *k)
    }

    /// Summary lines for logs and `latestMoverStatus.logs`, shaped to pass VolSync's log filter.
    pub fn summary(&self, elapsed: Duration) -> String {
        let sent = get(&self.wire.sent);
        let received = get(&self.wire.received);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let size = get(&self.volume_size);
        let wire = (sent + received).max(1);
        // On the line VolSync keeps: which kind of sync ran, and why a delta fell back.
        let kind = match self.kind() {
            Some((SyncKind::Full, why)) => format!("  sync full ({why})"),
            Some((kind, _)) => format!("  sync {kind}"),
            None => String::new(),
        };
        format!(
            "sent {sent} bytes  received {received} bytes  {:.2} bytes/sec\n\
             total size is {size}  speedup is {:.2}  changed chunks {}  blocks sent {}  zero chunks {}{kind}\n",
            (sent + received) as f64 / secs,
            size as f64 / wire as f64,
            get(&self.chunks_changed),
            get(&self.blocks_sent),
            get(&self.zero_chunks),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_holds_every_figure_as_a_decimal_string() {
        let f = Figures::default();
        add(&f.blocks_sent, 7);
        add(&f.wire.sent, 1234);
        let e = f.external();
        assert_eq!(e["blocksSent"], "7");
        assert_eq!(e["wireBytesSent"], "1234");
        assert_eq!(e.len(), 13);
        f.set_volume_digest(Digest::of(b"x"));
        assert_eq!(f.external()["volumeDigest"], Digest::of(b"x").to_hex());
    }

    #[test]
    fn summary_lines_pass_volsyncs_success_filter() {
        let f = Figures::default();
        add(&f.wire.sent, 10);
        add(&f.wire.received, 20);
        let s = f.summary(Duration::from_secs(1));
        let first = s.lines().next().expect("line");
        assert!(
            first.starts_with("sent 10 bytes  received 20 bytes"),
            "{first}"
        );
        assert!(s.lines().nth(1).expect("line").starts_with("total size is"));
    }
}
