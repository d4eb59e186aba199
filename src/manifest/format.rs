//! The manifest's byte layout (see the table in the module doc of [`super`]): encoding, the one-pass validation,
//! the streaming [`Reader`] and [`Writer`].

use std::io::{self, Read, Seek, SeekFrom};
use std::time::{SystemTime, UNIX_EPOCH};

use super::store::Sink;
use super::{Expect, Header, ManifestError, Meta, Role, Unusable};
use crate::chunk::{Digest, Geometry, VolumeDigest};
use crate::codec::SyncKind;

/// First bytes of a manifest file in format 2, the one written. Frozen in manifest format 2.
pub(super) const MAGIC: &[u8; 8] = b"BMMANIF2";
/// First bytes of a manifest file in format 1, still read (written before `BMMANIF2`). Frozen in manifest format 1.
pub(super) const MAGIC_V1: &[u8; 8] = b"BMMANIF1";
/// Bytes of the header before the identity. Frozen in manifest format 1.
pub(super) const FIXED_HEADER_LEN: usize = 92;
/// The longest identity, in bytes. Frozen in manifest format 1.
pub const MAX_IDENTITY_LEN: usize = 4096;
/// Bytes per chunk digest.
const DIGEST_LEN: u64 = 32;
/// Bytes of the trailer (the checksum).
const TRAILER_LEN: u64 = 32;
/// Key-derivation context of format 2's checksum. Frozen in manifest format 2.
const CHECKSUM_CONTEXT: &str = "blockmover v2 2026-12 manifest checksum";
/// Key-derivation context of format 1's checksum. Frozen in manifest format 1.
const CHECKSUM_CONTEXT_V1: &str = "blockmover v1 2026-11 manifest checksum";
/// The buffer of readers and writers, a multiple of [`DIGEST_LEN`]: their whole memory cost.
pub(super) const BUFFER_LEN: usize = 64 * 1024;

/// The role's byte in the file.
fn role_byte(role: Role) -> u8 {
    match role {
        Role::Source => 1,
        Role::Destination => 2,
    }
}

/// Bytes of the header with an identity of `identity_len` bytes.
pub(super) fn header_len(identity_len: usize) -> u64 {
    (FIXED_HEADER_LEN + identity_len) as u64
}

/// Bytes of the whole file, `None` if it overflows a `u64` (only a damaged header announces that).
pub(super) fn file_len(identity_len: usize, chunk_count: u64) -> Option<u64> {
    chunk_count
        .checked_mul(DIGEST_LEN)?
        .checked_add(header_len(identity_len))?
        .checked_add(TRAILER_LEN)
}

/// The header's bytes, `0 .. 92 + L`. The identity must be at most [`MAX_IDENTITY_LEN`] bytes.
pub(super) fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED_HEADER_LEN + h.identity.len());
    b.extend_from_slice(MAGIC);
    b.push(role_byte(h.role));
    b.extend_from_slice(&h.geometry.volume_size().to_be_bytes());
    b.extend_from_slice(&h.geometry.chunk_size().to_be_bytes());
    b.extend_from_slice(&h.geometry.chunk_count().to_be_bytes());
    b.extend_from_slice(&h.volume_digest.0);
    b.extend_from_slice(&h.written_unix_ms.to_be_bytes());
    b.extend_from_slice(&h.last_full_unix_ms.to_be_bytes());
    b.extend_from_slice(&h.deltas_since_full.to_be_bytes());
    b.push(h.kind.code());
    b.extend_from_slice(&h.stamp.to_be_bytes());
    b.extend_from_slice(&(h.identity.len() as u16).to_be_bytes());
    b.extend_from_slice(h.identity.as_bytes());
    b
}

/// Format 2's trailer: over the header's bytes, which hold the volume digest. The digests need no hash of their
/// own: a reader checks that they give that volume digest, which a changed digest cannot (one BLAKE3 pass over
/// the digest section where format 1 took two; 512 MiB of them for a 1 TiB volume).
fn checksum(header: &[u8]) -> [u8; 32] {
    blake3::derive_key(CHECKSUM_CONTEXT, header)
}

/// Format 1's trailer: over the header's bytes and the plain BLAKE3 hash of the digest section.
pub(super) fn checksum_v1(header: &[u8], digests: &blake3::Hash) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT_V1);
    h.update(header);
    h.update(digests.as_bytes());
    *h.finalize().as_bytes()
}

/// Where a [`Reader`] reads: a buffered file or bytes in memory.
pub(super) trait Backing: Read + Seek + Send {}

impl<T: Read + Seek + Send> Backing for T {}

/// Big-endian fields out of the fixed header, at known offsets (the slice is [`FIXED_HEADER_LEN`] bytes).
struct Fields<'a>(&'a [u8; FIXED_HEADER_LEN]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.0[at..at + N]);
        out
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bytes(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bytes(at))
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.bytes(at))
    }
}

/// An I/O error while validating: end of file is damage (the length was checked, so the file shrank), any other
/// error means the file could not be read.
fn read_error(e: io::Error) -> Unusable {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Unusable::Damaged("truncated while being read".into())
    } else {
        Unusable::Unreadable(e.to_string())
    }
}

/// Reads and checks the whole manifest in `src` in one pass with a fixed buffer, then checks that it is the one
/// `expect`ed of `role`. Returns the header and the offset of the first digest.
fn validate(src: &mut dyn Backing, role: Role, expect: &Expect) -> Result<(Header, u64), Unusable> {
    let damaged = |why: String| Err(Unusable::Damaged(why));
    let len = src.seek(SeekFrom::End(0)).map_err(read_error)?;
    src.seek(SeekFrom::Start(0)).map_err(read_error)?;
    if len < FIXED_HEADER_LEN as u64 {
        return damaged(format!("truncated: {len} bytes, shorter than a header"));
    }
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    src.read_exact(&mut fixed).map_err(read_error)?;
    let f = Fields(&fixed);
    let magic = f.bytes::<8>(0);
    let v1 = &magic == MAGIC_V1;
    if !v1 && &magic != MAGIC {
        return damaged("bad magic: not a blockmover manifest (format 1 or 2)".into());
    }
    let written_by = match fixed[8] {
        1 => Role::Source,
        2 => Role::Destination,
        b => return damaged(format!("unknown role byte {b}")),
    };
    let (volume_size, chunk_size, chunk_count) = (f.u64(9), f.u32(17), f.u64(21));
    let Ok(geometry) = Geometry::new(volume_size, chunk_size) else {
        return damaged(format!("invalid chunk size {chunk_size}"));
    };
    if geometry.chunk_count() != chunk_count {
        return damaged(format!(
            "chunk count {chunk_count} does not fit {volume_size} bytes in chunks of {chunk_size}"
        ));
    }
    let Some(kind) = SyncKind::from_code(fixed[81]) else {
        return damaged(format!("unknown sync kind byte {}", fixed[81]));
    };
    let stamp = f.u64(82);
    let identity_len = usize::from(f.u16(90));
    if identity_len > MAX_IDENTITY_LEN {
        return damaged(format!(
            "identity of {identity_len} bytes, at most {MAX_IDENTITY_LEN} fit"
        ));
    }
    match file_len(identity_len, chunk_count) {
        Some(want) if want == len => {}
        Some(want) if want > len => {
            return damaged(format!(
                "truncated: {len} bytes, the header announces {want}"
            ));
        }
        Some(want) => return damaged(format!("{len} bytes, the header announces {want}")),
        None => return damaged(format!("the header announces {chunk_count} chunks")),
    }
    let mut header = Vec::with_capacity(FIXED_HEADER_LEN + identity_len);
    header.extend_from_slice(&fixed);
    header.resize(FIXED_HEADER_LEN + identity_len, 0);
    src.read_exact(&mut header[FIXED_HEADER_LEN..])
        .map_err(read_error)?;

    // Format 1 also hashes the digest section for its checksum; format 2's covers the header only.
    let mut digests = v1.then(blake3::Hasher::new);
    let mut volume = VolumeDigest::new(geometry);
    let mut buf = vec![0u8; BUFFER_LEN];
    let mut left = chunk_count * DIGEST_LEN;
    while left > 0 {
        let n = left.min(BUFFER_LEN as u64) as usize;
        src.read_exact(&mut buf[..n]).map_err(read_error)?;
        if let Some(d) = &mut digests {
            d.update(&buf[..n]);
        }
        volume.push_many(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    src.read_exact(&mut trailer).map_err(read_error)?;
    let expected = match &digests {
        Some(d) => checksum_v1(&header, &d.finalize()),
        None => checksum(&header),
    };
    if trailer != expected {
        return damaged("checksum mismatch".into());
    }
    let volume_digest = Digest(f.bytes(29));
    if volume.finish() != volume_digest {
        return damaged("its digests do not give its volume digest".into());
    }
    let Ok(identity) = String::from_utf8(header.split_off(FIXED_HEADER_LEN)) else {
        return damaged("identity is not UTF-8".into());
    };

    if written_by != role {
        return Err(Unusable::Foreign(format!(
            "written by the {}, this is the {}",
            written_by.as_str(),
            role.as_str()
        )));
    }
    if identity != expect.identity {
        return Err(Unusable::Foreign(format!(
            "it describes {identity:?}, this sync {:?}",
            expect.identity
        )));
    }
    if stamp != expect.stamp {
        return Err(Unusable::Stale(format!(
            "it was written when the object's stamp was {stamp}, it is {} now: something else changed it since",
            expect.stamp
        )));
    }
    let want = expect.geometry;
    if geometry != want {
        return Err(Unusable::Geometry(format!(
            "{volume_size} bytes in chunks of {chunk_size}, this sync has {} bytes in chunks of {}",
            want.volume_size(),
            want.chunk_size()
        )));
    }
    let header_len = header_len(identity_len);
    let header = Header {
        role: written_by,
        geometry,
        volume_digest,
        written_unix_ms: f.u64(61),
        last_full_unix_ms: f.u64(69),
        deltas_since_full: f.u32(77),
        kind,
        stamp,
        identity,
    };
    Ok((header, header_len))
}

/// A validated manifest: its header, and its digests streamed in chunk order from the first.
///
/// Reads the file it validated through the same descriptor (a manifest committed meanwhile replaces the file by
/// rename and does not disturb it). As a last guard against the file changing in place, the digest that completes
/// the stream is checked against the volume digest.
pub struct Reader {
    src: Box<dyn Backing>,
    /// Where the first digest is.
    digests_at: u64,
    header: Header,
    next: u64,
    volume: VolumeDigest,
}

impl Reader {
    /// Validates the manifest in `src` (see [`super::Store::load`]) and positions the stream at its first digest.
    pub(super) fn open(
        mut src: Box<dyn Backing>,
        role: Role,
        expect: &Expect,
    ) -> Result<Self, Unusable> {
        let (header, digests_at) = validate(src.as_mut(), role, expect)?;
        src.seek(SeekFrom::Start(digests_at)).map_err(read_error)?;
        let volume = VolumeDigest::new(header.geometry);
        Ok(Reader {
            digests_at,
            src,
            header,
            next: 0,
            volume,
        })
    }

    /// Starts the stream of digests again from chunk 0 (a second pass over the file validated once).
    pub fn rewind(&mut self) -> io::Result<()> {
        self.src.seek(SeekFrom::Start(self.digests_at))?;
        self.next = 0;
        self.volume = VolumeDigest::new(self.header.geometry);
        Ok(())
    }

    /// The manifest's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How many digests the manifest holds (the geometry's chunk count).
    pub fn chunk_count(&self) -> u64 {
        self.header.geometry.chunk_count()
    }

    /// The digest of the next chunk (the first call gives chunk 0). An error past the last chunk
    /// ([`io::ErrorKind::InvalidInput`]) or if the digests read no longer give the volume digest
    /// ([`io::ErrorKind::InvalidData`]: the file changed in place after validation).
    pub fn next_digest(&mut self) -> io::Result<Digest> {
        let mut d = [0u8; DIGEST_LEN as usize];
        self.next_digests(&mut d)?;
        Ok(Digest(d))
    }

    /// The digests of the next `buf.len() / 32` chunks, concatenated into `buf` (whose length is a multiple of
    /// 32): what [`Reader::next_digest`] gives that many times, with the same checks, read and hashed in bulk (a
    /// delta's base is mostly runs of chunks nothing changed, a million of them in a 64 GiB volume).
    pub fn next_digests(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let count = self.chunk_count();
        let n = (buf.len() / DIGEST_LEN as usize) as u64;
        debug_assert_eq!(buf.len() % DIGEST_LEN as usize, 0);
        if n > count - self.next {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("read past the last of the manifest's {count} digests"),
            ));
        }
        self.src.read_exact(buf)?;
        self.volume.push_many(buf);
        self.next += n;
        if n > 0 && self.next == count && self.volume.finish() != self.header.volume_digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the manifest changed while being read: its digests no longer give its volume digest",
            ));
        }
        Ok(())
    }
}

/// Digests a bulk copy or pass moves at a time (64 KiB of them).
pub const BULK_DIGESTS: u64 = 2048;

/// The chunks a delta did not touch hold what the base says: copies the next `n` digests of `base` into `digest`
/// and into `next` (the manifest being written) in bulk. A digest that cannot be read is an error (the base is
/// damaged: the caller fails the session); one that cannot be written drops `next` with a log line, as the next
/// sync then only compares in full.
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

/// Streams a new manifest for a role and a geometry; [`Writer::commit`] makes it the role's manifest. Dropped
/// uncommitted, it leaves the previous manifest and nothing else.
pub struct Writer {
    sink: Sink,
    role: Role,
    geometry: Geometry,
    identity: String,
    pushed: u64,
    volume: VolumeDigest,
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
        // A geometry's chunk count times 32 fits a u64 for any u64 volume size (chunks are at least 4 KiB).
        let file_len = file_len(identity.len(), geometry.chunk_count()).unwrap_or(u64::MAX);
        let sink = open(header_len(identity.len()), file_len)?;
        Ok(Writer {
            sink,
            role,
            geometry,
            identity: identity.to_owned(),
            pushed: 0,
            volume: VolumeDigest::new(geometry),
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
        self.volume.push_many(kept);
        self.sink.write(kept)
    }

    /// How many digests were pushed.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Checks the digests against the geometry's chunk count and `meta`'s volume digest, then writes the header
    /// and the trailer and makes this the role's manifest, durably (fsync, rename, fsync of the directory). Refused,
    /// it leaves the previous manifest. A no-op for [`super::Store::none`].
    pub fn commit(self, meta: Meta) -> Result<(), ManifestError> {
        self.seal(meta)?.publish()
    }

    /// [`Writer::commit`] but the last step: the manifest is complete and durable in its temporary file, and only
    /// [`Sealed::publish`] makes it the role's manifest. The source seals its manifest while the destination makes
    /// the target durable, so that their two fsyncs overlap; dropped unpublished, it leaves the previous manifest.
    pub fn seal(self, meta: Meta) -> Result<Sealed, ManifestError> {
        if self.sink.is_nothing() {
            return Ok(Sealed(super::store::Sealed::Nothing));
        }
        let expected = self.geometry.chunk_count();
        if self.pushed != expected {
            return Err(ManifestError::Count {
                pushed: self.pushed,
                expected,
            });
        }
        let computed = self.volume.finish();
        if computed != meta.volume_digest {
            return Err(ManifestError::VolumeDigest {
                computed: computed.to_hex(),
                expected: meta.volume_digest.to_hex(),
            });
        }
        let header = encode_header(&Header {
            role: self.role,
            geometry: self.geometry,
            volume_digest: meta.volume_digest,
            written_unix_ms: unix_ms_now(),
            last_full_unix_ms: meta.last_full_unix_ms,
            deltas_since_full: meta.deltas_since_full,
            kind: meta.kind,
            stamp: meta.stamp,
            identity: self.identity,
        });
        let trailer = checksum(&header);
        self.sink.seal(self.role, &header, &trailer).map(Sealed)
    }
}

/// A manifest written and made durable under a temporary name ([`Writer::seal`]).
pub struct Sealed(super::store::Sealed);

impl Sealed {
    /// Makes it the role's manifest (rename, fsync of the directory).
    pub fn publish(self) -> Result<(), ManifestError> {
        self.0.publish()
    }
}

/// Now in ms since the Unix epoch (0 for a clock before it).
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
