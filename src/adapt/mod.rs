//! Whether to compress whole chunks: chosen by measuring which way moves data faster, here and now.
//!
//! Compressing trades CPU for bytes on the wire. Which way wins depends on where the bottleneck is: on a link
//! slower than zstd, compressing moves more data per second; on a fast link, or when both agents share the cores
//! (loopback, a busy node), the CPU spent compressing is time lost. Guessing from the send queue alone does not
//! tell the two apart (a destination short of CPU fills the queue as a slow link does), so the source measures.
//!
//! [`Chooser`] runs epochs of a fixed number of frames in one mode. The first part of an epoch is not measured:
//! the send queue, the sockets and the destination's inbox still hold frames of the previous mode and pace this
//! one. Over the rest it measures the raw bytes answered per second of wall time. It measures both modes first,
//! then keeps the faster (compression must measure 20% faster to be chosen), and probes the other again after 8,
//! 16, 32, … epochs: the interval doubles while the choice holds and starts again at 8 when it flips, since what
//! the link and the data allow changes during a sync.

mod level;

pub use level::{Levels, MIN_LEVEL};

use std::time::Duration;

/// Frames at the start of an epoch that are not measured (what the pipeline holds of the previous mode: the
/// source's 64-frame send queue, socket buffers, the destination's 64-frame inbox).
pub const WARM_FRAMES: u64 = 384;
/// Frames measured in each epoch.
pub const MEASURED_FRAMES: u64 = 512;
/// The first probe of the other mode comes this many epochs after a choice.
const FIRST_PROBE: u32 = 8;
/// Compression is chosen only when it measured this much faster than raw: epochs are short (tens of
/// milliseconds on a fast link) and a shared machine is noisy, and when it is a close call raw costs less CPU.
const MARGIN: f64 = 1.2;
/// Share of an epoch spent waiting on the writer above which the link is what the sync waits for.
const LINK_BOUND: f64 = 0.5;
/// Probes never come further apart than this many epochs.
const LAST_PROBE: u32 = 64;

/// The compression decision for whole chunks, and the measurements behind it.
#[derive(Debug)]
pub struct Chooser {
    compress: bool,
    /// Raw bytes per second measured for (raw, compressed), latest epoch of each.
    rate: [Option<f64>; 2],
    /// Frames so far in this epoch.
    frames: u64,
    bytes: u64,
    elapsed: Duration,
    /// Epochs until the other mode is probed, and the interval after that.
    until_probe: u32,
    interval: u32,
    /// The mode chosen before a probe started (a probe returns to it unless the probe wins).
    chosen: bool,
    probing: bool,
    /// This epoch's time waiting on the writer, and its wall time.
    waited: Duration,
    wall: Duration,
    /// The lanes' level is above the lowest (see [`Chooser::record`]).
    raised: bool,
}

impl Default for Chooser {
    fn default() -> Self {
        Chooser::new()
    }
}

impl Chooser {
    /// Starts with compressed chunks and measures raw ones in the second epoch: on a slow link (what regional
    /// replication runs over) a first epoch of raw chunks sends up to 56 MiB uncompressed; on a fast one, a first
    /// epoch compressed costs only some CPU.
    pub fn new() -> Self {
        Chooser {
            compress: true,
            rate: [None, None],
            frames: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            until_probe: 0,
            interval: FIRST_PROBE,
            chosen: true,
            probing: false,
            waited: Duration::ZERO,
            wall: Duration::ZERO,
            raised: false,
        }
    }

    /// Whether whole chunks are compressed now.
    pub fn compress(&self) -> bool {
        self.compress
    }

    /// The latest measured rates in raw bytes per second: (raw, compressed).
    pub fn rates(&self) -> (Option<f64>, Option<f64>) {
        (self.rate[0], self.rate[1])
    }

    /// Records `frames` frames holding `raw_bytes` of data, answered in `elapsed` in the current mode, of which
    /// `waited` handing them to the writer. `raised`: the compression level is above the lowest, which it only
    /// reached waiting on the link: raw chunks cannot be faster while it has room to come down.
    pub fn record(
        &mut self,
        frames: u64,
        raw_bytes: u64,
        elapsed: Duration,
        waited: Duration,
        raised: bool,
    ) {
        self.raised = raised;
        self.waited += waited;
        self.wall += elapsed;
        let before = self.frames;
        self.frames += frames;
        if self.frames > WARM_FRAMES {
            // Only the part of this batch past the warm-up counts.
            let counted = self.frames - before.max(WARM_FRAMES);
            let share = counted as f64 / frames.max(1) as f64;
            self.bytes += (raw_bytes as f64 * share) as u64;
            self.elapsed += elapsed.mul_f64(share);
        }
        if self.frames >= WARM_FRAMES + MEASURED_FRAMES {
            self.end_epoch();
        }
    }

    fn end_epoch(&mut self) {
        let link_bound =
            self.raised || self.waited.as_secs_f64() > LINK_BOUND * self.wall.as_secs_f64();
        (self.waited, self.wall) = (Duration::ZERO, Duration::ZERO);
        if self.compress && link_bound {
            // Compressed chunks already wait for the link: raw ones, more bytes over the same link, cannot be
            // faster, and probing them would send a whole epoch (56 MiB) uncompressed. Stay, and probe later.
            (self.frames, self.bytes, self.elapsed) = (0, 0, Duration::ZERO);
            self.choose(true);
            return;
        }
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        self.rate[usize::from(self.compress)] = Some(self.bytes as f64 / secs);
        (self.frames, self.bytes, self.elapsed) = (0, 0, Duration::ZERO);
        let [Some(raw), Some(zstd)] = self.rate else {
            // The other mode has not been measured yet: measure it now.
            self.compress = !self.compress;
            return;
        };
        let best = zstd > raw * MARGIN;
        if self.probing || self.until_probe == 0 {
            // The end of a probe (or of the first measurement of both modes). A probe that confirms the choice
            // doubles the interval; one that wins starts it again.
            if self.probing {
                self.interval = if best == self.chosen {
                    (self.interval * 2).min(LAST_PROBE)
                } else {
                    FIRST_PROBE
                };
            }
            self.probing = false;
            self.choose(best);
            return;
        }
        if best != self.compress {
            // The current mode became slower than the other was when last measured.
            self.interval = FIRST_PROBE;
            self.choose(best);
            return;
        }
        self.until_probe -= 1;
        if self.until_probe == 0 {
            self.probing = true;
            self.chosen = self.compress;
            self.compress = !self.compress;
        }
    }

    fn choose(&mut self, compress: bool) {
        self.compress = compress;
        self.chosen = compress;
        self.until_probe = self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds whole epochs where raw and compressed data move at the given rates (MiB per second);
    /// returns the mode of each epoch.
    fn run(chooser: &mut Chooser, epochs: usize, raw: f64, zstd: f64) -> Vec<bool> {
        let frame = 65536u64;
        (0..epochs)
            .map(|_| {
                let mode = chooser.compress();
                let rate = if mode { zstd } else { raw } * 1048576.0;
                for _ in 0..(WARM_FRAMES + MEASURED_FRAMES) / 32 {
                    let elapsed = Duration::from_secs_f64(32.0 * frame as f64 / rate);
                    chooser.record(32, 32 * frame, elapsed, Duration::ZERO, false);
                }
                mode
            })
            .collect()
    }

    #[test]
    fn measures_both_then_keeps_the_faster_with_rare_probes() {
        // Fast link, CPU-bound: raw wins.
        let mut c = Chooser::new();
        let modes = run(&mut c, 40, 900.0, 500.0);
        assert_eq!(
            &modes[..2],
            &[true, false],
            "zstd first, then a probe of raw"
        );
        let compressed = modes.iter().filter(|m| **m).count();
        assert!(
            (2..=5).contains(&compressed),
            "compressed epochs: {compressed} of 40: {modes:?}"
        );
        assert!(!c.compress());
        let (raw, z) = c.rates();
        assert!(
            (raw.unwrap_or(0.0) / 1048576.0 - 900.0).abs() < 1.0,
            "{raw:?}"
        );
        assert!((z.unwrap_or(0.0) / 1048576.0 - 500.0).abs() < 1.0, "{z:?}");

        // Slow link: compression wins and is kept.
        let mut c = Chooser::new();
        let modes = run(&mut c, 40, 100.0, 250.0);
        let raw_epochs = modes.iter().filter(|m| !**m).count();
        assert!(
            (1..=4).contains(&raw_epochs),
            "raw epochs: {raw_epochs}: {modes:?}"
        );
        assert!(c.compress());
    }

    #[test]
    fn a_change_of_bottleneck_flips_the_choice() {
        let mut c = Chooser::new();
        run(&mut c, 20, 900.0, 500.0);
        assert!(!c.compress());
        // The link slows down: raw now measures below what compression did, so compression takes over at once,
        // and raw is only probed now and then.
        let modes = run(&mut c, 70, 100.0, 250.0);
        assert!(modes[1] && c.compress(), "{modes:?}");
        let raw_epochs = modes.iter().filter(|m| !**m).count();
        assert!(raw_epochs <= 5, "raw epochs: {raw_epochs}: {modes:?}");
    }

    #[test]
    fn compressed_chunks_waiting_on_the_link_are_never_probed_raw() {
        let mut c = Chooser::new();
        for _ in 0..20 * (WARM_FRAMES + MEASURED_FRAMES) / 32 {
            assert!(c.compress(), "a raw probe on a link-bound sync");
            c.record(
                32,
                32 * 65536,
                Duration::from_millis(100),
                Duration::from_millis(70),
                false,
            );
        }
        assert_eq!(c.rates(), (None, None), "nothing to measure against");
    }

    #[test]
    fn a_close_call_stays_raw() {
        let mut c = Chooser::new();
        let modes = run(&mut c, 30, 500.0, 550.0);
        assert!(!c.compress());
        let compressed = modes.iter().filter(|m| **m).count();
        assert!(
            compressed <= 3,
            "compressed epochs: {compressed}: {modes:?}"
        );
    }

    #[test]
    fn the_warm_up_of_an_epoch_is_not_measured() {
        let mut c = Chooser::new();
        // Warm-up frames are slow (the queue still holds another mode's frames), measured ones are fast.
        c.record(
            WARM_FRAMES,
            WARM_FRAMES * 65536,
            Duration::from_secs(100),
            Duration::ZERO,
            false,
        );
        c.record(
            MEASURED_FRAMES,
            MEASURED_FRAMES * 65536,
            Duration::from_secs(1),
            Duration::ZERO,
            false,
        );
        let (_, zstd) = c.rates();
        assert_eq!(zstd, Some((MEASURED_FRAMES * 65536) as f64));
        // A batch that straddles the warm-up boundary counts only its measured share.
        let mut c = Chooser::new();
        c.record(
            WARM_FRAMES - 16,
            0,
            Duration::from_secs(100),
            Duration::ZERO,
            false,
        );
        c.record(
            32,
            32 * 65536,
            Duration::from_secs(2),
            Duration::ZERO,
            false,
        );
        c.record(
            MEASURED_FRAMES - 16,
            (MEASURED_FRAMES - 16) * 65536,
            Duration::from_secs(1),
            Duration::ZERO,
            false,
        );
        let (_, zstd) = c.rates();
        let expected = (MEASURED_FRAMES * 65536) as f64 / 2.0;
        assert!((zstd.unwrap_or(0.0) - expected).abs() < 2.0, "{zstd:?}");
    }
}
