//! The seeded choices of the chaos suite: which fault, where in which stream, and how the volume changes.

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use blockmover::sample::{self, SampleSpec, BLOCK};

use super::agents::Site;
use super::VOLUME;
use crate::common::proxy::{Direction, Faults};

/// One fault on one try.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The connection is cut after `at` bytes in that direction.
    Cut(Direction, u64),
    /// Byte `at` is flipped in that direction (TLS must reject it).
    Flip(Direction, u64),
    /// The link hangs after `at` bytes, then dies.
    StallThenCut(Direction, u64),
    /// The link pauses after `at` bytes, then carries on: the sync must ride it out.
    Hiccup(Direction, u64),
    /// The link hangs after `at` bytes and stays hung (no FIN, no reset): only the agents' timeouts end the try.
    Partition(Direction, u64),
    /// `kill -9` of the source once `at` bytes passed in that direction.
    KillSource(Direction, u64),
    /// `kill -9` of the destination once `at` bytes passed in that direction.
    KillDestination(Direction, u64),
    /// SIGSTOP of the source once `at` bytes passed in that direction (a paused pod or VM), held until the
    /// destination has given up on it, then SIGCONT or SIGKILL.
    FreezeSource(Direction, u64, Thaw),
    /// SIGSTOP of the destination once `at` bytes passed in that direction, held until the source has given up on
    /// it, then SIGCONT or SIGKILL.
    FreezeDestination(Direction, u64, Thaw),
}

/// How a frozen agent's freeze ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thaw {
    /// SIGCONT: it wakes up to a peer that has moved on.
    Continue,
    /// SIGKILL while stopped: the pod is deleted.
    Kill,
}

impl Fault {
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Cut(..) => "cut",
            Fault::Flip(..) => "flip",
            Fault::StallThenCut(..) => "stall+cut",
            Fault::Hiccup(..) => "hiccup",
            Fault::Partition(..) => "partition",
            Fault::KillSource(..) => "kill-9-source",
            Fault::KillDestination(..) => "kill-9-destination",
            Fault::FreezeSource(..) => "sigstop-source",
            Fault::FreezeDestination(..) => "sigstop-destination",
        }
    }

    /// The proxy's faults for (up, down).
    pub fn faults(self) -> (Faults, Faults) {
        let (direction, f) = match self {
            Fault::Cut(d, at) => (d, Faults::none().cut_at(at)),
            Fault::Flip(d, at) => (d, Faults::none().flip_at(at)),
            Fault::StallThenCut(d, at) | Fault::Hiccup(d, at) | Fault::Partition(d, at) => {
                (d, Faults::none().stall_at(at))
            }
            Fault::KillSource(d, at)
            | Fault::KillDestination(d, at)
            | Fault::FreezeSource(d, at, _)
            | Fault::FreezeDestination(d, at, _) => (d, Faults::none().mark_at(at)),
        };
        match direction {
            Direction::Up => (f, Faults::none()),
            Direction::Down => (Faults::none(), f),
        }
    }

    /// A seeded fault at a seeded offset within the expected length of the stream in its direction.
    pub fn random(rng: &mut ChaCha8Rng, expected: Expected) -> Fault {
        let direction = Fault::direction(rng);
        let len = match direction {
            Direction::Up => expected.up,
            Direction::Down => expected.down,
        };
        let at = rng.random_range(0..((len as f64 * REACH) as u64).max(1));
        Fault::pick(rng, direction, at)
    }

    /// A seeded fault in the last bytes of a stream whose lengths are known (a sync with nothing to send): END,
    /// the destination's fsync and digest, COMMIT and the closing of TLS.
    pub fn near_end(rng: &mut ChaCha8Rng, ends: (u64, u64)) -> Fault {
        let direction = Fault::direction(rng);
        let len = match direction {
            Direction::Up => ends.0,
            Direction::Down => ends.1,
        };
        let at = len.saturating_sub(rng.random_range(1..=END_BYTES));
        Fault::pick(rng, direction, at)
    }

    pub fn direction(rng: &mut ChaCha8Rng) -> Direction {
        if rng.random_bool(0.7) {
            Direction::Up
        } else {
            Direction::Down
        }
    }

    pub fn pick(rng: &mut ChaCha8Rng, direction: Direction, at: u64) -> Fault {
        // A partition costs two timeouts and a freeze one (the frozen agent's peer must wait its idle timeout out):
        // they are drawn half as often as the others.
        let thaw = |rng: &mut ChaCha8Rng| match rng.random_bool(0.75) {
            true => Thaw::Continue,
            false => Thaw::Kill,
        };
        match rng.random_range(0..15) {
            0 | 1 => Fault::Cut(direction, at),
            2 | 3 => Fault::Flip(direction, at),
            4 | 5 => Fault::StallThenCut(direction, at),
            6 | 7 => Fault::Hiccup(direction, at),
            8 | 9 => Fault::KillSource(direction, at),
            10 | 11 => Fault::KillDestination(direction, at),
            12 => Fault::FreezeSource(direction, at, thaw(rng)),
            13 => Fault::FreezeDestination(direction, at, thaw(rng)),
            _ => Fault::Partition(direction, at),
        }
    }
}

/// How far before the end of a stream a fault aimed at the end of a session is placed, at most: END or COMMIT
/// and TLS's closing alert are about 100 bytes each way.
pub const END_BYTES: u64 = 200;

/// Rough lengths of the two streams of the next sync, to place fault offsets where bytes will flow.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub up: u64,
    pub down: u64,
}

/// Bytes each way of TLS set-up and the first frames, about.
pub const SETUP_BYTES: u64 = 1500;
/// Share of the uncompressed estimate that fault offsets are drawn from: zstd shrinks the text regions, and an
/// offset past the end of the stream never fires.
pub const REACH: f64 = 0.6;

impl Expected {
    /// From the blocks and chunks that differ between volume and target (before compression, so an upper bound).
    pub fn of(volume: &[u8], target: &[u8], chunk_size: u32) -> Expected {
        let chunk = chunk_size as usize;
        let (mut blocks, mut chunks) = (0u64, 0u64);
        for (v, t) in volume.chunks(chunk).zip(target.chunks(chunk)) {
            let differing = v
                .chunks(BLOCK as usize)
                .zip(t.chunks(BLOCK as usize))
                .filter(|(a, b)| a != b)
                .count() as u64;
            blocks += differing;
            chunks += u64::from(differing > 0);
        }
        let count = volume.len().div_ceil(chunk) as u64;
        let per_need = 32 * (chunk_size / 4096) as u64 + 40;
        Expected {
            up: SETUP_BYTES + count * 33 + chunks * 60 + blocks * BLOCK,
            down: SETUP_BYTES + chunks * per_need + count / 8,
        }
    }
}

/// How the volume (or the target) changes before an iteration's sync.
#[derive(Clone, Copy, Debug)]
pub enum Change {
    Unchanged,
    /// A share of 4 KiB blocks rewritten at scattered places.
    Scattered(f64),
    /// A share of blocks rewritten in runs of consecutive blocks.
    Clustered(f64, u64),
    /// A whole new volume (a full sync).
    NewVolume,
    /// Blocks of the target overwritten behind the mover's back.
    TargetTampered,
}

impl Change {
    pub fn random(rng: &mut ChaCha8Rng) -> Change {
        match rng.random_range(0..10) {
            0 | 1 => Change::Unchanged,
            2 | 3 => Change::Scattered([0.002, 0.01, 0.05][rng.random_range(0..3)]),
            4 | 5 => Change::Clustered([0.01, 0.05, 0.2][rng.random_range(0..3)], 16),
            6 | 7 => Change::NewVolume,
            _ => Change::TargetTampered,
        }
    }

    pub fn apply(self, site: &Site, seed: u64) -> Result<()> {
        match self {
            Change::Unchanged => {}
            Change::Scattered(rate) => {
                sample::scattered_change(&site.volume, VOLUME, rate, seed)?;
            }
            Change::Clustered(rate, run) => {
                sample::clustered_change(&site.volume, VOLUME, rate, run, seed)?;
            }
            Change::NewVolume => {
                sample::write_sample_volume(&site.volume, &SampleSpec::mixed(VOLUME, seed))?;
            }
            Change::TargetTampered => {
                sample::scattered_change(&site.target, VOLUME, 0.01, seed)?;
            }
        }
        Ok(())
    }
}
