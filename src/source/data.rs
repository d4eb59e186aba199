//! Answering a NEED: the chunk read again, the blocks that differ, compressed when that pays.

use bytes::Bytes;
use rayon::prelude::*;

use crate::chunk::{block_digests, block_range, is_zero, runs, Digest, Geometry, BLOCK_SIZE};
use crate::codec::{DataFrame, Encoding};
use crate::error::{Error, Result};
use crate::stats::{add, Figures};
use crate::volume::Volume;
use crate::zstream::Encoder;

/// Counts a DATA or BLOCKS frame sent; `changed` counts its chunk as changed too (not for the NEED answer to a chunk
/// whose pushed blocks were counted).
pub(super) fn count_data(figures: &Figures, d: &DataFrame, changed: bool) {
    add(&figures.chunks_changed, u64::from(changed));
    add(&figures.chunks_sent, 1);
    add(&figures.blocks_sent, u64::from(d.send_mask.count_ones()));
    add(&figures.zero_blocks, u64::from(d.zero_mask.count_ones()));
    add(&figures.data_bytes, u64::from(d.raw_len));
    add(&figures.compressed_bytes, d.payload.len() as u64);
}

/// The first of `chunks` whose bytes no longer hash to the digest given with it (read again now, on all cores).
pub fn changed_chunk(
    volume: &Volume,
    geometry: Geometry,
    chunks: &[(u64, Digest)],
) -> Result<Option<u64>> {
    let changed: Vec<Result<Option<u64>>> = chunks
        .par_iter()
        .map(|&(chunk, announced)| {
            let (offset, len) = geometry.chunk_range(chunk);
            let mut bytes = Vec::with_capacity(len);
            volume.read_append(&mut bytes, offset, len)?;
            Ok((Digest::of(&bytes) != announced).then_some(chunk))
        })
        .collect();
    changed.into_iter().find_map(|r| r.transpose()).transpose()
}

/// Builds the DATA answer to a NEED: the blocks whose digests differ from the target's (or, for a target chunk of
/// zeros, the non-zero blocks); zero blocks become marks. The payload is raw; with `compress`, the second value says
/// whether it is worth compressing (a probe of it compresses, see [`compressible`]), and the caller compresses it
/// in a lane (`crate::zstream`).
///
/// The chunk is read again, not taken from the scan: on a snapshot it holds the bytes the scan hashed. On a live
/// volume it may not, and the destination then refuses the rebuilt chunk (its digest is checked before anything is
/// written); [`changed_chunk`] tells the source why.
///
/// With `scanned`, the chunk's block digests as the scan computed them, only the blocks whose digests differ from
/// the target's are read, and nothing is hashed.
pub fn build_data(
    volume: &Volume,
    geometry: Geometry,
    chunk: u64,
    target_blocks: Option<&[Digest]>,
    scanned: Option<&[Digest]>,
    compress: Option<i32>,
) -> Result<(DataFrame, bool)> {
    let (offset, len) = geometry.chunk_range(chunk);
    if let (Some(theirs), Some(ours)) = (target_blocks, scanned) {
        if theirs.len() == ours.len() && ours.len() == geometry.blocks_in_chunk(chunk) as usize {
            return differing_blocks(volume, geometry, chunk, theirs, ours, compress);
        }
    }
    // Read into the buffer that becomes the payload: a chunk whose blocks all travel (a first sync) is sent from
    // where it was read; otherwise the blocks that travel are moved to the front.
    let mut raw = Vec::with_capacity(len);
    volume.read_append(&mut raw, offset, len)?;
    let (mut send_mask, mut zero_mask) = (0u64, 0u64);
    let mut kept = 0;
    // All of the chunk's block digests at once: hashed side by side, they cost a third of one by one.
    let ours = target_blocks.map(|_| block_digests(&raw));
    for b in 0..geometry.blocks_in_chunk(chunk) {
        let r = block_range(len, b);
        let block = &raw[r.clone()];
        let zero = is_zero(block);
        let differs = match (target_blocks, &ours) {
            (Some(theirs), Some(ours)) => ours[b as usize] != theirs[b as usize],
            _ => !zero,
        };
        if !differs {
            continue;
        }
        if zero {
            zero_mask |= 1 << b;
        } else {
            send_mask |= 1 << b;
            if r.start != kept {
                raw.copy_within(r.clone(), kept);
            }
            kept += r.len();
        }
    }
    raw.truncate(kept);
    if kept < len / 2 {
        // An incremental's few changed blocks: give the chunk-sized buffer back now rather than hold it while the
        // frame waits to be sent (and have every NEED take fresh, kernel-zeroed pages).
        raw.shrink_to_fit();
    }
    Ok(raw_frame(chunk, send_mask, zero_mask, raw, compress))
}

/// The DATA answer to a NEED from the scan's block digests: the blocks whose digests differ from the target's are
/// read (a run of them in one read), and those that hold zeros become marks.
pub(super) fn differing_blocks(
    volume: &Volume,
    geometry: Geometry,
    chunk: u64,
    theirs: &[Digest],
    ours: &[Digest],
    compress: Option<i32>,
) -> Result<(DataFrame, bool)> {
    let (offset, len) = geometry.chunk_range(chunk);
    let differ = theirs
        .iter()
        .zip(ours)
        .enumerate()
        .filter(|(_, (t, o))| t != o)
        .fold(0u64, |mask, (b, _)| mask | 1 << b);
    let (mut send_mask, mut zero_mask) = (0u64, 0u64);
    let mut raw = Vec::new();
    for (b0, b1) in runs(differ) {
        let start = block_range(len, b0).start;
        let end = block_range(len, b1 - 1).end;
        let at = raw.len();
        volume.read_append(&mut raw, offset + start as u64, end - start)?;
        // Zero blocks of the run become marks; the others move down over them.
        let mut kept = at;
        for b in b0..b1 {
            let r = block_range(len, b);
            let from = at + r.start - start;
            if is_zero(&raw[from..from + r.len()]) {
                zero_mask |= 1 << b;
                continue;
            }
            send_mask |= 1 << b;
            if from != kept {
                raw.copy_within(from..from + r.len(), kept);
            }
            kept += r.len();
        }
        raw.truncate(kept);
    }
    Ok(raw_frame(chunk, send_mask, zero_mask, raw, compress))
}

/// A raw DATA (or BLOCKS) frame of `raw`, the blocks of `send_mask` in order, and whether it is worth compressing
/// at `level` (see [`compressible`]).
pub(super) fn raw_frame(
    chunk: u64,
    send_mask: u64,
    zero_mask: u64,
    raw: Vec<u8>,
    level: Option<i32>,
) -> (DataFrame, bool) {
    let worth = !raw.is_empty() && level.is_some_and(|l| compressible(&raw, l));
    let frame = DataFrame {
        chunk,
        send_mask,
        zero_mask,
        encoding: Encoding::Raw,
        raw_len: raw.len() as u32,
        payload: Bytes::from(raw),
    };
    (frame, worth)
}

/// Compresses the payloads of `frames` marked worth it into lanes: the marked frames are dealt round-robin to
/// `encoders` (one lane each, numbered from `first_lane`, created at `level` on first use) and each lane compresses its frames in order, the
/// lanes in parallel. Frames keep their order; each lane's parts are in the order the destination must decode them.
pub fn compress_in_lanes(
    frames: &mut [(DataFrame, bool)],
    encoders: &mut [Option<Encoder>],
    first_lane: usize,
    level: i32,
) -> Result<()> {
    let lanes = encoders.len().max(1);
    let mut work: Vec<(usize, &mut Option<Encoder>, Vec<&mut DataFrame>)> = encoders
        .iter_mut()
        .enumerate()
        .map(|(l, e)| (l, e, Vec::new()))
        .collect();
    for (i, (frame, _)) in frames.iter_mut().filter(|(_, worth)| *worth).enumerate() {
        work[i % lanes].2.push(frame);
    }
    work.into_par_iter()
        .filter(|(_, _, f)| !f.is_empty())
        .try_for_each(|(lane, encoder, frames)| {
            let encoder = match encoder {
                Some(e) => e,
                None => encoder.insert(Encoder::new(level).map_err(Error::compression)?),
            };
            encoder.set_level(level).map_err(Error::compression)?;
            for frame in frames {
                let part = encoder
                    .compress(&frame.payload)
                    .map_err(Error::compression)?;
                frame.payload = Bytes::from(part);
                frame.encoding = Encoding::Lane((first_lane + lane) as u8);
            }
            Ok(())
        })
}

/// Bytes compressed as a probe before compressing a whole payload.
const PROBE: usize = 2 * BLOCK_SIZE as usize;

/// Whether compressing `raw` looks worthwhile: zstd spends as long on random data (encrypted or already compressed
/// guest files) as on text, only to have the result discarded, and a lane that takes it also fills its window with
/// it on both sides. First the order-0 entropy of its first block, estimated from every [`ENTROPY_STEP`]th byte:
/// above [`RANDOM_BITS`] per byte nothing but long repeats could compress it, and random data has none. Then, for a
/// payload of more than two probes, its first [`PROBE`] bytes are compressed: a probe that saves less than 1/32
/// sends the payload raw.
pub(super) fn compressible(raw: &[u8], level: i32) -> bool {
    if entropy_bits(&raw[..raw.len().min(BLOCK_SIZE as usize)], ENTROPY_STEP) > RANDOM_BITS {
        return false;
    }
    if raw.len() <= 2 * PROBE {
        return true;
    }
    let probe = &raw[..PROBE];
    compress(probe, level).is_ok_and(|z| z.len() < probe.len() - probe.len() / 32)
}

/// Bits per byte above which a block is taken for random (every third byte of 4096 random bytes measures about
/// 7.87, all of them about 7.95).
const RANDOM_BITS: f64 = 7.5;

/// The entropy test counts every third byte of a block: a third of the work (it is asked of every chunk a delta
/// sends, thousands of small ones: 6% of a change-list source's CPU counting every byte, `perf`, 2822 chunks),
/// with 1366 samples still far from the threshold for random data. An odd step sees every byte of a 2-, 4- or
/// 8-byte record in turn, so a block of small integers (random low bytes, zero high ones) is not mistaken for
/// random, as every fourth byte would be.
const ENTROPY_STEP: usize = 3;

/// The order-0 entropy in bits per byte of every `step`th byte of `bytes` (0 for an empty slice). The bytes are
/// counted in four tables (a run of equal bytes would otherwise wait on its own increments) and `c log2 c` comes
/// from a table: with one table and `log2` per value it was 8% of a change-list source's CPU.
fn entropy_bits(bytes: &[u8], step: usize) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [[0u32; 256]; 4];
    let mut n = 0usize;
    for (i, &b) in bytes.iter().step_by(step.max(1)).enumerate() {
        counts[i % 4][usize::from(b)] += 1;
        n = i + 1;
    }
    let sum: f64 = (0..256)
        .map(|v| c_log2_c(counts.iter().map(|t| t[v]).sum()))
        .sum();
    let n = n as f64;
    n.log2() - sum / n
}

/// `c log2 c` (0 for 0), from a table up to a block's count.
fn c_log2_c(c: u32) -> f64 {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..=BLOCK_SIZE).map(exact_c_log2_c).collect());
    table
        .get(c as usize)
        .copied()
        .unwrap_or_else(|| exact_c_log2_c(c))
}

fn exact_c_log2_c(c: u32) -> f64 {
    if c == 0 {
        0.0
    } else {
        f64::from(c) * f64::from(c).log2()
    }
}

/// zstd with one reusable context per thread: a fresh context per 64 KiB chunk costs as much as compressing it.
fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(raw),
            None => zstd::bulk::compress(raw, level),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::block_digests;
    use crate::error::Error;
    use rand::{RngCore, SeedableRng};

    fn volume_of(dir: &tempfile::TempDir, data: &[u8]) -> anyhow::Result<(Volume, Geometry)> {
        let p = dir.path().join("v.img");
        std::fs::write(&p, data)?;
        let g = Geometry::new(data.len() as u64, 65536).map_err(anyhow::Error::msg)?;
        Ok((Volume::open_source(&p)?, g))
    }

    #[test]
    fn random_chunks_travel_raw_and_text_chunks_compressed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![0u8; 2 * 65536];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data[..65536]);
        let words = b"the replica of a volume keeps every block of the snapshot ";
        for (i, b) in data[65536..].iter_mut().enumerate() {
            *b = words[i % words.len()];
        }
        let (volume, g) = volume_of(&dir, &data)?;

        let mut frames = vec![
            build_data(&volume, g, 0, None, None, Some(1))?,
            build_data(&volume, g, 1, None, None, Some(1))?,
            build_data(&volume, g, 1, None, None, None)?,
        ];
        assert_eq!(
            frames.iter().map(|(_, worth)| *worth).collect::<Vec<_>>(),
            [false, true, false],
            "the probe finds random data not worth compressing; without a level nothing is"
        );
        let mut lanes = vec![None, None];
        compress_in_lanes(&mut frames, &mut lanes, 0, 1)?;
        let (random, text) = (&frames[0].0, &frames[1].0);
        assert_eq!(random.encoding, Encoding::Raw);
        assert_eq!((random.send_mask, random.zero_mask), (0xffff, 0));
        assert_eq!(&random.payload[..], &data[..65536]);
        assert_eq!(text.encoding, Encoding::Lane(0));
        assert_eq!(text.raw_len, 65536);
        assert!(
            text.payload.len() < 65536 / 8,
            "{} bytes",
            text.payload.len()
        );
        let back = crate::zstream::Decoder::new()?
            .decompress(&text.payload, 65536)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(&back[..], &data[65536..]);
        assert_eq!(frames[2].0.encoding, Encoding::Raw);
        assert!(
            lanes[0].is_some() && lanes[1].is_none(),
            "a lane starts when first used"
        );
        Ok(())
    }

    #[test]
    fn a_random_block_is_not_worth_compressing_and_text_or_a_repeated_pattern_is() {
        let mut random = vec![0u8; 4096];
        rand_chacha::ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut random);
        let bits = entropy_bits(&random, 1);
        assert!((7.9..8.0).contains(&bits), "{bits}");
        let sampled = entropy_bits(&random, ENTROPY_STEP);
        assert!((7.8..8.0).contains(&sampled), "every third byte: {sampled}");
        assert!(!compressible(&random, 1), "one random block");
        let words = b"a block of a guest's text file, written again ";
        let text: Vec<u8> = (0..4096).map(|i| words[i % words.len()]).collect();
        assert!(compressible(&text, 1));
        let pattern: Vec<u8> = (0..4096).map(|i| random[i % 64]).collect();
        assert!(entropy_bits(&pattern, 1) <= 6.0);
        assert!(compressible(&pattern, 1), "64 random bytes repeated");
        // Small integers: random low bytes, zero high ones. Every fourth byte would see only the low bytes.
        let ints: Vec<u8> = (0..4096)
            .map(|i| if i % 4 == 0 { random[i] } else { 0 })
            .collect();
        assert!(
            entropy_bits(&ints, 4) > RANDOM_BITS,
            "the trap an even step falls in"
        );
        assert!(compressible(&ints, 1), "u32 values below 256");
        assert_eq!(entropy_bits(&[], 1), 0.0);
        assert_eq!(entropy_bits(&[7; 100], ENTROPY_STEP), 0.0);
        // Two values, equally often, in a length that is not a multiple of four: one bit.
        let halves: Vec<u8> = (0..4098).map(|i| (i % 2) as u8 * 200).collect();
        assert!((entropy_bits(&halves, 1) - 1.0).abs() < 1e-9);
        assert!((entropy_bits(&halves, ENTROPY_STEP) - 1.0).abs() < 0.01);
        // Longer than a block (counts past the table).
        assert!((entropy_bits(&[5u8; 3 * 4096 + 1], 1)).abs() < 1e-9);
    }

    #[test]
    fn lanes_take_the_frames_worth_compressing_in_turn_and_each_decodes_in_order(
    ) -> anyhow::Result<()> {
        let words =
            b"every block of the snapshot travels once, compressed against the ones before it ";
        let chunks = 6;
        let data: Vec<u8> = (0..chunks * 65536)
            .map(|i| words[(i * 7 / 5) % words.len()])
            .collect();
        let dir = tempfile::tempdir()?;
        let (volume, g) = volume_of(&dir, &data)?;
        let mut frames = (0..chunks as u64)
            .map(|c| build_data(&volume, g, c, None, None, Some(3)))
            .collect::<Result<Vec<_>>>()?;
        let mut lanes: Vec<Option<Encoder>> = vec![None, None];
        compress_in_lanes(&mut frames, &mut lanes, 0, 3)?;
        let encodings: Vec<Encoding> = frames.iter().map(|(d, _)| d.encoding).collect();
        use Encoding::Lane;
        assert_eq!(
            encodings,
            [Lane(0), Lane(1), Lane(0), Lane(1), Lane(0), Lane(1)]
        );
        let mut decoders = [
            crate::zstream::Decoder::new()?,
            crate::zstream::Decoder::new()?,
        ];
        for (c, (d, _)) in frames.iter().enumerate() {
            let Lane(n) = d.encoding else { unreachable!() };
            let raw = decoders[n as usize]
                .decompress(&d.payload, 65536)
                .map_err(anyhow::Error::msg)?;
            assert_eq!(raw, &data[c * 65536..][..65536]);
        }
        Ok(())
    }

    #[test]
    fn only_blocks_that_differ_from_the_target_travel_and_zero_blocks_as_a_mask(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![7u8; 65536];
        data[4096..8192].fill(0);
        data[40960] = 1;
        let (volume, g) = volume_of(&dir, &data)?;
        let mut theirs = block_digests(&data);
        theirs[1] = Digest::of(&[9u8; 4096]); // target block 1 is not zero: it must be zeroed
        theirs[10] = Digest::of(&[7u8; 4096]); // target block 10 differs: it must travel
        let (d, _) = build_data(&volume, g, 0, Some(&theirs), None, Some(1))?;
        assert_eq!(d.send_mask, 1 << 10);
        assert_eq!(d.zero_mask, 1 << 1);
        assert_eq!(d.raw_len, 4096);
        // From the scan's block digests the same answer, with only the differing blocks read.
        let scanned = block_digests(&data);
        let (from_scan, _) = build_data(&volume, g, 0, Some(&theirs), Some(&scanned), Some(1))?;
        assert_eq!(
            (from_scan.send_mask, from_scan.zero_mask, &from_scan.payload),
            (d.send_mask, d.zero_mask, &d.payload)
        );
        Ok(())
    }

    #[test]
    fn from_the_scans_block_digests_runs_of_differing_blocks_are_read_and_their_zero_blocks_marked(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // A short last chunk (3 blocks and 100 bytes) after a whole one.
        let mut data = vec![0u8; 65536 + 3 * 4096 + 100];
        rand_chacha::ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut data);
        data[2 * 4096..3 * 4096].fill(0);
        data[65536 + 4096..65536 + 2 * 4096].fill(0);
        let (volume, g) = volume_of(&dir, &data)?;
        for (chunk, differ, sent, zeros) in [
            (
                0u64,
                0b0111_1000_0000_0110u64,
                0b0111_1000_0000_0010u64,
                0b100u64,
            ),
            (1, 0b1111, 0b1101, 0b10),
            (0, 0, 0, 0),
        ] {
            let (offset, len) = g.chunk_range(chunk);
            let bytes = &data[offset as usize..][..len];
            let scanned = block_digests(bytes);
            let mut theirs = scanned.clone();
            for (b, t) in theirs.iter_mut().enumerate() {
                if differ & (1 << b) != 0 {
                    *t = Digest::of(&[b as u8]);
                }
            }
            let (d, _) = build_data(&volume, g, chunk, Some(&theirs), Some(&scanned), None)?;
            assert_eq!((d.send_mask, d.zero_mask), (sent, zeros), "chunk {chunk}");
            let expected: Vec<u8> = (0..crate::chunk::blocks_in(len))
                .filter(|b| sent & (1 << b) != 0)
                .flat_map(|b| bytes[block_range(len, b)].to_vec())
                .collect();
            assert_eq!(&d.payload[..], &expected[..], "chunk {chunk}");
            assert_eq!(d.raw_len as usize, expected.len());
        }
        Ok(())
    }

    #[test]
    fn a_chunk_that_changed_since_the_scan_is_found_by_reading_it_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![5u8; 4 * 65536];
        let (volume, g) = volume_of(&dir, &data)?;
        let scanned: Vec<(u64, Digest)> = (0..4)
            .map(|c| (c, Digest::of(&data[c as usize * 65536..][..65536])))
            .collect();
        assert_eq!(changed_chunk(&volume, g, &scanned)?, None);
        data[2 * 65536 + 100] = 6;
        let (volume, g) = volume_of(&dir, &data)?;
        assert_eq!(changed_chunk(&volume, g, &scanned)?, Some(2));
        assert_eq!(
            changed_chunk(&volume, g, &scanned[..2])?,
            None,
            "only the chunks asked about"
        );
        let err = Error::VolumeChanged { chunk: 2 };
        assert!(err.is_retryable());
        assert!(
            err.to_string().contains("(chunk 2): sync from a snapshot"),
            "{err}"
        );
        Ok(())
    }
}
