//! The byte layouts of the base file and the changes file (see the tables in the module doc of [`super`]):
//! encoding, and the validation that runs before anything in them is trusted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::entries::Entries;
use super::{Expect, Header, Role, Unusable};
use crate::chunk::pages::{PageHasher, Pages};
use crate::chunk::{Digest, Geometry};
use crate::codec::SyncKind;

/// First bytes of a base file in format 3, the one written. Frozen in manifest format 3.
pub(super) const MAGIC: &[u8; 8] = b"BMMANIF3";
/// First bytes of a base file in format 2 (still read). Frozen in manifest format 2.
pub(super) const MAGIC_V2: &[u8; 8] = b"BMMANIF2";
/// First bytes of a base file in format 1 (still read). Frozen in manifest format 1.
pub(super) const MAGIC_V1: &[u8; 8] = b"BMMANIF1";
/// First bytes of a changes file. Frozen in manifest format 3.
pub(super) const CHANGES_MAGIC: &[u8; 8] = b"BMCHANG3";
/// Bytes of the header before the identity. Frozen in manifest format 1.
pub(super) const FIXED_HEADER_LEN: usize = 92;
/// The longest identity, in bytes. Frozen in manifest format 1.
pub const MAX_IDENTITY_LEN: usize = 4096;
/// Bytes per chunk digest, per page value and per checksum.
pub(super) const DIGEST_LEN: u64 = 32;
/// Bytes per entry of a changes file: the chunk (u64) and its digest.
pub(super) const ENTRY_LEN: u64 = 40;
/// Key-derivation context of format 3's base checksum. Frozen in manifest format 3.
const CHECKSUM_CONTEXT: &str = "blockmover v3 2026-12 manifest checksum";
/// Key-derivation context of format 3's changes checksum. Frozen in manifest format 3.
const CHANGES_CHECKSUM_CONTEXT: &str = "blockmover v3 2026-12 manifest changes checksum";
/// Key-derivation context of format 2's checksum. Frozen in manifest format 2.
const CHECKSUM_CONTEXT_V2: &str = "blockmover v2 2026-12 manifest checksum";
/// Key-derivation context of format 1's checksum. Frozen in manifest format 1.
const CHECKSUM_CONTEXT_V1: &str = "blockmover v1 2026-11 manifest checksum";
/// The buffer of writers and of whole-file passes, a multiple of [`DIGEST_LEN`].
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

/// Bytes of a format-3 base file, `None` if it overflows a `u64` (only a damaged header announces that).
pub(super) fn base_len(identity_len: usize, chunk_count: u64, pages: u64) -> Option<u64> {
    chunk_count
        .checked_add(pages)?
        .checked_add(1)?
        .checked_mul(DIGEST_LEN)?
        .checked_add(header_len(identity_len))
}

/// Bytes of a format-1 or format-2 base file (no page table).
fn base_len_v2(identity_len: usize, chunk_count: u64) -> Option<u64> {
    chunk_count
        .checked_add(1)?
        .checked_mul(DIGEST_LEN)?
        .checked_add(header_len(identity_len))
}

/// The most changes a changes file of a volume of `chunk_count` chunks holds: past a sixteenth of the chunks (or
/// 2^20), a patch writes a new base instead.
pub(super) fn max_changes(chunk_count: u64) -> u64 {
    (chunk_count / 16).min(1 << 20)
}

/// Bytes of a changes file of `entries` entries.
pub(super) fn changes_len(identity_len: usize, pages: u64, entries: u64) -> Option<u64> {
    entries
        .checked_mul(ENTRY_LEN)?
        .checked_add(pages.checked_mul(DIGEST_LEN)?)?
        .checked_add(header_len(identity_len) + 2 * DIGEST_LEN + 8)
}

/// The header's bytes, `0 .. 92 + L`, behind `magic`. The identity must be at most [`MAX_IDENTITY_LEN`] bytes.
pub(super) fn encode_header(magic: &[u8; 8], h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED_HEADER_LEN + h.identity.len());
    b.extend_from_slice(magic);
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

/// Format 3's base trailer: over the header (which holds the volume digest) and the page table (whose root is
/// that volume digest). A digest is checked against its page's value when it is read.
pub(super) fn checksum(header: &[u8], table: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT);
    h.update(header);
    h.update(table);
    *h.finalize().as_bytes()
}

/// A changes file's trailer: over every byte before it.
pub(super) fn changes_checksum(body: &[u8]) -> [u8; 32] {
    blake3::derive_key(CHANGES_CHECKSUM_CONTEXT, body)
}

/// Format 2's trailer: over the header only.
pub(super) fn checksum_v2(header: &[u8]) -> [u8; 32] {
    blake3::derive_key(CHECKSUM_CONTEXT_V2, header)
}

/// Format 1's trailer: over the header's bytes and the plain BLAKE3 hash of the digest section.
pub(super) fn checksum_v1(header: &[u8], digests: &blake3::Hash) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT_V1);
    h.update(header);
    h.update(digests.as_bytes());
    *h.finalize().as_bytes()
}

/// The bytes a manifest is read from: a file (read at offsets, so that a reader never moves a shared cursor) or
/// the memory store's copy.
pub(super) enum Src {
    File(File),
    Memory(Arc<[u8]>),
}

impl Src {
    fn len(&self) -> io::Result<u64> {
        match self {
            Src::File(f) => Ok(f.metadata()?.len()),
            Src::Memory(b) => Ok(b.len() as u64),
        }
    }

    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Src::File(f) => f.read_exact_at(buf, offset),
            Src::Memory(b) => {
                let end = offset.checked_add(buf.len() as u64);
                match end {
                    Some(end) if end <= b.len() as u64 => {
                        buf.copy_from_slice(&b[offset as usize..end as usize]);
                        Ok(())
                    }
                    _ => Err(io::ErrorKind::UnexpectedEof.into()),
                }
            }
        }
    }
}

/// Big-endian fields out of the fixed header, at known offsets (the slice is [`FIXED_HEADER_LEN`] bytes).
struct Fields<'a>(&'a [u8]);

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
pub(super) fn read_error(e: io::Error) -> Unusable {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Unusable::Damaged("truncated while being read".into())
    } else {
        Unusable::Unreadable(e.to_string())
    }
}

fn damaged<T>(why: String) -> Result<T, Unusable> {
    Err(Unusable::Damaged(why))
}

/// A header read and checked for itself (not yet against what the caller expects).
struct Parsed {
    magic: [u8; 8],
    header: Header,
    /// Its bytes, `0 .. 92 + L`.
    bytes: Vec<u8>,
}

/// Reads the header at the start of `src`, behind one of `magics`.
fn parse_header(src: &Src, len: u64, magics: &[&[u8; 8]]) -> Result<Parsed, Unusable> {
    if len < FIXED_HEADER_LEN as u64 {
        return damaged(format!("truncated: {len} bytes, shorter than a header"));
    }
    let mut fixed = vec![0u8; FIXED_HEADER_LEN];
    src.read_at(&mut fixed, 0).map_err(read_error)?;
    let f = Fields(&fixed);
    let magic = f.bytes::<8>(0);
    if !magics.iter().any(|m| **m == magic) {
        return damaged(format!(
            "bad magic: not a blockmover {}",
            if magics.contains(&CHANGES_MAGIC) {
                "manifest changes file"
            } else {
                "manifest (format 1, 2 or 3)"
            }
        ));
    }
    let role = match fixed[8] {
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
    let identity_len = usize::from(f.u16(90));
    if identity_len > MAX_IDENTITY_LEN {
        return damaged(format!(
            "identity of {identity_len} bytes, at most {MAX_IDENTITY_LEN} fit"
        ));
    }
    if len < header_len(identity_len) {
        return damaged(format!("truncated: {len} bytes, shorter than its header"));
    }
    let mut bytes = fixed.clone();
    bytes.resize(FIXED_HEADER_LEN + identity_len, 0);
    src.read_at(&mut bytes[FIXED_HEADER_LEN..], FIXED_HEADER_LEN as u64)
        .map_err(read_error)?;
    let Ok(identity) = String::from_utf8(bytes[FIXED_HEADER_LEN..].to_vec()) else {
        return damaged("identity is not UTF-8".into());
    };
    Ok(Parsed {
        magic,
        header: Header {
            role,
            geometry,
            volume_digest: Digest(f.bytes(29)),
            written_unix_ms: f.u64(61),
            last_full_unix_ms: f.u64(69),
            deltas_since_full: f.u32(77),
            kind,
            stamp: f.u64(82),
            identity,
        },
        bytes,
    })
}

/// The exact length `want` (`None`: overflow) against the file's `len`.
fn check_len(len: u64, want: Option<u64>, count: u64) -> Result<(), Unusable> {
    match want {
        Some(want) if want == len => Ok(()),
        Some(want) if want > len => damaged(format!(
            "truncated: {len} bytes, the header announces {want}"
        )),
        Some(want) => damaged(format!("{len} bytes, the header announces {want}")),
        None => damaged(format!("the header announces {count} chunks")),
    }
}

/// A base file whose header, length, checksum and page table were checked.
pub(super) struct BaseFile {
    pub(super) src: Src,
    pub(super) header: Header,
    /// Where the first digest is.
    pub(super) digests_at: u64,
    /// The value of each page of its digests: read from a format-3 file, computed for an older one.
    pub(super) table: Vec<[u8; 32]>,
    /// Its trailer, which a changes file names to say which base it applies to.
    pub(super) checksum: [u8; 32],
    /// 1, 2 or 3.
    pub(super) format: u8,
}

impl BaseFile {
    /// Another handle on the same validated file (a file's descriptor duplicated: reads are at offsets).
    pub(super) fn try_clone(&self) -> io::Result<Self> {
        let src = match &self.src {
            Src::File(f) => Src::File(f.try_clone()?),
            Src::Memory(b) => Src::Memory(b.clone()),
        };
        Ok(BaseFile {
            src,
            header: self.header.clone(),
            digests_at: self.digests_at,
            table: self.table.clone(),
            checksum: self.checksum,
            format: self.format,
        })
    }
}

/// Checks the base file in `src`. Format 3: header, exact length, checksum, and the page table's root against the
/// volume digest (the digests themselves are checked page by page when read). Formats 1 and 2: every digest is
/// read once, for the checksum (format 1), the volume digest and the page table.
pub(super) fn open_base(src: Src) -> Result<BaseFile, Unusable> {
    let len = src.len().map_err(read_error)?;
    let Parsed {
        magic,
        header,
        bytes,
    } = parse_header(&src, len, &[MAGIC, MAGIC_V2, MAGIC_V1])?;
    let format = match &magic {
        m if m == MAGIC => 3,
        m if m == MAGIC_V2 => 2,
        _ => 1,
    };
    let geometry = header.geometry;
    let pages = Pages::new(geometry);
    let count = geometry.chunk_count();
    let digests_at = bytes.len() as u64;
    let mut trailer = [0u8; 32];
    let table = if format == 3 {
        check_len(
            len,
            base_len(header.identity.len(), count, pages.count()),
            count,
        )?;
        let mut raw = vec![0u8; (pages.count() * DIGEST_LEN) as usize];
        src.read_at(&mut raw, digests_at + count * DIGEST_LEN)
            .map_err(read_error)?;
        src.read_at(&mut trailer, len - DIGEST_LEN)
            .map_err(read_error)?;
        if trailer != checksum(&bytes, &raw) {
            return damaged("checksum mismatch".into());
        }
        let table = split_table(&raw);
        if pages.root(&table) != header.volume_digest {
            return damaged("its page table does not give its volume digest".into());
        }
        table
    } else {
        check_len(len, base_len_v2(header.identity.len(), count), count)?;
        let mut hashed = PageHasher::new(geometry);
        let mut plain = (format == 1).then(blake3::Hasher::new);
        let mut buf = vec![0u8; BUFFER_LEN];
        let mut at = 0u64;
        let end = count * DIGEST_LEN;
        while at < end {
            let n = (end - at).min(BUFFER_LEN as u64) as usize;
            src.read_at(&mut buf[..n], digests_at + at)
                .map_err(read_error)?;
            hashed.push_many(&buf[..n]);
            if let Some(h) = &mut plain {
                h.update(&buf[..n]);
            }
            at += n as u64;
        }
        src.read_at(&mut trailer, len - DIGEST_LEN)
            .map_err(read_error)?;
        let expected = match &plain {
            Some(h) => checksum_v1(&bytes, &h.finalize()),
            None => checksum_v2(&bytes),
        };
        if trailer != expected {
            return damaged("checksum mismatch".into());
        }
        let (table, root) = hashed.finish().expect("every digest pushed");
        if root != header.volume_digest {
            return damaged("its digests do not give its volume digest".into());
        }
        table
    };
    Ok(BaseFile {
        src,
        header,
        digests_at,
        table,
        checksum: trailer,
        format,
    })
}

fn split_table(raw: &[u8]) -> Vec<[u8; 32]> {
    raw.chunks_exact(32)
        .map(|v| v.try_into().expect("32 bytes"))
        .collect()
}

/// A changes file checked against its base.
pub(super) struct Changes {
    pub(super) header: Header,
    pub(super) table: Vec<[u8; 32]>,
    pub(super) entries: Entries,
}

/// Checks the changes file in `src` against `base`: `Ok(None)` if it applies to another base (left over from
/// before the base was rewritten: the base alone is the manifest). Checks its length and checksum, its entries
/// (in increasing chunk order, inside the volume), that its page table differs from the base's only in pages its
/// entries touch, and that the table gives its volume digest.
pub(super) fn open_changes(src: Src, base: &BaseFile) -> Result<Option<Changes>, Unusable> {
    let len = src.len().map_err(read_error)?;
    // The checksum first, over the whole file (bounded by the most changes a writer keeps): a damaged field must
    // not pass for a changes file of another base, which would make the base alone the manifest.
    let most = changes_len(
        MAX_IDENTITY_LEN,
        Pages::new(base.header.geometry).count(),
        max_changes(base.header.geometry.chunk_count()),
    )
    .unwrap_or(u64::MAX);
    if len > most {
        return damaged(format!(
            "changes file of {len} bytes, longer than any of this volume ({most})"
        ));
    }
    if len < header_len(0) + 2 * DIGEST_LEN + 8 {
        return damaged(format!("changes file truncated: {len} bytes"));
    }
    // Everything below is read from these bytes only: a file changed in place after this read cannot make a field
    // disagree with the checksum that vouched for it.
    let whole: Arc<[u8]> = match src {
        Src::Memory(b) => b,
        Src::File(_) => {
            let mut b: Arc<[u8]> = std::iter::repeat_n(0u8, len as usize).collect();
            src.read_at(Arc::get_mut(&mut b).expect("not shared yet"), 0)
                .map_err(read_error)?;
            b
        }
    };
    let all = Src::Memory(whole.clone());
    let (body, trailer) = whole.split_at(whole.len() - DIGEST_LEN as usize);
    if trailer != changes_checksum(body) {
        return damaged("changes file checksum mismatch".into());
    }
    let Parsed { header, bytes, .. } = parse_header(&all, len, &[CHANGES_MAGIC])?;
    let geometry = header.geometry;
    let pages = Pages::new(geometry);
    let at = bytes.len() as u64;
    if len < at + 2 * DIGEST_LEN + 8 {
        return damaged(format!("changes file truncated: {len} bytes"));
    }
    let mut fixed = [0u8; 40];
    all.read_at(&mut fixed, at).map_err(read_error)?;
    if fixed[..32] != base.checksum {
        return Ok(None);
    }
    if header.geometry != base.header.geometry
        || header.role != base.header.role
        || header.identity != base.header.identity
    {
        return damaged("its changes file describes another volume than its base".into());
    }
    let count = u64::from_be_bytes(fixed[32..].try_into().expect("8 bytes"));
    if count > max_changes(geometry.chunk_count()) {
        return damaged(format!("its changes file announces {count} entries"));
    }
    check_len(
        len,
        changes_len(header.identity.len(), pages.count(), count),
        count,
    )?;
    let table_at = (at + 40) as usize;
    let entries_at = table_at + (pages.count() * DIGEST_LEN) as usize;
    let table = split_table(&body[table_at..entries_at]);
    let mut touched = vec![false; pages.count() as usize];
    let mut last = None;
    for e in body[entries_at..].chunks_exact(ENTRY_LEN as usize) {
        let chunk = u64::from_be_bytes(e[..8].try_into().expect("8 bytes"));
        let ordered = last.is_none_or(|last| last < chunk);
        if !ordered || chunk >= geometry.chunk_count() {
            return damaged(format!(
                "its changes file has entry {chunk} out of order or past the volume"
            ));
        }
        pages
            .of_chunk(chunk)
            .for_each(|p| touched[p as usize] = true);
        last = Some(chunk);
    }
    let entries = Entries::new(whole.clone(), entries_at, count as usize);
    let untouched_differ =
        (0..pages.count() as usize).any(|p| !touched[p] && table[p] != base.table[p]);
    if untouched_differ {
        return damaged("its changes file's page table disagrees with its base".into());
    }
    if pages.root(&table) != header.volume_digest {
        return damaged("its changes file's page table does not give its volume digest".into());
    }
    Ok(Some(Changes {
        header,
        table,
        entries,
    }))
}

/// Whether a manifest `header` whole and of `role` is the one `expect`ed.
pub(super) fn check_expected(header: &Header, role: Role, expect: &Expect) -> Result<(), Unusable> {
    if header.role != role {
        return Err(Unusable::Foreign(format!(
            "written by the {}, this is the {}",
            header.role.as_str(),
            role.as_str()
        )));
    }
    if header.identity != expect.identity {
        return Err(Unusable::Foreign(format!(
            "it describes {:?}, this sync {:?}",
            header.identity, expect.identity
        )));
    }
    if header.stamp != expect.stamp {
        return Err(Unusable::Stale(format!(
            "it was written when the object's stamp was {}, it is {} now: something else changed it since",
            header.stamp, expect.stamp
        )));
    }
    let (have, want) = (header.geometry, expect.geometry);
    if have != want {
        return Err(Unusable::Geometry(format!(
            "{} bytes in chunks of {}, this sync has {} bytes in chunks of {}",
            have.volume_size(),
            have.chunk_size(),
            want.volume_size(),
            want.chunk_size()
        )));
    }
    Ok(())
}
