//! Delta syncs (issue 11): with `--state-dir` (or the memory store of a long-running agent) each agent keeps a
//! manifest of the image after a successful sync, and the next sync compares against it (`delta-manifest`) or
//! reads only what a change list names (`delta-changelist`). Every test runs real agents over TLS on loopback,
//! on fully allocated random volumes (so that bytes-read figures mean something), and checks digests (target ==
//! volume), exit codes, `syncKind` / `fullReason` in both statuses and the agents' byte counts.
//!
//! - [`basics`]: full, then delta by manifest, then delta by change list; a change list that lies, repaired by
//!   `--verify full`; a change list past the end of the volume.
//! - [`blockdev`]: a loop device target; the same device node attached to other storage.
//! - [`edges`]: an odd-sized volume, zeroed chunks, `--read-back` after a delta, an unusable state directory.
//! - [`manifests`]: damaged, truncated, foreign and other-geometry manifests are ignored; a target written behind
//!   the destination's back.
//! - [`pages`]: manifests kept as a base and a changes file; a damaged page read during a delta.
//! - [`policy`]: one side without state, `destination --serve` without `--state-dir`, `--verify-every N`.
//! - [`killed`]: `kill -9` of either agent during a delta, then the retry.
//! - [`pushed`]: a change list of blocks pushes them (BLOCKS); a list that misses a block of a listed chunk; a list
//!   of whole chunks.
//! - [`failback`]: A -> B, then B -> A, then A -> B again, with the same state directories.
//! - [`scheduled`]: a scheduled source and a serving destination keeping manifests in memory; `--verify full` on a
//!   long-running source.

mod basics;
mod blockdev;
mod edges;
mod failback;
mod killed;
mod manifests;
mod pages;
mod policy;
mod pushed;
mod scheduled;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::common::{
    expect_successful, external_u64, run_source_with, Destination, Fixture, SyncRun, AGENT_TIMEOUT,
};
use crate::schema::Kind;

pub const MIB: u64 = 1 << 20;
/// The source's default chunk size.
pub const CHUNK: u64 = 65536;
/// A 4 KiB block.
pub const BLOCK: u64 = 4096;

/// `fullReason` texts (substrings of what the agents print).
pub const SOURCE_NO_MANIFEST: &str = "the source has no usable manifest";
pub const SOURCE_NO_STATE: &str = "the source keeps no state";
pub const DESTINATION_NO_STATE: &str = "the destination keeps no state";
pub const DESTINATION_NO_MANIFEST: &str = "the destination has no usable manifest";

/// One finished, successful sync: both exits 0, both statuses Successful (schema-checked) and of the same kind.
pub struct Outcome {
    /// The source's stderr.
    pub source_log: String,
    /// The destination's stderr (None for a serving destination, still running).
    pub destination_log: Option<String>,
    pub source: Value,
    pub destination: Value,
}

impl Outcome {
    /// `external[key]` of the source's status.
    pub fn src(&self, key: &str) -> u64 {
        external_u64(&self.source, key).expect("source figure")
    }

    /// `external[key]` of the destination's status.
    pub fn dst(&self, key: &str) -> u64 {
        external_u64(&self.destination, key).expect("destination figure")
    }

    /// `external.syncKind` (both statuses agree, checked by [`sync_files`]).
    pub fn kind(&self) -> &str {
        text(&self.source, "syncKind").unwrap_or("")
    }

    /// `external.fullReason` of the source (the destination's is the same), "" when absent.
    pub fn reason(&self) -> &str {
        text(&self.source, "fullReason").unwrap_or("")
    }

    /// Asserts the sync was a delta of `kind` (no `fullReason`, the summary says so) on both sides.
    pub fn expect_delta(&self, kind: &str) {
        assert_eq!(self.kind(), kind, "{}", self.describe());
        for status in [&self.source, &self.destination] {
            assert!(
                text(status, "fullReason").is_none(),
                "a delta has no fullReason: {status:#}"
            );
        }
        self.expect_summaries(&format!("sync {kind}"));
    }

    /// Asserts the sync was a full comparison whose reason contains `reason` in both statuses and both summaries.
    pub fn expect_full(&self, reason: &str) {
        assert_eq!(self.kind(), "full", "{}", self.describe());
        for status in [&self.source, &self.destination] {
            let why = text(status, "fullReason").unwrap_or("");
            assert!(
                why.contains(reason),
                "fullReason {why:?} does not say {reason:?}: {status:#}"
            );
        }
        self.expect_summaries("sync full (");
    }

    /// Asserts both agents' summary lines (`total size is ...`) end with `what`.
    fn expect_summaries(&self, what: &str) {
        for log in std::iter::once(&self.source_log).chain(self.destination_log.as_ref()) {
            assert!(
                log.lines()
                    .any(|l| l.contains("total size is") && l.contains(what)),
                "no summary line with {what:?}: {log}"
            );
        }
    }

    /// Asserts the destination hashed its whole target (a full comparison): `bytesRead` is the volume size plus at
    /// most two more reads of each changed chunk (its block digests for NEED, then the rebuild before writing).
    pub fn expect_whole_target_read(&self) {
        let (size, read, changed) = (
            self.dst("volumeSize"),
            self.dst("bytesRead"),
            self.dst("chunksChanged"),
        );
        assert!(
            (size..=size + 2 * changed * CHUNK).contains(&read),
            "destination bytesRead {read}, volume {size} bytes, {changed} changed chunks: {}",
            self.describe()
        );
    }

    /// Both statuses' `external` maps, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "source external {}\ndestination external {}",
            self.source["external"], self.destination["external"]
        )
    }
}

/// `status.external[key]` as text.
pub fn text<'a>(status: &'a Value, key: &str) -> Option<&'a str> {
    status.get("external")?.get(key)?.as_str()
}

/// One file of a sync: the volume (or target), its status file and the agent's extra flags.
pub struct End<'a> {
    pub path: &'a Path,
    pub status: &'a Path,
    pub flags: &'a [&'a str],
}

/// A one-shot destination on `target.path`, a source of `source.path` against it; both must succeed. Returns both
/// statuses, after checking that they are Successful and name the same `syncKind` and volume digest.
pub fn sync_files(psk: &Path, source: End, target: End) -> Result<Outcome> {
    let mut destination = Destination::spawn(target.path, psk, target.status, target.flags)?;
    let out = run_source_with(
        destination.addr,
        source.path,
        psk,
        source.status,
        source.flags,
    )?;
    let run = SyncRun {
        source: out,
        destination: destination.wait(AGENT_TIMEOUT)?,
    };
    run.ensure_success()?;
    let outcome = Outcome {
        source: expect_successful(source.status, Kind::Source)?,
        destination: expect_successful(target.status, Kind::Destination)?,
        source_log: run.source_stderr(),
        destination_log: Some(run.destination.stderr),
    };
    for key in ["syncKind", "fullReason", "volumeDigest"] {
        ensure!(
            text(&outcome.source, key) == text(&outcome.destination, key),
            "source and destination disagree on {key}: {}",
            outcome.describe()
        );
    }
    Ok(outcome)
}

/// A random volume and a zero target, and a state directory for each side (`sa` the source's, `sb` the
/// destination's; created by the agents).
pub struct Pair {
    pub fx: Fixture,
    pub sa: String,
    pub sb: String,
}

impl Pair {
    /// A fully allocated random volume of `size` bytes.
    pub fn new(size: u64, seed: u64) -> Result<Pair> {
        let fx = Fixture::random(size, seed)?;
        let dir = |name: &str| fx.dir.path().join(name).to_string_lossy().into_owned();
        Ok(Pair {
            sa: dir("state-source"),
            sb: dir("state-destination"),
            fx,
        })
    }

    /// A sync with exactly these flags (add the state directories yourself).
    pub fn sync_flags(&self, source: &[&str], destination: &[&str]) -> Result<Outcome> {
        sync_files(
            &self.fx.psk,
            End {
                path: &self.fx.volume,
                status: &self.fx.source_status,
                flags: source,
            },
            End {
                path: &self.fx.target,
                status: &self.fx.destination_status,
                flags: destination,
            },
        )
    }

    /// A sync with both state directories and `source` / `destination` extra flags; the target must then equal
    /// the volume.
    pub fn sync(&self, source: &[&str], destination: &[&str]) -> Result<Outcome> {
        let outcome = self.sync_unchecked(source, destination)?;
        self.fx.expect_target_matches_volume()?;
        Ok(outcome)
    }

    /// [`Pair::sync`] without the target check (for a change list that lies).
    pub fn sync_unchecked(&self, source: &[&str], destination: &[&str]) -> Result<Outcome> {
        let mut s = vec!["--state-dir", self.sa.as_str()];
        s.extend_from_slice(source);
        let mut d = vec!["--state-dir", self.sb.as_str()];
        d.extend_from_slice(destination);
        self.sync_flags(&s, &d)
    }

    /// The source's manifest file.
    pub fn source_manifest(&self) -> PathBuf {
        Path::new(&self.sa).join("source.manifest")
    }

    /// The source's block digests file.
    pub fn source_blocks(&self) -> PathBuf {
        Path::new(&self.sa).join("source.blocks")
    }

    /// The destination's block digests file.
    pub fn destination_blocks(&self) -> PathBuf {
        Path::new(&self.sb).join("destination.blocks")
    }

    /// The destination's manifest file.
    pub fn destination_manifest(&self) -> PathBuf {
        Path::new(&self.sb).join("destination.manifest")
    }

    /// The volume's size.
    pub fn size(&self) -> u64 {
        self.fx.size
    }
}

/// Overwrites 4 KiB block `b` of `path` with fresh random bytes (seeded by `seed` and `b`) for each `b` in
/// `blocks`; returns the extents written, `(offset, 4096)`.
pub fn scribble(path: &Path, blocks: &[u64], seed: u64) -> Result<Vec<(u64, u64)>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut extents = Vec::new();
    for &b in blocks {
        let mut buf = vec![0u8; BLOCK as usize];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes()).update(&b.to_le_bytes());
        h.finalize_xof().fill(&mut buf);
        file.write_all_at(&buf, b * BLOCK)?;
        extents.push((b * BLOCK, BLOCK));
    }
    file.sync_all()?;
    Ok(extents)
}

/// [`scribble`] on a target behind the destination's back: its mtime is put back, so that the manifest's stamp
/// does not see the writes (as on a block device, which has none).
pub fn scribble_behind(target: &Path, blocks: &[u64], seed: u64) -> Result<Vec<(u64, u64)>> {
    let mtime = std::fs::metadata(target)?.modified()?;
    let extents = scribble(target, blocks, seed)?;
    std::fs::File::options()
        .write(true)
        .open(target)?
        .set_times(std::fs::FileTimes::new().set_modified(mtime))?;
    Ok(extents)
}

/// Overwrites whole chunks `chunks` of `path` with random bytes; returns the extents written.
pub fn scribble_chunks(path: &Path, chunks: &[u64], seed: u64) -> Result<Vec<(u64, u64)>> {
    let per = CHUNK / BLOCK;
    let blocks: Vec<u64> = chunks.iter().flat_map(|c| c * per..(c + 1) * per).collect();
    scribble(path, &blocks, seed)?;
    Ok(chunks.iter().map(|c| (c * CHUNK, CHUNK)).collect())
}

/// `n` blocks scattered over a volume of `size` bytes, each in a chunk of its own (and not its first block).
pub fn scattered(size: u64, n: u64, salt: u64) -> Vec<u64> {
    let chunks = size / CHUNK;
    assert!(n <= chunks);
    let per = CHUNK / BLOCK;
    (0..n)
        .map(|i| {
            let chunk = i * chunks / n + (salt % (chunks / n).max(1));
            chunk * per + 1 + (i + salt) % (per - 1)
        })
        .collect()
}

/// Writes the change list `{"extents": [[offset, length], ...]}` to `dir/name`; returns its path as text.
pub fn change_list(dir: &Path, name: &str, extents: &[(u64, u64)]) -> Result<String> {
    let path = dir.join(name);
    let list: Vec<[u64; 2]> = extents.iter().map(|&(o, l)| [o, l]).collect();
    std::fs::write(&path, serde_json::json!({ "extents": list }).to_string())?;
    Ok(path.to_string_lossy().into_owned())
}

/// The lines of `stderr` logged at WARN.
pub fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(" WARN ")).collect()
}
