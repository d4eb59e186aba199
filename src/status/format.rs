//! The text forms the status document shares with Kubernetes and Go: `metav1.Time`, `time.Duration.String()`, and
//! byte-bounded truncation on char boundaries.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

/// Go's `time.Duration` is an `int64` of nanoseconds; longer durations saturate here, as Go's `Time.Sub` does.
const GO_DURATION_MAX_NANOS: u64 = 9_223_372_036_854_775_807;

/// Parses an RFC 3339 timestamp of the status document.
pub fn parse_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    text.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Formats `d` exactly as Go's `time.Duration.String()` does (saturating at Go's maximum of ~292 years).
pub fn go_duration(d: Duration) -> String {
    let nanos =
        u64::try_from(d.as_nanos()).map_or(GO_DURATION_MAX_NANOS, |n| n.min(GO_DURATION_MAX_NANOS));
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000_000 {
        // Below a second Go picks the largest unit that keeps the integer part non-zero.
        let (unit, prec) = match nanos {
            0..1_000 => ("ns", 0),
            1_000..1_000_000 => ("µs", 3),
            _ => ("ms", 6),
        };
        let (int, frac) = split_frac(nanos, prec);
        return format!("{int}{frac}{unit}");
    }
    let (secs, frac) = split_frac(nanos, 9);
    let mins = secs / 60;
    let hours = mins / 60;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if mins > 0 {
        out.push_str(&format!("{}m", mins % 60));
    }
    out.push_str(&format!("{}{frac}s", secs % 60));
    out
}

/// Parses what [`go_duration`] writes (Go's `time.Duration.String()`: `1h2m3.5s`, `250ms`, `0s`); `None` for
/// anything else.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0s" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, secs) = [
            ("h", 3600.0),
            ("ms", 1e-3),
            ("m", 60.0),
            ("s", 1.0),
            ("µs", 1e-6),
            ("ns", 1e-9),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))?;
        total += value * secs;
        rest = &rest[unit.len()..];
    }
    (total.is_finite() && !text.is_empty()).then(|| Duration::from_secs_f64(total))
}

/// Splits `v` into `v / 10^prec` and the fraction text `.ddd` without trailing zeros (empty when zero),
/// as Go's `fmtFrac`.
fn split_frac(v: u64, prec: u32) -> (u64, String) {
    let pow = 10u64.pow(prec);
    let (int, frac) = (v / pow, v % pow);
    if frac == 0 {
        return (int, String::new());
    }
    let digits = format!("{frac:0width$}", width = prec as usize);
    (int, format!(".{}", digits.trim_end_matches('0')))
}

/// Formats `t` as Kubernetes serialises `metav1.Time`: RFC 3339, whole seconds (truncated), `Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Keeps the last `max` bytes of `s`, starting on a char boundary (so possibly fewer bytes).
pub fn truncate_logs(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// Keeps the first `max` bytes of `s`, ending on a char boundary.
pub(super) fn truncate_start(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn go_duration_matches_go_duration_string() {
        let ns = Duration::from_nanos;
        let cases = [
            (ns(0), "0s"),
            (ns(1), "1ns"),
            (ns(42), "42ns"),
            (ns(999), "999ns"),
            (ns(1_000), "1µs"),
            (ns(1_001), "1.001µs"),
            (ns(500_000), "500µs"),
            (ns(999_999), "999.999µs"),
            (ns(1_000_000), "1ms"),
            (ns(1_500_000), "1.5ms"),
            (ns(999_999_999), "999.999999ms"),
            (ns(1_000_000_000), "1s"),
            (ns(1_000_000_001), "1.000000001s"),
            (ns(1_500_000_000), "1.5s"),
            (ns(24_089_891_610), "24.08989161s"),
            (ns(59_999_999_999), "59.999999999s"),
            (ns(60_000_000_000), "1m0s"),
            (ns(62_500_000_000), "1m2.5s"),
            (ns(3_599_999_999_999), "59m59.999999999s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (ns(7_384_000_000_005), "2h3m4.000000005s"),
            (Duration::from_secs(100 * 3600), "100h0m0s"),
            (ns(GO_DURATION_MAX_NANOS), "2562047h47m16.854775807s"),
            (Duration::MAX, "2562047h47m16.854775807s"),
        ];
        for (d, want) in cases {
            assert_eq!(go_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn rfc3339_truncates_to_whole_seconds_with_z() -> anyhow::Result<()> {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 24, 18, 31, 54)
            .single()
            .ok_or_else(|| anyhow::anyhow!("bad time"))?
            + chrono::Duration::nanoseconds(999_999_999);
        assert_eq!(rfc3339(t), "2026-11-24T18:31:54Z");
        Ok(())
    }

    #[test]
    fn truncate_logs_keeps_the_tail_on_a_char_boundary() {
        assert_eq!(truncate_logs("hello", 10), "hello");
        assert_eq!(truncate_logs("hello", 3), "llo");
        assert_eq!(truncate_logs("hello", 0), "");
        // "é" is two bytes: cutting inside it drops it whole.
        assert_eq!(truncate_logs("aé", 1), "");
        assert_eq!(truncate_logs("aéb", 2), "b");
        assert_eq!(truncate_logs("aéb", 3), "éb");
    }

    #[test]
    fn go_durations_parse_back_to_what_they_format() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_micros(1500),
            Duration::from_secs_f64(62.5),
            Duration::from_secs(3 * 3600 + 7),
            Duration::from_secs(49 * 3600 + 60),
        ] {
            let text = go_duration(d);
            let back = parse_go_duration(&text).unwrap_or(Duration::MAX);
            let err = back.as_secs_f64() - d.as_secs_f64();
            assert!(err.abs() < 1e-6, "{text}: {back:?} for {d:?}");
        }
        for bad in ["", "5", "h", "1x", "1h-2m", "1..5s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }
}
