//! Reproducible sample volumes and guest-like changes for the demo, tests and benchmarks.
//!
//! Everything here is a pure function of its seed: the same spec and seed give the same bytes on
//! every machine (ChaCha8 from `rand_chacha`, whose output is frozen across versions).
//! A volume is laid out in 1 MiB regions (the last one may be shorter); each region is zero,
//! English-like text (compressible) or random bytes (incompressible). Changes overwrite 4 KiB
//! blocks in place with fresh random bytes or fresh text ([`Content`]), so a changed block differs from its old
//! content.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Size of a block, the unit a change overwrites (4 KiB).
pub const BLOCK: u64 = 4096;

/// Size of a region, the unit that is assigned zero, text or random content (1 MiB).
pub const REGION: u64 = 1 << 20;

/// Words the text regions are made of: a small fixed vocabulary so text compresses well.
const VOCABULARY: &str = "the volume block chunk of and a to in is replication data source \
    destination digest snapshot cluster storage that for it with as was on be at by this from \
    write read changed every minute node disk copy sync status time while after before each only \
    when where";

/// How a sample volume is made: its size, the shares of region kinds and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSpec {
    /// Volume size in bytes (need not be a multiple of the block or region size).
    pub size: u64,
    /// Share of regions left zero (holes on files).
    pub zero_share: f64,
    /// Share of regions filled with compressible English-like text.
    pub text_share: f64,
    /// Share of regions filled with incompressible random bytes.
    pub random_share: f64,
    /// Seed for the layout and the contents.
    pub seed: u64,
}

impl SampleSpec {
    /// A volume with one third each of zero, text and random regions.
    pub fn mixed(size: u64, seed: u64) -> Self {
        Self {
            size,
            zero_share: 1.0 / 3.0,
            text_share: 1.0 / 3.0,
            random_share: 1.0 / 3.0,
            seed,
        }
    }
}

/// What a 1 MiB region of a sample volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// All zero bytes (a hole on a file).
    Zero,
    /// Compressible English-like text.
    Text,
    /// Incompressible random bytes.
    Random,
}

/// The kind of each 1 MiB region of the volume `spec` describes, in order.
///
/// Region counts follow the shares exactly up to rounding (largest remainder); their order is a
/// seeded shuffle. Fails with `InvalidInput` for negative, non-finite or all-zero shares.
pub fn region_layout(spec: &SampleSpec) -> io::Result<Vec<Region>> {
    let shares = [spec.zero_share, spec.text_share, spec.random_share];
    if shares.iter().any(|s| !s.is_finite() || *s < 0.0) || shares.iter().sum::<f64>() <= 0.0 {
        return Err(invalid(format!(
            "sample shares must be finite, >= 0 and not all zero: {shares:?}"
        )));
    }
    let regions =
        usize::try_from(spec.size.div_ceil(REGION)).map_err(|_| invalid("volume too large"))?;
    let counts = apportion(regions, shares);
    let mut layout = Vec::with_capacity(regions);
    for (kind, count) in [Region::Zero, Region::Text, Region::Random]
        .into_iter()
        .zip(counts)
    {
        layout.extend(std::iter::repeat_n(kind, count));
    }
    layout.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.seed));
    Ok(layout)
}

/// Create or overwrite `path` as a sample volume of `spec.size` bytes.
///
/// A regular file (or a new path) is truncated and grown sparse: zero regions stay holes and are
/// never written. A block device must hold at least `spec.size` bytes; all of its first
/// `spec.size` bytes are written, zero regions as zeros, and the device is synced.
pub fn write_sample_volume(path: &Path, spec: &SampleSpec) -> io::Result<()> {
    let layout = region_layout(spec)?;
    let device = is_block_device(path)?;
    let file = if device {
        let mut file = OpenOptions::new().write(true).open(path)?;
        let capacity = file.seek(SeekFrom::End(0))?;
        if capacity < spec.size {
            return Err(invalid(format!(
                "block device {} holds {capacity} bytes, sample needs {}",
                path.display(),
                spec.size
            )));
        }
        file
    } else {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(spec.size)?;
        file
    };
    let mut buf = vec![0u8; REGION as usize];
    for (index, kind) in (0u64..).zip(layout) {
        let offset = index * REGION;
        let len = REGION.min(spec.size - offset) as usize;
        let region = &mut buf[..len];
        let mut rng = region_rng(spec.seed, index);
        match kind {
            Region::Zero if !device => continue,
            Region::Zero => region.fill(0),
            Region::Text => fill_text(&mut rng, region),
            Region::Random => rng.fill_bytes(region),
        }
        file.write_all_at(region, offset)?;
    }
    if device {
        file.sync_all()?;
    }
    Ok(())
}

/// The 4 KiB blocks a change overwrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Sorted, distinct indices of the 4 KiB blocks written.
    pub blocks: Vec<u64>,
}

/// What the writes of a change put in the blocks they overwrite: each write (a 4 KiB block, or a run) is
/// English-like text with probability `text_share`, else random bytes (incompressible, as encrypted or already
/// compressed guest data is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Content {
    /// Share (0..=1) of the writes whose bytes are text.
    pub text_share: f64,
}

impl Content {
    /// Every write random (the content of [`scattered_change`] and [`clustered_change`]).
    pub const RANDOM: Content = Content { text_share: 0.0 };
}

/// Overwrite `round(rate * blocks)` distinct, scattered 4 KiB blocks of the first `size` bytes of
/// `path` with seeded random bytes, in place. Works on files and block devices.
///
/// `blocks` counts a trailing partial block; only its bytes below `size` are written.
pub fn scattered_change(path: &Path, size: u64, rate: f64, seed: u64) -> io::Result<Change> {
    scattered_change_of(path, size, rate, seed, Content::RANDOM)
}

/// [`scattered_change`] with the content of each write chosen by `content`.
pub fn scattered_change_of(
    path: &Path,
    size: u64,
    rate: f64,
    seed: u64,
    content: Content,
) -> io::Result<Change> {
    let total = block_count(size)?;
    let count = changed_count(total, rate)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut blocks: Vec<u64> = rand::seq::index::sample(&mut rng, total, count)
        .into_iter()
        .map(|b| b as u64)
        .collect();
    blocks.sort_unstable();
    let file = OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; BLOCK as usize];
    for &block in &blocks {
        write_blocks(&file, &mut rng, content, &mut buf, block, 1, size)?;
    }
    file.sync_data()?;
    Ok(Change { blocks })
}

/// Like [`scattered_change`], but the blocks come in runs of `run_blocks` consecutive blocks (the
/// last run may be shorter so that exactly `round(rate * blocks)` blocks are written), the way a
/// guest filesystem writes extents. Runs start at a seeded phase, so they are usually not aligned
/// to chunk boundaries.
pub fn clustered_change(
    path: &Path,
    size: u64,
    rate: f64,
    run_blocks: u64,
    seed: u64,
) -> io::Result<Change> {
    clustered_change_of(
        path,
        size,
        rate,
        (run_blocks, run_blocks),
        seed,
        Content::RANDOM,
    )
}

/// [`clustered_change`] with runs of `min..=max` blocks (uniformly drawn; runs are placed in slots of `max`
/// blocks) and the content of each run chosen by `content`.
pub fn clustered_change_of(
    path: &Path,
    size: u64,
    rate: f64,
    (min, max): (u64, u64),
    seed: u64,
    content: Content,
) -> io::Result<Change> {
    if min == 0 || max < min {
        return Err(invalid(format!(
            "runs must be at least 1 block and min <= max, got {min}..={max}"
        )));
    }
    let total = block_count(size)? as u64;
    let count = changed_count(total as usize, rate)? as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lengths = Vec::new();
    let mut left = count;
    while left > 0 {
        let len = if min == max {
            max
        } else {
            rng.random_range(min..=max)
        };
        lengths.push(len.min(left));
        left -= len.min(left);
    }
    let runs = lengths.len() as u64;
    // Slots of `max` blocks starting at a random phase; phase 0 when the phase leaves too few
    // slots; adjacent runs from block 0 when even that is not enough (count close to total).
    let mut phase = rng.random_range(0..max);
    if total.saturating_sub(phase) / max < runs {
        phase = 0;
    }
    let slots = total.saturating_sub(phase) / max;
    let mut starts: Vec<u64> = if slots < runs {
        // Packed: each run right after the previous one.
        lengths
            .iter()
            .scan(0, |at, len| {
                let start = *at;
                *at += len;
                Some(start)
            })
            .collect()
    } else {
        rand::seq::index::sample(&mut rng, slots as usize, runs as usize)
            .into_iter()
            .map(|slot| phase + slot as u64 * max)
            .collect()
    };
    starts.sort_unstable();
    let file = OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; (max * BLOCK) as usize];
    let mut blocks = Vec::with_capacity(count as usize);
    for (start, len) in starts.into_iter().zip(lengths) {
        write_blocks(&file, &mut rng, content, &mut buf, start, len, size)?;
        blocks.extend(start..start + len);
    }
    file.sync_data()?;
    Ok(Change { blocks })
}

/// BLAKE3 of the first `len` bytes of `path` (a file or block device); `UnexpectedEof` if shorter.
pub fn file_digest(path: &Path, len: u64) -> io::Result<blake3::Hash> {
    let mut file = File::open(path)?.take(len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; REGION as usize];
    let mut seen = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        seen += n as u64;
    }
    if seen < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} holds {seen} bytes, wanted {len}", path.display()),
        ));
    }
    Ok(hasher.finalize())
}

/// Split `total` items by `shares` (largest remainder), so the counts sum to `total`.
fn apportion(total: usize, shares: [f64; 3]) -> [usize; 3] {
    let sum: f64 = shares.iter().sum();
    let exact = shares.map(|s| s / sum * total as f64);
    let mut counts = exact.map(|e| e.floor() as usize);
    let mut order = [0, 1, 2];
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let assigned: usize = counts.iter().sum();
    for &i in order.iter().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// The content RNG of one region: the volume seed with the region as its stream, so regions are
/// independent of each other and of the layout shuffle.
fn region_rng(seed: u64, region: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(region + 1);
    rng
}

/// Fill `buf` with sentences of vocabulary words.
fn fill_text(rng: &mut impl Rng, buf: &mut [u8]) {
    let vocabulary: Vec<&str> = VOCABULARY.split_whitespace().collect();
    let mut at = 0;
    let mut words = 0;
    while at < buf.len() {
        let word = vocabulary[rng.random_range(0..vocabulary.len())].as_bytes();
        for (k, &byte) in word.iter().enumerate() {
            if at == buf.len() {
                return;
            }
            buf[at] = if words == 0 && k == 0 {
                byte.to_ascii_uppercase()
            } else {
                byte
            };
            at += 1;
        }
        words += 1;
        let separator: &[u8] = if words >= 6 && rng.random_ratio(1, 5) {
            words = 0;
            if rng.random_ratio(1, 4) {
                b".\n"
            } else {
                b". "
            }
        } else {
            b" "
        };
        for &byte in separator {
            if at == buf.len() {
                return;
            }
            buf[at] = byte;
            at += 1;
        }
    }
}

/// Overwrite `count` blocks from `first` with random bytes or, as `content` draws, text; clipped at `size`.
fn write_blocks(
    file: &File,
    rng: &mut ChaCha8Rng,
    content: Content,
    buf: &mut [u8],
    first: u64,
    count: u64,
    size: u64,
) -> io::Result<()> {
    let offset = first * BLOCK;
    let len = (count * BLOCK).min(size.saturating_sub(offset)) as usize;
    let bytes = &mut buf[..len];
    // No draw for all-random content: the same seed writes the same bytes as before text existed.
    if content.text_share > 0.0 && rng.random_bool(content.text_share.min(1.0)) {
        fill_text(rng, bytes);
    } else {
        rng.fill_bytes(bytes);
    }
    file.write_all_at(bytes, offset)
}

/// Number of 4 KiB blocks covering `size` bytes, counting a trailing partial block.
fn block_count(size: u64) -> io::Result<usize> {
    usize::try_from(size.div_ceil(BLOCK)).map_err(|_| invalid("volume too large"))
}

/// `round(rate * total)`, checked to lie within `0..=total`.
fn changed_count(total: usize, rate: f64) -> io::Result<usize> {
    if !(0.0..=1.0).contains(&rate) {
        return Err(invalid(format!(
            "change rate must lie in 0..=1, got {rate}"
        )));
    }
    Ok(((rate * total as f64).round() as usize).min(total))
}

fn is_block_device(path: &Path) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.file_type().is_block_device()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn spec(size: u64, [zero_share, text_share, random_share]: [f64; 3], seed: u64) -> SampleSpec {
        SampleSpec {
            size,
            zero_share,
            text_share,
            random_share,
            seed,
        }
    }

    /// Run `change` on a fresh mixed volume; return the change and the blocks whose bytes differ.
    fn observe(
        size: u64,
        change: impl Fn(&Path) -> io::Result<Change>,
    ) -> io::Result<(Change, Vec<u64>)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v");
        write_sample_volume(&path, &SampleSpec::mixed(size, 1))?;
        let before = std::fs::read(&path)?;
        let done = change(&path)?;
        let after = std::fs::read(&path)?;
        assert_eq!(
            after.len() as u64,
            size,
            "a change must not resize the volume"
        );
        let blocks = before
            .chunks(BLOCK as usize)
            .zip(after.chunks(BLOCK as usize));
        let differing = (0u64..)
            .zip(blocks)
            .filter(|(_, (b, a))| b != a)
            .map(|(i, _)| i)
            .collect();
        assert!(
            done.blocks.windows(2).all(|w| w[0] < w[1]),
            "sorted and distinct"
        );
        Ok((done, differing))
    }

    #[test]
    fn same_seed_gives_same_bytes_and_other_seed_differs() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let size = 4 * REGION + 3000;
        let [a, b, c] = ["a", "b", "c"].map(|name| dir.path().join(name));
        write_sample_volume(&a, &SampleSpec::mixed(size, 7))?;
        write_sample_volume(&b, &SampleSpec::mixed(size, 7))?;
        write_sample_volume(&c, &SampleSpec::mixed(size, 8))?;
        assert_eq!(std::fs::metadata(&a)?.len(), size);
        assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
        assert_ne!(file_digest(&a, size)?, file_digest(&c, size)?);
        // Overwriting a larger file leaves exactly the fresh sample.
        write_sample_volume(&c, &SampleSpec::mixed(2 * size, 9))?;
        write_sample_volume(&c, &SampleSpec::mixed(size, 7))?;
        assert_eq!(std::fs::read(&a)?, std::fs::read(&c)?);
        Ok(())
    }

    #[test]
    fn layout_respects_shares() -> io::Result<()> {
        let layout = region_layout(&spec(1000 * REGION, [0.5, 0.3, 0.2], 3))?;
        let count = |kind| layout.iter().filter(|&&r| r == kind).count();
        assert_eq!(
            [Region::Zero, Region::Text, Region::Random].map(count),
            [500, 300, 200]
        );
        let mixed = region_layout(&SampleSpec::mixed(32 * REGION + 1, 3))?;
        let zeros = mixed.iter().filter(|&&r| r == Region::Zero).count();
        assert!((10..=12).contains(&zeros), "{zeros} zero regions of 33");
        assert!(region_layout(&spec(REGION, [-1.0, 1.0, 1.0], 3)).is_err());
        assert!(region_layout(&spec(REGION, [0.0, 0.0, 0.0], 3)).is_err());
        Ok(())
    }

    #[test]
    fn regions_hold_what_the_layout_says() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v");
        let spec = SampleSpec::mixed(9 * REGION, 11);
        write_sample_volume(&path, &spec)?;
        let bytes = std::fs::read(&path)?;
        for (region, kind) in bytes.chunks(REGION as usize).zip(region_layout(&spec)?) {
            let ratio = zstd::bulk::compress(region, 3)?.len() as f64 / region.len() as f64;
            match kind {
                Region::Zero => assert!(region.iter().all(|&b| b == 0)),
                Region::Text => {
                    assert!(ratio < 0.5, "text compresses to {ratio}");
                    assert!(region
                        .iter()
                        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()));
                }
                Region::Random => assert!(ratio > 0.99, "random compresses to {ratio}"),
            }
        }
        Ok(())
    }

    #[test]
    fn mostly_zero_volume_file_is_sparse() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v");
        let size = 64 * REGION;
        write_sample_volume(&path, &spec(size, [0.9, 0.05, 0.05], 5))?;
        let meta = std::fs::metadata(&path)?;
        assert_eq!(meta.len(), size);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < size / 4,
            "{allocated} bytes allocated for a {size} byte volume"
        );
        Ok(())
    }

    #[test]
    fn scattered_change_writes_exactly_the_reported_blocks() -> io::Result<()> {
        let size = 8 * REGION + 100; // 2049 blocks, the last one partial
        let (change, differing) = observe(size, |path| scattered_change(path, size, 0.01, 9))?;
        assert_eq!(change.blocks.len(), 20); // round(0.01 * 2049)
        assert_eq!(differing, change.blocks);
        let (again, _) = observe(size, |path| scattered_change(path, size, 0.01, 9))?;
        assert_eq!(again, change, "same seed, same blocks");
        Ok(())
    }

    #[test]
    fn clustered_change_writes_runs_of_consecutive_blocks() -> io::Result<()> {
        let size = 16 * REGION; // 4096 blocks
        let (change, differing) = observe(size, |path| clustered_change(path, size, 0.05, 8, 4))?;
        assert_eq!(change.blocks.len(), 205); // round(0.05 * 4096)
        assert_eq!(differing, change.blocks);
        let runs = 1 + change
            .blocks
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .count();
        assert!(runs <= 205usize.div_ceil(8), "{runs} runs");
        let (all, differing) = observe(size, |path| clustered_change(path, size, 1.0, 8, 4))?;
        assert_eq!(all.blocks, (0..4096).collect::<Vec<u64>>());
        assert_eq!(differing, all.blocks);
        let (tiny, _) = observe(3 * BLOCK, |path| {
            clustered_change(path, 3 * BLOCK, 0.0, 8, 4)
        })?;
        assert!(tiny.blocks.is_empty());
        let (odd, differing) = observe(10 * BLOCK, |path| {
            clustered_change(path, 10 * BLOCK, 0.9, 8, 4)
        })?;
        assert_eq!((odd.blocks.len(), differing), (9, (0..9).collect()));
        Ok(())
    }

    #[test]
    fn a_change_of_text_and_random_writes_in_runs_of_varying_length() -> io::Result<()> {
        let size = 64 * REGION; // 16384 blocks
        let content = Content { text_share: 0.5 };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v");
        write_sample_volume(&path, &SampleSpec::mixed(size, 1))?;
        let change = clustered_change_of(&path, size, 0.05, (4, 64), 3, content)?;
        assert_eq!(change.blocks.len(), 819); // round(0.05 * 16384)
        let after = std::fs::read(&path)?;
        let is_text = |b: &u64| {
            let block = &after[(*b * BLOCK) as usize..][..BLOCK as usize];
            block
                .iter()
                .all(|c| c.is_ascii_alphabetic() || b" .\n".contains(c))
        };
        let text = change.blocks.iter().filter(|b| is_text(b)).count();
        assert!(
            (150..670).contains(&text),
            "{text} of 819 changed blocks hold text"
        );
        let mut runs = vec![1u64];
        for w in change.blocks.windows(2) {
            match runs.last_mut() {
                Some(r) if w[1] == w[0] + 1 => *r += 1,
                _ => runs.push(1),
            }
        }
        assert!(runs.len() >= 819 / 64, "{} runs", runs.len());
        assert!(
            runs.iter().any(|r| *r < 64) && runs.iter().any(|r| *r > 4),
            "{runs:?}"
        );
        let (scattered, differing) =
            observe(size, |p| scattered_change_of(p, size, 0.01, 5, content))?;
        assert_eq!(differing, scattered.blocks);
        let (random, _) = observe(size, |p| scattered_change(p, size, 0.01, 5))?;
        let (same, _) = observe(size, |p| {
            scattered_change_of(p, size, 0.01, 5, Content::RANDOM)
        })?;
        assert_eq!(random, same, "all-random content draws as before");
        Ok(())
    }

    #[test]
    fn file_digest_hashes_a_prefix_and_rejects_short_files() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v");
        write_sample_volume(&path, &SampleSpec::mixed(2 * REGION, 6))?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(file_digest(&path, 2 * REGION)?, blake3::hash(&bytes));
        assert_eq!(file_digest(&path, 5000)?, blake3::hash(&bytes[..5000]));
        let short = file_digest(&path, 2 * REGION + 1).map_err(|e| e.kind());
        assert_eq!(short.err(), Some(io::ErrorKind::UnexpectedEof));
        Ok(())
    }
}
