//! `source --bwlimit RATE`: a token bucket on the bytes the source writes to its socket (TLS records and all, as
//! the link carries them), so that a replication does not starve the inter-site link.
//!
//! The bucket fills at `rate` bytes per second and holds at most [`Bucket::burst`] (20 ms of the rate, at least
//! 16 KiB): over any interval of `t` seconds at most `rate * t + burst` bytes leave, so over a sync of a few
//! seconds the average stays within a fraction of a percent of the limit. A write waits for tokens with a timer,
//! never spinning; it never writes more than the bucket holds.

use std::time::{Duration, Instant};

/// The smallest limit accepted: below it, one DATA frame would take longer than a phase timeout to leave.
pub const MIN_RATE: u64 = 64 * 1024;

/// The least a write waits for (a full TLS record), unless it asks for less.
const USEFUL: f64 = 16.0 * 1024.0;

/// A token bucket of bytes.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket for `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        let mut b = Bucket {
            rate: rate.max(1),
            tokens: 0.0,
            last: Instant::now(),
        };
        b.tokens = b.burst();
        b
    }

    /// The bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most the bucket holds.
    pub fn burst(&self) -> f64 {
        (self.rate as f64 / 50.0).max(16.0 * 1024.0)
    }

    /// How many of `want` bytes may be written now, or how long to wait before a useful amount may: a write waits
    /// until the bucket holds `want` or [`USEFUL`] bytes (whichever is less), so that a writer woken by a trickle
    /// of tokens does not send a few hundred bytes per system call (measured: 152k `sendto` calls and 9.8 s of
    /// system time for a 122 MiB sync at 12 MiB/s before this).
    pub fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst());
        let useful = (want.max(1) as f64).min(USEFUL).min(self.burst());
        if self.tokens >= useful {
            Ok(want.min(self.tokens as usize))
        } else {
            let wait = Duration::from_secs_f64((useful - self.tokens) / self.rate as f64);
            Err(wait.max(Duration::from_micros(1)))
        }
    }

    /// Records `n` bytes written.
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Parses a rate: bytes per second, with an optional suffix `K`/`M`/`G` (powers of 1024, as rsync's) or
/// `KB`/`MB`/`GB` (powers of 1000), e.g. `50M`, `1.5G`, `800KB`, `1048576`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 50M or 800KB"))?;
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KIB" => 1024.0,
        "M" | "MIB" => 1024.0 * 1024.0,
        "G" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (K, M, G, KB, MB, GB)"
            ))
        }
    };
    let rate = (value * scale).round();
    if !rate.is_finite() || rate < MIN_RATE as f64 || rate > u64::MAX as f64 {
        return Err(format!(
            "{text:?}: a limit must be at least {}K bytes per second",
            MIN_RATE / 1024
        ));
    }
    Ok(rate as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(3 << 29));
        assert_eq!(parse_rate("800KB"), Ok(800_000));
        assert_eq!(parse_rate("100mb"), Ok(100_000_000));
        assert_eq!(parse_rate("1048576"), Ok(1 << 20));
        assert!(parse_rate("10K")
            .expect_err("too low")
            .contains("at least 64K"));
        assert!(parse_rate("5X").expect_err("unit").contains("unknown unit"));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn a_writer_polled_often_gets_whole_records_not_a_trickle() {
        let rate = 12 << 20;
        let mut b = Bucket::new(rate);
        let start = Instant::now();
        let (mut now, mut writes, mut sent) = (start, 0u64, 0u64);
        // A writer that asks again 50 us after every write or wait, for one simulated second.
        while now < start + Duration::from_secs(1) {
            match b.take(64 << 10, now) {
                Ok(n) => {
                    assert!(n >= 16 << 10, "a write of {n} bytes");
                    b.spend(n);
                    (writes, sent) = (writes + 1, sent + n as u64);
                }
                Err(wait) => now += wait,
            }
            now += Duration::from_micros(50);
        }
        assert!(
            writes <= sent / (16 << 10),
            "{writes} writes for {sent} bytes"
        );
        assert!(
            sent >= rate - (64 << 10),
            "sent {sent} in a second at {rate}/s"
        );
        assert_eq!(
            b.take(100, now + Duration::from_secs(1)),
            Ok(100),
            "a small write waits only for itself"
        );
    }

    #[test]
    fn the_bucket_lets_through_the_rate_plus_one_burst_and_no_more() {
        let rate = 1 << 20;
        let mut b = Bucket::new(rate);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut now = start;
        // Simulated clock: writers ask for 64 KiB whenever allowed, for 10 simulated seconds.
        while now < start + Duration::from_secs(10) {
            match b.take(64 << 10, now) {
                Ok(n) => {
                    b.spend(n);
                    sent += n as u64;
                }
                Err(wait) => {
                    assert!(wait > Duration::ZERO && wait < Duration::from_millis(100));
                    now += wait;
                }
            }
        }
        let expect = 10 * rate;
        let burst = b.burst() as u64;
        assert!(
            sent <= expect + burst + (64 << 10) && sent >= expect - (64 << 10),
            "sent {sent}, expected about {expect}"
        );
    }
}
