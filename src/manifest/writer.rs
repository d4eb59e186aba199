//! Writing manifests: a [`Writer`] streams every digest into a new base file; a [`Patch`] records only the chunks a
//! delta changed and keeps them in a changes file beside the base, so that a delta writes what changed, not the
//! whole manifest (512 MiB for a 1 TiB volume).

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use super::entries::merged;
use super::format::{
    base_len, changes_checksum, checksum, encode_header, header_len, max_changes, CHANGES_MAGIC,
    DIGEST_LEN, ENTRY_LEN, MAGIC, MAX_IDENTITY_LEN,
};
use super::sink::{self, Sink};
use super::store::Store;
use super::{Header, ManifestError, Meta, Reader, Role};
use crate::chunk::pages::{PageHasher, Pages};
use crate::chunk::{Digest, Geometry, VolumeDigest};

/// Digests a bulk copy or pass moves at a time (64 KiB of them).
pub const BULK_DIGESTS: u64 = 2048;

/// Changed chunks a [`Patch`] holds in memory (40 MiB of them) before it streams the new manifest in full.
const MAX_HELD: usize = 1 << 20;

/// The chunks a delta did not touch hold what the base says: copies the next `n` digests of `base`'s stream into
/// `digest` and into `next` (a manifest being written) in bulk. A digest that cannot be read is an error (the base
/// is damaged: the caller fails the session); one that cannot be written drops `next` with a log line, as the
/// next sync then only compares in full.
pub fn copy_base(
    base: &mut Reader,
    n: u64,
    digest: &mut VolumeDigest,
    next: &mut Option<Writer>,
) -> io::Result<()> {
    let mut buf = vec![0u8; (n.min(BULK_DIGESTS) * DIGEST_LEN) as usize];
    let mut left = n;
    while left > 0 {
        let run = &mut buf[..(left.min(BULK_DIGESTS) * DIGEST_LEN) as usize];
        base.next_digests(run)?;
        digest.push_many(run);
        if let Some(w) = next {
            if let Err(e) = w.push_many(run) {
                tracing::warn!("the {} manifest will not be kept: {e}", w.role.as_str());
                *next = None;
            }
        }
        left -= (run.len() as u64) / DIGEST_LEN;
    }
    Ok(())
}

/// Streams a new base file (every digest, then the page table) for a role and a geometry; [`Writer::commit`]
/// makes it the role's manifest. Dropped uncommitted, it leaves the previous manifest and nothing else.
pub struct Writer {
    sink: Sink,
    pub(super) role: Role,
    geometry: Geometry,
    identity: String,
    pushed: u64,
    pages: PageHasher,
}

impl Writer {
    /// Checks the identity and opens the sink with `open(header_len, file_len)`, which reserves the header.
    pub(super) fn new(
        role: Role,
        geometry: Geometry,
        identity: &str,
        open: impl FnOnce(u64, u64) -> Result<Sink, ManifestError>,
    ) -> Result<Self, ManifestError> {
        if identity.len() > MAX_IDENTITY_LEN {
            return Err(ManifestError::IdentityTooLong {
                len: identity.len(),
            });
        }
        let pages = Pages::new(geometry).count();
        // A geometry's chunk count times 32 fits a u64 for any u64 volume size (chunks are at least 4 KiB).
        let file_len = base_len(identity.len(), geometry.chunk_count(), pages).unwrap_or(u64::MAX);
        let sink = open(header_len(identity.len()), file_len)?;
        Ok(Writer {
            sink,
            role,
            geometry,
            identity: identity.to_owned(),
            pushed: 0,
            pages: PageHasher::new(geometry),
        })
    }

    /// Adds the digest of the next chunk, in chunk order. Digests past the chunk count are counted (and make
    /// [`Writer::commit`] refuse) but not written.
    pub fn push(&mut self, digest: &Digest) -> Result<(), ManifestError> {
        self.push_many(&digest.0)
    }

    /// Appends the digests of the next `digests.len() / 32` chunks, concatenated (a length that is a multiple of
    /// 32): [`Writer::push`] of each, in bulk.
    pub fn push_many(&mut self, digests: &[u8]) -> Result<(), ManifestError> {
        debug_assert_eq!(digests.len() % DIGEST_LEN as usize, 0);
        let n = (digests.len() / DIGEST_LEN as usize) as u64;
        let room = self.geometry.chunk_count().saturating_sub(self.pushed);
        self.pushed += n;
        if self.sink.is_nothing() || room == 0 {
            return Ok(());
        }
        // Digests past the chunk count are counted (commit refuses them) but not kept.
        let kept = &digests[..(n.min(room) * DIGEST_LEN) as usize];
        self.pages.push_many(kept);
        self.sink.write(kept)
    }

    /// How many digests were pushed.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Checks the digests against the geometry's chunk count and `meta`'s volume digest, then writes the header,
    /// the page table and the trailer and makes this the role's manifest, durably (fsync, rename, fsync of the
    /// directory). Refused, it leaves the previous manifest. A no-op for [`Store::none`].
    pub fn commit(self, meta: Meta) -> Result<(), ManifestError> {
        self.seal(meta)?.publish()
    }

    /// [`Writer::commit`] but the last step: the manifest is complete and durable in its temporary file, and only
    /// [`Sealed::publish`] makes it the role's manifest. The source seals its manifest while the destination makes
    /// the target durable, so that their two fsyncs overlap; dropped unpublished, it leaves the previous manifest.
    pub fn seal(self, meta: Meta) -> Result<Sealed, ManifestError> {
        if self.sink.is_nothing() {
            return Ok(Sealed(sink::Sealed::Nothing));
        }
        let expected = self.geometry.chunk_count();
        if self.pushed != expected {
            return Err(ManifestError::Count {
                pushed: self.pushed,
                expected,
            });
        }
        let (table, computed) = self.pages.finish().expect("every digest pushed");
        if computed != meta.volume_digest {
            return Err(ManifestError::VolumeDigest {
                computed: computed.to_hex(),
                expected: meta.volume_digest.to_hex(),
            });
        }
        let header = encode_header(
            MAGIC,
            &header_of(self.role, self.geometry, self.identity, &meta),
        );
        let mut tail = table.concat();
        let trailer = checksum(&header, &tail);
        tail.extend_from_slice(&trailer);
        self.sink.seal(self.role, &header, &tail).map(Sealed)
    }
}

fn header_of(role: Role, geometry: Geometry, identity: String, meta: &Meta) -> Header {
    Header {
        role,
        geometry,
        volume_digest: meta.volume_digest,
        written_unix_ms: unix_ms_now(),
        last_full_unix_ms: meta.last_full_unix_ms,
        deltas_since_full: meta.deltas_since_full,
        kind: meta.kind,
        stamp: meta.stamp,
        identity,
    }
}

/// A manifest written and made durable under a temporary name ([`Writer::seal`], [`Patch::seal`]).
pub struct Sealed(pub(super) sink::Sealed);

impl Sealed {
    /// Makes it the role's manifest (rename, fsync of the directory).
    pub fn publish(self) -> Result<(), ManifestError> {
        self.0.publish()
    }
}

/// The next manifest of a delta, as the changes to its base: the chunks whose digests the session set. Setting a
/// chunk costs nothing until the end; [`Patch::volume_digest`] then rehashes only the pages they touch and merges
/// the page table, and [`Patch::seal`] writes a changes file beside the base (or, once the changes pass a
/// sixteenth of the chunks, a new base: compaction). Chunks must be set in increasing order.
pub struct Patch {
    base: Reader,
    store: Store,
    /// This session's changes, in chunk order.
    set: Vec<(u64, Digest)>,
    /// Past [`MAX_HELD`] changes: the new manifest streamed in full, its page table hashed alongside.
    full: Option<Full>,
    /// The page table and volume digest, once computed.
    done: Option<(Vec<[u8; 32]>, Digest)>,
}

/// A [`Patch`] that streams the whole manifest.
struct Full {
    hasher: PageHasher,
    writer: Option<Writer>,
    /// The next chunk to push.
    next: u64,
}

impl Patch {
    pub(super) fn new(base: Reader, store: Store) -> Self {
        Patch {
            base,
            store,
            set: Vec::new(),
            full: None,
            done: None,
        }
    }

    /// The base the patch applies to (for the digests of chunks it did not set).
    pub fn base(&mut self) -> &mut Reader {
        &mut self.base
    }

    /// Chunk `chunk` holds `digest` in the new image. Chunks are set in increasing order, each at most once.
    pub fn set(&mut self, chunk: u64, digest: Digest) -> io::Result<()> {
        debug_assert!(self.set.last().is_none_or(|(c, _)| *c < chunk));
        debug_assert!(self.done.is_none(), "set after the volume digest");
        if let Some(full) = &mut self.full {
            fill(&mut self.base, full, chunk, &[])?;
            push(full, &digest.0);
            return Ok(());
        }
        self.set.push((chunk, digest));
        if self.set.len() > MAX_HELD {
            self.go_full(chunk + 1)?;
        }
        Ok(())
    }

    /// Switches to streaming the new manifest in full, through chunk `through` (exclusive).
    fn go_full(&mut self, through: u64) -> io::Result<()> {
        let role = self.base.header().role;
        let g = self.base.header().geometry;
        let identity = self.base.header().identity.clone();
        let writer = self
            .store
            .writer(role, g, &identity)
            .map_err(|e| tracing::warn!("the {} manifest will not be kept: {e}", role.as_str()))
            .ok();
        let mut full = Full {
            hasher: PageHasher::new(g),
            writer,
            next: 0,
        };
        let set = std::mem::take(&mut self.set);
        fill(&mut self.base, &mut full, through, &set)?;
        self.full = Some(full);
        Ok(())
    }

    /// The volume digest of the new image (the base with the chunks set).
    pub fn volume_digest(&mut self) -> io::Result<Digest> {
        if let Some((_, d)) = &self.done {
            return Ok(*d);
        }
        let (count, geometry) = (self.base.chunk_count(), self.base.header().geometry);
        let done = match &mut self.full {
            Some(full) => {
                fill(&mut self.base, full, count, &[])?;
                let hasher = std::mem::replace(&mut full.hasher, PageHasher::new(geometry));
                hasher.finish().expect("every digest pushed")
            }
            None => {
                let pages = self.base.pages;
                let mut table = self.base.table.clone();
                let mut scratch = Vec::new();
                // The pages the changes touch, in order (a change may lie in two).
                let mut touched: Vec<u64> = Vec::new();
                for (c, _) in &self.set {
                    for p in pages.of_chunk(*c) {
                        if touched.last() != Some(&p) {
                            touched.push(p);
                        }
                    }
                }
                for p in touched {
                    let chunks = pages.chunks(p);
                    let mut digests = self.base.page(p)?.to_vec();
                    let from = self.set.partition_point(|(c, _)| *c < chunks.start);
                    for (c, d) in self.set[from..].iter().take_while(|(c, _)| *c < chunks.end) {
                        let at = ((c - chunks.start) * DIGEST_LEN) as usize;
                        digests[at..at + 32].copy_from_slice(&d.0);
                    }
                    table[p as usize] = pages.value(p, pages.input(p, &digests, &mut scratch));
                }
                let root = pages.root(&table);
                (table, root)
            }
        };
        let digest = done.1;
        self.done = Some(done);
        Ok(digest)
    }

    /// Writes the new manifest and makes it durable under a temporary name: a changes file (the base's changes
    /// and this session's, merged), or a new base when they are too many to keep as changes or the base is of an
    /// older format. `meta.volume_digest` must be the patch's.
    pub fn seal(mut self, meta: Meta) -> Result<Sealed, ManifestError> {
        let role = self.base.header().role;
        let path = self.store.path(role).unwrap_or_default();
        let computed = self
            .volume_digest()
            .map_err(|source| ManifestError::Write { path, source })?;
        if computed != meta.volume_digest {
            return Err(ManifestError::VolumeDigest {
                computed: computed.to_hex(),
                expected: meta.volume_digest.to_hex(),
            });
        }
        if !self.store.keeps_state() {
            return Ok(Sealed(sink::Sealed::Nothing));
        }
        if let Some(full) = self.full.take() {
            return match full.writer {
                Some(w) => w.seal(meta),
                None => Ok(Sealed(sink::Sealed::Nothing)),
            };
        }
        // Counted first, then merged straight into the file's bytes: no merged copy of both lists is held.
        let entries = merged(&self.base.changes, &self.set).count();
        let count = self.base.chunk_count();
        if self.base.file.format < 3 || entries as u64 > max_changes(count) {
            return self.compact(meta);
        }
        let h = self.base.header();
        let header = header_of(role, h.geometry, h.identity.clone(), &meta);
        let (table, _) = self.done.as_ref().expect("computed above");
        let mut body = encode_header(CHANGES_MAGIC, &header);
        body.reserve(40 + table.len() * 32 + entries * ENTRY_LEN as usize + 32);
        body.extend_from_slice(&self.base.file.checksum);
        body.extend_from_slice(&(entries as u64).to_be_bytes());
        body.extend_from_slice(&table.concat());
        for (c, d) in merged(&self.base.changes, &self.set) {
            body.extend_from_slice(&c.to_be_bytes());
            body.extend_from_slice(&d.0);
        }
        let trailer = changes_checksum(&body);
        body.extend_from_slice(&trailer);
        self.store
            .seal_changes(role, body, self.base.file.checksum)
            .map(Sealed)
    }

    /// A new base: every digest of the manifest (the base with its changes) with this session's set applied,
    /// streamed into a [`Writer`].
    fn compact(mut self, meta: Meta) -> Result<Sealed, ManifestError> {
        let h = self.base.header().clone();
        let mut writer = self.store.writer(h.role, h.geometry, &h.identity)?;
        let mut buf = vec![0u8; (BULK_DIGESTS * DIGEST_LEN) as usize];
        let mut next = 0u64;
        let set = std::mem::take(&mut self.set);
        let mut changes = set.iter().peekable();
        let count = h.geometry.chunk_count();
        while next < count {
            let n = (count - next).min(BULK_DIGESTS);
            let run = &mut buf[..(n * DIGEST_LEN) as usize];
            self.base
                .digests(next, run)
                .map_err(|source| ManifestError::Write {
                    path: self.store.path(h.role).unwrap_or_default(),
                    source,
                })?;
            while let Some((c, d)) = changes.next_if(|(c, _)| *c < next + n) {
                let at = ((c - next) * DIGEST_LEN) as usize;
                run[at..at + 32].copy_from_slice(&d.0);
            }
            writer.push_many(run)?;
            next += n;
        }
        writer.seal(meta)
    }
}

/// Pushes the digests of chunks `full.next .. through` (the base's, or `set`'s where it has one) into `full`.
fn fill(base: &mut Reader, full: &mut Full, through: u64, set: &[(u64, Digest)]) -> io::Result<()> {
    let mut buf = vec![0u8; (BULK_DIGESTS * DIGEST_LEN) as usize];
    let mut changes = set.iter().peekable();
    while full.next < through {
        let n = (through - full.next).min(BULK_DIGESTS);
        let run = &mut buf[..(n * DIGEST_LEN) as usize];
        base.digests(full.next, run)?;
        while let Some((c, d)) = changes.next_if(|(c, _)| *c < full.next + n) {
            let at = ((c - full.next) * DIGEST_LEN) as usize;
            run[at..at + 32].copy_from_slice(&d.0);
        }
        push(full, run);
    }
    Ok(())
}

/// Pushes digests into a full stream's hasher and writer (dropped, with a log line, if it cannot write).
fn push(full: &mut Full, digests: &[u8]) {
    full.hasher.push_many(digests);
    full.next += digests.len() as u64 / DIGEST_LEN;
    if let Some(w) = &mut full.writer {
        if let Err(e) = w.push_many(digests) {
            tracing::warn!("the {} manifest will not be kept: {e}", w.role.as_str());
            full.writer = None;
        }
    }
}

/// A session's next manifest: whole, or as changes to its base.
pub enum NextManifest {
    /// A full comparison's: every digest.
    Whole(Box<Writer>),
    /// A delta's: the changes to the base.
    Patch(Box<Patch>),
}

impl NextManifest {
    /// [`Writer::seal`] or [`Patch::seal`].
    pub fn seal(self, meta: Meta) -> Result<Sealed, ManifestError> {
        match self {
            NextManifest::Whole(w) => (*w).seal(meta),
            NextManifest::Patch(p) => (*p).seal(meta),
        }
    }

    /// Seals and publishes.
    pub fn commit(self, meta: Meta) -> Result<(), ManifestError> {
        self.seal(meta)?.publish()
    }
}

impl Patch {
    /// [`Patch::seal`] and [`Sealed::publish`].
    pub fn commit(self, meta: Meta) -> Result<(), ManifestError> {
        self.seal(meta)?.publish()
    }
}

/// Now in ms since the Unix epoch (0 for a clock before it).
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
