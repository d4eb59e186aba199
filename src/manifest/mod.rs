//! Manifests: the image both sides hold after a successful sync, as chunk digests, so that the next sync (a delta)
//! skips what the manifests prove equal.
//!
//! After each successful sync an agent commits a manifest for its [`Role`] to its [`Store`]: a state directory,
//! memory (for a long-running agent without a state directory, up to a size limit) or nothing. [`Store::load`]
//! hands out a [`Reader`] only for a manifest that is whole and describes what the caller expects (role, identity,
//! geometry); any other answer is an [`Unusable`] that says why, and the caller falls back to a full comparison.
//! A manifest never stays trusted past a change it does not describe: the destination calls [`Store::set_aside`]
//! before its first write to the target in a session, and each agent invalidates the other role's manifest at
//! start-up.
//!
//! A manifest is a **base** file (`ROLE.manifest`: every digest and a page table) and, after a delta, a **changes**
//! file (`ROLE.manifest.changes`: the digests that differ from the base, the new header and the new page table).
//! A page is 16 KiB of the volume digest's input (512 digests, see [`crate::chunk::pages`]); the table holds each
//! page's BLAKE3 chaining value, and merging it gives the volume digest. So [`Store::load`] checks a manifest
//! without reading its digests, a [`Reader`] checks each page against the table when it first reads it, and a
//! [`Patch`] (a delta's next manifest) rehashes only the pages its changes touch and writes only the changes file.
//! A [`Writer`] streams a whole new base (a full comparison, or a compaction once the changes pass a sixteenth of
//! the chunks).
//!
//! Memory is flat: a [`Reader`] keeps two pages and the table (1 MiB for a 1 TiB volume in 64 KiB chunks, whose
//! base is 512 MiB), a [`Writer`] a 64 KiB buffer and the table, a [`Patch`] 40 bytes per changed chunk (at most
//! 2^20 of them; past that it streams a new base) beside the base's changes, which a [`Reader`] holds as the
//! changes file's bytes (40 per chunk), and the new changes file while it is sealed. Only the memory store holds whole files, bounded by its limit.
//!
//! # File formats (frozen in manifest format 3; a change takes a new magic)
//!
//! Integers are big-endian. `L` is `identity_len`, `N` is `chunk_count`, `P` the number of pages
//! (`ceil((12 + 32 × N) / 16384)`), `E` the number of changes.
//!
//! The header, the same in both files but for its magic:
//!
//! | offset          | size   | field               | meaning                                                           |
//! |-----------------|--------|---------------------|-------------------------------------------------------------------|
//! | 0               | 8      | magic               | base `BMMANIF3` (still read: `BMMANIF2`, `BMMANIF1`); changes `BMCHANG3` |
//! | 8               | 1      | role                | 1 source, 2 destination: the agent that wrote it                  |
//! | 9               | 8      | volume_size         | bytes                                                             |
//! | 17              | 4      | chunk_size          | bytes, a power of two from 4096 to 262144                         |
//! | 21              | 8      | chunk_count         | `ceil(volume_size / chunk_size)`                                  |
//! | 29              | 32     | volume_digest       | the whole-volume digest (`PROTOCOL.md`) of the manifest's digests |
//! | 61              | 8      | written_unix_ms     | when the manifest was committed (ms since the Unix epoch)         |
//! | 69              | 8      | last_full_unix_ms   | when the last full comparison of this pair ran                    |
//! | 77              | 4      | deltas_since_full   | delta syncs since that full comparison                            |
//! | 81              | 1      | kind                | how the sync that wrote it ran: 0 full, 1 delta by manifest, 2 delta by change list |
//! | 82              | 8      | stamp               | the object's stamp when written (a file's mtime in ns, else 0)    |
//! | 90              | 2      | identity_len        | `L <= 4096`                                                       |
//! | 92              | L      | identity            | UTF-8, opaque: what the manifest describes, built by the caller   |
//!
//! The base, after its header: the digests (`32 × N`, BLAKE3 of each chunk in chunk order), the page table
//! (`32 × P`), and `checksum = BLAKE3-derive_key("blockmover v3 2026-12 manifest checksum", header ‖ table)`.
//! Formats 2 and 1 have no page table; their checksums are `BLAKE3-derive_key("blockmover v2 2026-12 manifest
//! checksum", header)` and `BLAKE3-derive_key("blockmover v1 2026-11 manifest checksum", header ‖
//! BLAKE3(digests))`. A reader of either reads every digest once and computes the table.
//!
//! The changes file, after its header (whose fields are the manifest's now): the checksum of the base it applies to
//! (32), `E` (8), the page table of the image (`32 × P`), the entries (`40 × E`: chunk as u64 and digest, strictly
//! increasing), and `checksum = BLAKE3-derive_key("blockmover v3 2026-12 manifest changes checksum", every byte
//! before it)`.
//!
//! A base is accepted if it has exactly its length, its checksum matches and its table gives its volume digest; a
//! changes file if it names the base, has exactly its length, its checksum matches, its entries are in order and
//! inside the volume, its table equals the base's in every page no entry touches and gives its volume digest. A
//! changes file that names another base is left over from before a compaction and ignored. Each checksum detects
//! damage (a torn or flipped file), not tampering: anyone who can write the state directory can also recompute it.

mod blocks;
mod entries;
mod format;
mod reader;
mod sink;
mod store;
#[cfg(test)]
mod tests;
mod writer;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::chunk::{Digest, Geometry};
pub use crate::codec::SyncKind;
pub use crate::status::Role;

pub use blocks::{BlockFile, KnownBlocks};
pub use format::MAX_IDENTITY_LEN;
pub use reader::Reader;
pub use store::Store;
pub use writer::{copy_base, NextManifest, Patch, Sealed, Writer, BULK_DIGESTS};

/// Everything a manifest says besides its digests: its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The agent that wrote it.
    pub role: Role,
    /// Volume and chunk size.
    pub geometry: Geometry,
    /// The whole-volume digest of its chunk digests.
    pub volume_digest: Digest,
    /// When it was committed, in ms since the Unix epoch.
    pub written_unix_ms: u64,
    /// When the last full comparison of this pair ran, in ms since the Unix epoch.
    pub last_full_unix_ms: u64,
    /// Delta syncs since that full comparison.
    pub deltas_since_full: u32,
    /// How the sync that wrote it ran.
    pub kind: SyncKind,
    /// A value the described object had when the manifest was written (a file's modification time in ns; 0 where
    /// there is none): a manifest whose stamp is not the object's now is stale.
    pub stamp: u64,
    /// What it describes (opaque, built by the caller; at most [`MAX_IDENTITY_LEN`] bytes).
    pub identity: String,
}

/// What [`Writer::commit`] learns at the end of a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The whole-volume digest both sides agreed on: the pushed digests must give it.
    pub volume_digest: Digest,
    /// How the sync ran.
    pub kind: SyncKind,
    /// When the last full comparison of this pair ran (this sync's start if it was one).
    pub last_full_unix_ms: u64,
    /// Delta syncs since then, this one included (0 after a full comparison).
    pub deltas_since_full: u32,
    /// The described object's stamp now, after the sync's writes (see [`Header::stamp`]).
    pub stamp: u64,
}

/// What the caller of [`Store::load`] needs the manifest to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The identity the manifest must carry, byte for byte.
    pub identity: String,
    /// The geometry of this sync.
    pub geometry: Geometry,
    /// The object's stamp now (see [`Header::stamp`]).
    pub stamp: u64,
}

/// Why [`Store::load`] found no manifest to trust. Each is a reason to compare in full, never a sync failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// There is none (first sync, invalidated, no state kept).
    Missing,
    /// It exists but could not be read (permissions, I/O error).
    Unreadable(String),
    /// It is not a whole manifest: bad magic, wrong length, checksum or volume digest mismatch.
    Damaged(String),
    /// It is whole but describes something else: written by the other role, or another identity.
    Foreign(String),
    /// It is whole and of this object, but the object changed since it was written.
    Stale(String),
    /// It is whole and ours but of another volume size or chunk size.
    Geometry(String),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Missing => f.write_str("no manifest"),
            Unusable::Unreadable(why) => write!(f, "cannot read manifest: {why}"),
            Unusable::Damaged(why) => write!(f, "damaged manifest: {why}"),
            Unusable::Foreign(why) => write!(f, "manifest of something else: {why}"),
            Unusable::Geometry(why) => write!(f, "manifest of another geometry: {why}"),
            Unusable::Stale(why) => write!(f, "stale manifest: {why}"),
        }
    }
}

impl std::error::Error for Unusable {}

impl Unusable {
    /// The same reason with `place` (a path) in front of its detail.
    fn at(self, place: &std::path::Path) -> Self {
        let place = place.display();
        match self {
            Unusable::Missing => Unusable::Missing,
            Unusable::Unreadable(why) => Unusable::Unreadable(format!("{place}: {why}")),
            Unusable::Damaged(why) => Unusable::Damaged(format!("{place}: {why}")),
            Unusable::Foreign(why) => Unusable::Foreign(format!("{place}: {why}")),
            Unusable::Geometry(why) => Unusable::Geometry(format!("{place}: {why}")),
            Unusable::Stale(why) => Unusable::Stale(format!("{place}: {why}")),
        }
    }
}

/// Failures of the manifest store: the state directory, writing or removing a manifest, a commit refused.
///
/// A refused commit ([`ManifestError::Count`], [`ManifestError::VolumeDigest`]) is a bug in the caller or a
/// volume that changed under it; it leaves the previous manifest as it was.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The state directory could not be created or is not writable.
    #[error("cannot use state directory {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating, writing, syncing or renaming a manifest (or syncing its directory) failed.
    #[error("cannot write manifest {}: {source}", path.display())]
    Write {
        /// The manifest's final path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing a manifest (or syncing its directory) failed.
    #[error("cannot remove manifest {}: {source}", path.display())]
    Remove {
        /// The manifest.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The identity is longer than the format allows.
    #[error("manifest identity is {len} bytes, at most {MAX_IDENTITY_LEN} fit")]
    IdentityTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The writer was given more or fewer digests than the geometry has chunks.
    #[error("manifest refused: {pushed} digests pushed, the volume has {expected} chunks")]
    Count {
        /// Digests pushed.
        pushed: u64,
        /// The geometry's chunk count.
        expected: u64,
    },
    /// The pushed digests do not give the volume digest of the sync.
    #[error("manifest refused: its digests give volume digest {computed}, the sync agreed on {expected}")]
    VolumeDigest {
        /// The volume digest of the pushed digests (hex).
        computed: String,
        /// The one given to commit (hex).
        expected: String,
    },
}
