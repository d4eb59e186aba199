//! The zstd level of the compression lanes, chosen from where the sync waits (`--compress auto` without
//! `--zstd-level`), as `zstd --adapt` does.
//!
//! The servicer measures, per epoch, the wall time it spends compressing and the time it waits to hand frames to
//! the writer. Waiting on the writer means the link (or `--bwlimit`, or the peer) takes frames more slowly than
//! they are made: CPU is to spare, and a higher level sends fewer bytes for the same data, so the level goes up.
//! Compressing most of the time while never waiting means the compression is what the link waits for: the level
//! goes down. In between, it holds. One step per epoch, within [`MIN_LEVEL`]..=[`MAX_LEVEL`].
//!
//! A step up must pay: before it, a few payloads of the epoch (up to [`SAMPLES`]) are compressed alone at this
//! level and the next two (zstd's levels do not all improve on the one below: 4 often packs no smaller than 3), and
//! the level goes to the better of the two only if it packs them at least [`GAIN`] smaller (data that is
//! entropy-bound at level 1, such as random words, gains nothing from level 9 but costs five times the CPU).
//! Comparing the two levels on the same bytes matters: successive epochs read other parts of the volume, whose
//! ratios differ by more than a level does.

use std::time::Duration;

/// The lowest level: zstd's fastest.
pub const MIN_LEVEL: i32 = 1;
/// The highest level chosen: above it zstd costs several times more CPU for a few percent fewer bytes.
pub const MAX_LEVEL: i32 = 9;
/// How much smaller (as a share) a higher level must pack the samples for a step up. Small: on a link-bound sync
/// every byte saved is time saved, and the CPU the higher level costs is watched by the step down.
const GAIN: f64 = 0.005;
/// The most of an epoch that compressing at a higher level may be predicted to take.
const CPU_FIT: f64 = 0.6;
/// Payloads kept per epoch to try the next level on.
const SAMPLES: usize = 4;

/// The shortest epoch: shorter ones measure the scheduler more than the link.
const EPOCH: Duration = Duration::from_millis(100);
/// Share of an epoch spent waiting on the writer above which the link is the bottleneck.
const LINK_BOUND: f64 = 0.3;
/// Share of an epoch spent waiting on the writer below which the link is not waiting for anything.
const LINK_IDLE: f64 = 0.05;
/// Share of an epoch spent compressing above which compression is the bottleneck (with the link idle).
const CPU_BOUND: f64 = 0.5;

/// The level chooser of one session's lanes.
#[derive(Debug)]
pub struct Levels {
    level: i32,
    adapt: bool,
    compressing: Duration,
    waiting: Duration,
    elapsed: Duration,
    /// The highest level used in the session.
    highest: i32,
    /// Raw bytes of the lane payloads this epoch.
    raw: u64,
    /// Raw payloads of this epoch to try the next level on.
    samples: Vec<bytes::Bytes>,
}

impl Levels {
    /// A level that adapts from `start` (`adapt`), or stays at it.
    pub fn new(start: i32, adapt: bool) -> Self {
        let level = if adapt {
            start.clamp(MIN_LEVEL, MAX_LEVEL)
        } else {
            start
        };
        Levels {
            level,
            adapt,
            compressing: Duration::ZERO,
            waiting: Duration::ZERO,
            elapsed: Duration::ZERO,
            highest: level,
            raw: 0,
            samples: Vec::new(),
        }
    }

    /// The level to compress at now.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Whether the level adapts and stands above the lowest (which it only leaves while the link is the wait).
    pub fn raised(&self) -> bool {
        self.adapt && self.level > MIN_LEVEL
    }

    /// The highest level used so far.
    pub fn highest(&self) -> i32 {
        self.highest
    }

    /// Records one batch: `compressing` spent in the lanes, `waiting` on the writer, `elapsed` from the end of the
    /// previous batch to the end of this one (waiting for NEEDs included), the raw bytes that went through the
    /// lanes, and one of those payloads (`sample`, raw). Returns the level for the next batch.
    pub fn record(
        &mut self,
        compressing: Duration,
        waiting: Duration,
        elapsed: Duration,
        raw: u64,
        sample: Option<bytes::Bytes>,
    ) -> i32 {
        if !self.adapt {
            return self.level;
        }
        self.compressing += compressing;
        self.waiting += waiting;
        self.elapsed += elapsed;
        self.raw += raw;
        if let Some(s) = sample {
            if self.samples.len() == SAMPLES {
                self.samples.remove(0);
            }
            self.samples.push(s);
        }
        if self.elapsed < EPOCH {
            return self.level;
        }
        let secs = self.elapsed.as_secs_f64();
        let (wait, cpu) = (
            self.waiting.as_secs_f64() / secs,
            self.compressing.as_secs_f64() / secs,
        );
        let had_data = self.raw > 0;
        (self.compressing, self.waiting, self.elapsed, self.raw) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
        if !had_data {
            // Nothing went through the lanes (chunks sent raw while `adapt::Chooser` measures them): no evidence
            // for any level.
            return self.level;
        }
        let before = self.level;
        if wait > LINK_BOUND && self.level < MAX_LEVEL {
            if let Some(better) = self.better(cpu) {
                self.level = better;
            }
        } else if wait < LINK_IDLE && cpu > CPU_BOUND {
            self.level = (self.level - 1).max(MIN_LEVEL);
        }
        if self.level != before {
            tracing::debug!(
                "zstd level {before} -> {} (waited on the writer {:.0}%, compressed {:.0}% of {:.0} ms)",
                self.level,
                wait * 100.0,
                cpu * 100.0,
                secs * 1e3
            );
        }
        self.highest = self.highest.max(self.level);
        self.samples.clear();
        self.level
    }

    /// The better of the next two levels, if it packs the samples (each compressed alone) at least [`GAIN`]
    /// smaller than this one, and if its cost (timed on the same samples), scaled from `cpu`, the share of the epoch
    /// spent compressing now, still fits in [`CPU_FIT`] of the time: a level the cores cannot keep up with would
    /// turn a link-bound sync into a CPU-bound one.
    fn better(&self, cpu: f64) -> Option<i32> {
        let try_level = |level: i32| -> (usize, f64) {
            let start = std::time::Instant::now();
            let size = self
                .samples
                .iter()
                .map(|s| zstd::bulk::compress(s, level).map_or(s.len(), |z| z.len()))
                .sum();
            (size, start.elapsed().as_secs_f64())
        };
        let (now, cost) = try_level(self.level);
        let (level, (packed, dearer)) = (self.level + 1..=(self.level + 2).min(MAX_LEVEL))
            .map(|l| (l, try_level(l)))
            .min_by_key(|(_, (n, _))| *n)?;
        let pays = now > 0 && (packed as f64) <= now as f64 * (1.0 - GAIN);
        let fits = cpu * dearer / cost.max(1e-9) <= CPU_FIT;
        (pays && fits).then_some(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const MS: Duration = Duration::from_millis(1);

    /// Prose, as guest files hold it: higher levels pack it smaller.
    fn rich() -> Bytes {
        let readme = include_bytes!("../../README.md");
        Bytes::copy_from_slice(&readme[..readme.len().min(65536)])
    }

    #[test]
    fn waiting_on_the_link_raises_the_level_while_it_pays_and_busy_compression_lowers_it() {
        let mut l = Levels::new(1, true);
        let sample = rich();
        // 20 ms batches, 12 ms of them waiting for the writer: the link is the bottleneck.
        for _ in 0..5 * 20 {
            l.record(4 * MS, 12 * MS, 20 * MS, 65536, Some(sample.clone()));
        }
        let high = l.level();
        assert!(high >= 3, "level {high}");
        // Compressing 15 of every 20 ms, never waiting: compression is the bottleneck.
        for _ in 0..5 * 2 {
            l.record(
                15 * MS,
                Duration::ZERO,
                20 * MS,
                65536,
                Some(sample.clone()),
            );
        }
        assert_eq!(l.level(), high - 2);
        assert_eq!(l.highest(), high);
        // Neither: the level holds.
        for _ in 0..50 {
            l.record(5 * MS, 2 * MS, 20 * MS, 65536, Some(sample.clone()));
        }
        assert_eq!(l.level(), high - 2);
        for _ in 0..500 {
            l.record(19 * MS, Duration::ZERO, 20 * MS, 65536, None);
        }
        assert_eq!(l.level(), MIN_LEVEL);
    }

    #[test]
    fn a_level_that_packs_no_smaller_is_not_taken_however_slow_the_link() {
        let mut l = Levels::new(1, true);
        // Random bytes: no level packs them smaller.
        let mut noise = vec![0u8; 65536];
        let mut x = 9u64;
        for b in noise.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let noise = Bytes::from(noise);
        for _ in 0..100 {
            l.record(MS, 90 * MS, 100 * MS, 65536, Some(noise.clone()));
        }
        assert_eq!(l.level(), 1);
    }

    #[test]
    fn one_step_per_epoch_and_a_fixed_level_never_moves() {
        let mut l = Levels::new(1, true);
        let r = rich();
        assert_eq!(
            l.record(MS, 60 * MS, 60 * MS, 100, Some(r.clone())),
            1,
            "an epoch is at least 100 ms"
        );
        let up = l.record(MS, 60 * MS, 60 * MS, 100, Some(r.clone()));
        assert!(
            (2..=3).contains(&up),
            "one step of at most two levels: {up}"
        );
        for _ in 0..10 {
            l.record(Duration::ZERO, 90 * MS, 100 * MS, 0, None);
        }
        assert_eq!(l.level(), up, "epochs without lane data are no evidence");
        let mut fixed = Levels::new(3, false);
        for _ in 0..100 {
            fixed.record(Duration::ZERO, 90 * MS, 100 * MS, 1000, Some(r.clone()));
        }
        assert_eq!((fixed.level(), fixed.highest()), (3, 3));
        assert!(!fixed.raised(), "a fixed level says nothing about the link");
        assert!(l.raised());
        assert_eq!(
            Levels::new(15, true).level(),
            MAX_LEVEL,
            "an adaptive start within the range"
        );
    }
}
