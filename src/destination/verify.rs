//! Checking a DATA or BLOCKS frame and rebuilding its chunk: masks and lengths, zstd capped at `raw_len`, the
//! rebuilt chunk's digest (from its bytes, from the target's block digests and the blocks that travelled, or for a
//! pushed chunk from its cover) checked against the source's before any of it is written.

use std::cell::RefCell;

use crate::chunk::{
    block_digests_at, block_range, blocks_in, chunk_digest_of_blocks, chunk_digest_with_cover,
    hash_chunk, runs, Digest, Geometry, BLOCK_SIZE,
};
use crate::codec::{DataFrame, Encoding};
use crate::error::{Error, Result};
use crate::stats::{add, Figures};
use crate::volume::Volume;
use crate::zstream::Decoder;

/// What the blocks of a chunk that do not travel in its DATA hold.
#[derive(Clone, Copy, Debug)]
pub enum Base<'a> {
    /// Zeros: the target chunk was all zeros when its NEED was sent.
    Zeros,
    /// The target chunk's block digests as its NEED sent them (protocol 6): the chunk is verified from the blocks
    /// that travel and these, without reading it again. The session is the target's one writer and writes an open
    /// chunk only from its DATA, so its other blocks still hold what was hashed.
    Blocks(&'a [Digest]),
}

/// Rebuilds a chunk (its `base` with the DATA's blocks replaced or zeroed), checks it against the source's digest,
/// and only then writes its data blocks. Zero blocks are left to the caller. Returns the block digests of the chunk
/// as written (from the same hashing). Buffers are per worker thread: a fresh 64 KiB allocation per chunk showed up
/// as page faults and unmapping in profiles.
pub fn verify_and_write(
    target: &Volume,
    geometry: Geometry,
    figures: &Figures,
    d: &DataFrame,
    expected: Digest,
    base: Base<'_>,
) -> Result<Vec<Digest>> {
    thread_local! {
        static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    BUFFERS.with(|cell| {
        let (scratch, chunk) = &mut *cell.borrow_mut();
        let (offset, len) = geometry.chunk_range(d.chunk);
        let raw = decoded(d, len, scratch)?;
        if raw.len() == len {
            // Every block travelled (a chunk copied whole): the payload is the chunk, hashed and written in place.
            let (digest, blocks) = hash_chunk(raw);
            if digest != expected {
                return Err(Error::DigestMismatch { chunk: d.chunk });
            }
            target.write_all_at(raw, offset)?;
            return Ok(blocks);
        }
        if let Base::Blocks(blocks) = base {
            if let Some((digest, blocks)) = patched_digest(d, raw, len, blocks) {
                if digest != expected {
                    return Err(Error::DigestMismatch { chunk: d.chunk });
                }
                let mut at = 0;
                for (b0, b1) in runs(d.send_mask) {
                    let (start, end) = (block_range(len, b0).start, block_range(len, b1 - 1).end);
                    target.write_all_at(&raw[at..at + end - start], offset + start as u64)?;
                    at += end - start;
                }
                return Ok(blocks);
            }
        }
        chunk.resize(len, 0);
        let target_zero = matches!(base, Base::Zeros);
        if !target_zero {
            target.read_exact_at(chunk, offset)?;
            add(&figures.bytes_read, len as u64);
        }
        // The buffer holds the previous chunk: every block is either sent, zeroed, or (when the target chunk is
        // all zeros) zero-filled here; otherwise it was just read from the target.
        let mut at = 0;
        for b in 0..blocks_in(len) {
            let r = block_range(len, b);
            if d.send_mask & (1 << b) != 0 {
                let n = r.len();
                chunk[r].copy_from_slice(&raw[at..at + n]);
                at += n;
            } else if target_zero || d.zero_mask & (1 << b) != 0 {
                chunk[r].fill(0);
            }
        }
        let (digest, blocks) = hash_chunk(chunk);
        if digest != expected {
            return Err(Error::DigestMismatch { chunk: d.chunk });
        }
        for (b0, b1) in runs(d.send_mask) {
            let (start, end) = (block_range(len, b0).start, block_range(len, b1 - 1).end);
            target.write_all_at(&chunk[start..end], offset + start as u64)?;
        }
        Ok(blocks)
    })
}

/// The digest of the chunk (`len` bytes) that the DATA `d` (its decoded payload `raw`) makes of a target chunk whose
/// block digests are `blocks`: only the blocks that travel, and those it zeroes, are hashed; `None` for a chunk of
/// one block (or digests that do not fit it), which is verified from its bytes. With the digest, the new chunk's
/// block digests.
fn patched_digest(
    d: &DataFrame,
    raw: &[u8],
    len: usize,
    blocks: &[Digest],
) -> Option<(Digest, Vec<Digest>)> {
    if blocks.len() != blocks_in(len) as usize {
        return None;
    }
    let mut digests = blocks.to_vec();
    travelling_digests(d, raw, len, &mut digests);
    Some((chunk_digest_of_blocks(&digests, len)?, digests))
}

/// Puts into `digests` (one per block of the chunk, `len` bytes) the digest of each block the DATA or BLOCKS `d`
/// carries (from `raw`, its decoded payload) or zeroes; the others are left as they are.
fn travelling_digests(d: &DataFrame, raw: &[u8], len: usize, digests: &mut [Digest]) {
    static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
    let mut at = 0;
    for (b0, b1) in runs(d.send_mask) {
        let n = block_range(len, b1 - 1).end - block_range(len, b0).start;
        let sent = block_digests_at(&raw[at..at + n], b0);
        digests[b0 as usize..b1 as usize].copy_from_slice(&sent);
        at += n;
    }
    for (b0, b1) in runs(d.zero_mask) {
        for b in b0..b1 {
            let zeros = &ZEROS[..block_range(len, b).len()];
            digests[b as usize] = block_digests_at(zeros, b)[0];
        }
    }
}

/// Checks a pushed chunk (BLOCKS, protocol 7) and only then writes its data blocks (zero blocks are left to the
/// caller). `(base, known)`: the destination's manifest digest of the chunk and, when known, the target chunk's block
/// digests (from the destination's block digests file, proven against `base`). Only the target's listed blocks
/// (`send_mask | zero_mask`) are read, and none when `known`:
/// - the cover with the target's listed blocks must give `base`, the destination's manifest digest of the chunk: so
///   the source's blocks outside the list are the base's, and the list missed no change of this chunk;
/// - the cover with the pushed blocks must give `expected`, the source's digest of the chunk.
///
/// The target's blocks outside the list are not read: they are trusted to hold the base, as every chunk the list
/// does not name is (PROTOCOL.md, "Why a delta sync is safe"). A chunk whose every block is listed has no cover and
/// is checked from what travels alone. `DigestMismatch` when a check fails, with nothing written; a frame that names
/// no block, or whose cover does not fit its listed blocks, is a protocol violation. Returns the chunk's block
/// digests as written when they are known (every block listed, or `known`).
pub fn verify_pushed(
    target: &Volume,
    geometry: Geometry,
    figures: &Figures,
    d: &DataFrame,
    expected: Digest,
    cover: &[Digest],
    (base, known): (Digest, Option<&[Digest]>),
) -> Result<Option<Vec<Digest>>> {
    thread_local! {
        static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    BUFFERS.with(|cell| {
        let (scratch, buf) = &mut *cell.borrow_mut();
        let (offset, len) = geometry.chunk_range(d.chunk);
        let raw = decoded(d, len, scratch)?;
        let n = blocks_in(len);
        let listed = d.send_mask | d.zero_mask;
        let every = if n == 64 { u64::MAX } else { (1 << n) - 1 };
        let bad = |why: &str| Error::Protocol(format!("BLOCKS for chunk {}: {why}", d.chunk));
        if listed == 0 {
            return Err(bad("no block listed"));
        }
        let mut pushed = vec![Digest([0; 32]); n as usize];
        // The chunk's block digests after the write, where they are known.
        let mut now = None;
        let digest = if listed == every {
            if !cover.is_empty() {
                return Err(bad("a cover for a chunk whose every block is listed"));
            }
            // Nothing of the target stays: the chunk is what travels.
            buf.clear();
            buf.resize(len, 0);
            let mut at = 0;
            for (b0, b1) in runs(d.send_mask) {
                let r = block_range(len, b0).start..block_range(len, b1 - 1).end;
                buf[r.clone()].copy_from_slice(&raw[at..at + r.len()]);
                at += r.len();
            }
            let (digest, blocks) = hash_chunk(buf);
            now = Some(blocks);
            digest
        } else {
            // The target's digests of its listed blocks: from its block digests (proven against the base, so
            // nothing of the target is read) when known, else read.
            let known = known.filter(|k| k.len() == n as usize);
            let had = match known {
                Some(k) => k.to_vec(),
                None => {
                    let mut had = vec![Digest([0; 32]); n as usize];
                    for (b0, b1) in runs(listed) {
                        let r = block_range(len, b0).start..block_range(len, b1 - 1).end;
                        buf.resize(r.len(), 0);
                        target.read_exact_at(&mut buf[..r.len()], offset + r.start as u64)?;
                        add(&figures.bytes_read, r.len() as u64);
                        had[b0 as usize..b1 as usize]
                            .copy_from_slice(&block_digests_at(&buf[..r.len()], b0));
                    }
                    had
                }
            };
            let misfit = || bad("its cover does not fit its listed blocks");
            let was = chunk_digest_with_cover(cover, &had, len, listed).ok_or_else(misfit)?;
            if was != base {
                return Err(Error::DigestMismatch { chunk: d.chunk });
            }
            travelling_digests(d, raw, len, &mut pushed);
            let digest = chunk_digest_with_cover(cover, &pushed, len, listed).ok_or_else(misfit)?;
            if known.is_some() {
                let mut blocks = had;
                for (b0, b1) in runs(listed) {
                    blocks[b0 as usize..b1 as usize]
                        .copy_from_slice(&pushed[b0 as usize..b1 as usize]);
                }
                now = Some(blocks);
            }
            digest
        };
        if digest != expected {
            return Err(Error::DigestMismatch { chunk: d.chunk });
        }
        let mut at = 0;
        for (b0, b1) in runs(d.send_mask) {
            let (start, end) = (block_range(len, b0).start, block_range(len, b1 - 1).end);
            target.write_all_at(&raw[at..at + end - start], offset + start as u64)?;
            at += end - start;
        }
        Ok(now)
    })
}

/// Decodes the lane payloads of `frames` (the order they arrived in) with the session's lane decoders, lanes in
/// parallel, each lane's parts in order; each becomes a raw payload. Returns the payload sizes as they arrived.
pub fn decode_lanes(frames: &mut [DataFrame], lanes: &mut [Option<Decoder>]) -> Result<Vec<usize>> {
    use rayon::prelude::*;
    let wire = frames.iter().map(|d| d.payload.len()).collect();
    let mut work: Vec<(&mut Option<Decoder>, Vec<&mut DataFrame>)> =
        lanes.iter_mut().map(|l| (l, Vec::new())).collect();
    for d in frames.iter_mut() {
        if let Encoding::Lane(n) = d.encoding {
            match work.get_mut(usize::from(n)) {
                Some((_, list)) => list.push(d),
                None => {
                    return Err(Error::Protocol(format!(
                        "DATA for chunk {}: lane {n} does not exist",
                        d.chunk
                    )))
                }
            }
        }
    }
    work.retain(|(_, list)| !list.is_empty());
    // One lane (or none) has nothing to run in parallel: decoded here, without waking a pool thread.
    let decode = |(decoder, list): (&mut Option<Decoder>, Vec<&mut DataFrame>)| {
        let decoder = match decoder {
            Some(d) => d,
            None => decoder.insert(Decoder::new().map_err(Error::compression)?),
        };
        for d in list {
            let raw = decoder
                .decompress(&d.payload, d.raw_len as usize)
                .map_err(|why| Error::Protocol(format!("DATA for chunk {}: {why}", d.chunk)))?;
            d.payload = bytes::Bytes::from(raw);
            d.encoding = Encoding::Raw;
        }
        Ok::<(), Error>(())
    };
    if work.len() > 1 {
        work.into_par_iter().try_for_each(decode)?;
    } else {
        work.into_iter().try_for_each(decode)?;
    }
    Ok(wire)
}

/// Checks a DATA frame's masks and lengths against its chunk and decodes its payload (zstd capped at `raw_len`).
pub fn decode_payload(d: &DataFrame, chunk_len: usize) -> Result<Vec<u8>> {
    let mut scratch = Vec::new();
    decoded(d, chunk_len, &mut scratch).map(<[u8]>::to_vec)
}

/// [`decode_payload`] without copies: a raw payload is borrowed, a zstd one is decompressed into `scratch`.
fn decoded<'a>(d: &'a DataFrame, chunk_len: usize, scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
    let blocks = blocks_in(chunk_len);
    let valid = if blocks == 64 {
        u64::MAX
    } else {
        (1u64 << blocks) - 1
    };
    let bad = |why: String| Error::Protocol(format!("DATA for chunk {}: {why}", d.chunk));
    if d.send_mask & d.zero_mask != 0 || (d.send_mask | d.zero_mask) & !valid != 0 {
        return Err(bad(
            "block masks overlap or name blocks outside the chunk".into()
        ));
    }
    let expected: usize = (0..blocks)
        .filter(|b| d.send_mask & (1 << b) != 0)
        .map(|b| block_range(chunk_len, b).len())
        .sum();
    if d.raw_len as usize != expected {
        return Err(bad(format!(
            "raw_len {} but its blocks hold {expected}",
            d.raw_len
        )));
    }
    match d.encoding {
        Encoding::Raw if d.payload.len() == expected => Ok(&d.payload),
        Encoding::Raw => Err(bad(format!(
            "raw payload of {} bytes, expected {expected}",
            d.payload.len()
        ))),
        Encoding::Zstd if d.payload.len() >= expected => {
            Err(bad("a zstd payload no smaller than its raw data".into()))
        }
        Encoding::Lane(n) => Err(bad(format!(
            "a part of lane {n} that was not decoded in the lane's order"
        ))),
        Encoding::Zstd => match decompress(&d.payload, expected, scratch) {
            Ok(n) if n == expected => Ok(&scratch[..n]),
            Ok(n) => Err(bad(format!(
                "zstd payload decompresses to {n} bytes, expected {expected}"
            ))),
            Err(e) => Err(bad(format!(
                "zstd payload does not decompress within {expected} bytes: {e}"
            ))),
        },
    }
}

/// zstd decompression into `out`, refused beyond `capacity` bytes, with one reusable context per thread.
fn decompress(payload: &[u8], capacity: usize, out: &mut Vec<u8>) -> std::io::Result<usize> {
    thread_local! {
        static CONTEXT: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }
    if out.len() < capacity {
        out.resize(capacity, 0);
    }
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress_to_buffer(payload, &mut out[..capacity]),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(send: u64, zero: u64, enc: Encoding, raw_len: u32, payload: Vec<u8>) -> DataFrame {
        DataFrame {
            chunk: 0,
            send_mask: send,
            zero_mask: zero,
            encoding: enc,
            raw_len,
            payload: Bytes::from(payload),
        }
    }

    #[test]
    fn payload_checks_reject_inconsistent_frames() {
        let ok = decode_payload(&frame(0b1, 0, Encoding::Raw, 4096, vec![1; 4096]), 65536);
        assert_eq!(ok.expect("valid").len(), 4096);
        let overlap = frame(0b1, 0b1, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&overlap, 65536).is_err());
        let outside = frame(1 << 16, 0, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&outside, 65536).is_err());
        let wrong_len = frame(0b11, 0, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&wrong_len, 65536).is_err());
        let short_last = frame(0b10, 0, Encoding::Raw, 100, vec![1; 100]);
        assert!(decode_payload(&short_last, 4196).is_ok());
    }

    /// A target file of `chunks` random chunks, opened as a destination would.
    fn target_of(
        dir: &tempfile::TempDir,
        len: usize,
    ) -> anyhow::Result<(Vec<u8>, Volume, Geometry)> {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; len];
        rand_chacha::ChaCha8Rng::seed_from_u64(len as u64).fill_bytes(&mut data);
        let path = dir.path().join("t.img");
        std::fs::write(&path, &data)?;
        let g = Geometry::new(len as u64, 65536).map_err(anyhow::Error::msg)?;
        let mut target = Volume::open_target(&path)?;
        target.allow_writes_below(len as u64)?;
        Ok((data, target, g))
    }

    #[test]
    fn a_chunk_is_verified_from_the_needs_block_digests_without_reading_the_target_again(
    ) -> anyhow::Result<()> {
        // A whole chunk, and a short last chunk whose short last block travels.
        for (len, chunk, sent, zeroed) in [
            (2 * 65536, 1u64, 0b1000_0000_0010_0100u64, 1u64 << 9),
            (65536 + 3 * 4096 + 100, 1, 0b1000, 0b1),
        ] {
            let dir = tempfile::tempdir()?;
            let (data, target, g) = target_of(&dir, len)?;
            let (offset, clen) = g.chunk_range(chunk);
            let before = &data[offset as usize..][..clen];
            let need = crate::chunk::block_digests(before);
            // The source's chunk: the sent blocks changed, the zeroed one zeros.
            let mut wanted = before.to_vec();
            let mut payload = Vec::new();
            for b in 0..blocks_in(clen) {
                let r = block_range(clen, b);
                if sent & (1 << b) != 0 {
                    wanted[r.clone()]
                        .iter_mut()
                        .for_each(|x| *x = x.wrapping_add(1));
                    payload.extend_from_slice(&wanted[r]);
                } else if zeroed & (1 << b) != 0 {
                    wanted[r].fill(0);
                }
            }
            let mut d = frame(sent, zeroed, Encoding::Raw, payload.len() as u32, payload);
            d.chunk = chunk;
            let figures = Figures::default();
            let expected = Digest::of(&wanted);
            verify_and_write(&target, g, &figures, &d, expected, Base::Blocks(&need))?;
            assert_eq!(
                figures
                    .bytes_read
                    .load(std::sync::atomic::Ordering::Relaxed),
                0,
                "the target chunk is not read again"
            );
            let mut now = vec![0u8; clen];
            target.read_exact_at(&mut now, offset)?;
            for b in 0..blocks_in(clen) {
                let r = block_range(clen, b);
                // Data blocks are written; zero blocks are left to the caller, and the rest are untouched.
                let is = if sent & (1 << b) != 0 {
                    &wanted[r.clone()]
                } else {
                    &before[r.clone()]
                };
                assert_eq!(&now[r], is, "chunk {chunk} block {b}");
            }

            // A payload that does not rebuild the chunk is refused before anything is written, and so is a NEED
            // digest that does not describe the target (the target is not read to find out otherwise).
            std::fs::write(dir.path().join("t.img"), &data)?;
            let mut bad = d.clone();
            let mut tampered = bad.payload.to_vec();
            tampered[0] ^= 1;
            bad.payload = Bytes::from(tampered);
            let mut wrong_need = need.clone();
            wrong_need[1] = Digest::of(b"another block"); // a block that does not travel
            for (frame, blocks) in [(&bad, &need), (&d, &wrong_need)] {
                let err =
                    verify_and_write(&target, g, &figures, frame, expected, Base::Blocks(blocks))
                        .expect_err("must not verify");
                assert!(
                    matches!(err, Error::DigestMismatch { chunk: c } if c == chunk),
                    "{err}"
                );
            }
            target.read_exact_at(&mut now, offset)?;
            assert_eq!(now, before, "nothing written");
        }
        Ok(())
    }

    #[test]
    fn decompression_is_capped_at_raw_len() {
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).expect("compress");
        let err =
            decode_payload(&frame(0b1, 0, Encoding::Zstd, 4096, bomb), 65536).expect_err("bomb");
        assert!(
            err.to_string().contains("does not decompress within 4096"),
            "{err}"
        );
        let inflated = zstd::bulk::compress(&[7u8; 10], 3).expect("compress");
        let err = decode_payload(&frame(0b1, 0, Encoding::Zstd, 4096, inflated), 65536)
            .expect_err("short");
        assert!(err.to_string().contains("expected 4096"), "{err}");
    }
}
