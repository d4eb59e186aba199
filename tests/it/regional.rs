//! Regional links (issue 14): `source --bwlimit RATE` keeps the source's bytes on the wire under the limit, and
//! the status says which limit applied and what rate was achieved. Real agents over TLS on loopback. How close to
//! the limit a long sync gets is a measurement (`blockmover bench --bwlimit 50M`), not asserted here; what is
//! asserted cannot depend on the machine's load: the limit is never exceeded, so the sync cannot end sooner than
//! its bytes allow.

use std::time::Instant;

use anyhow::Result;

use crate::common::{error_line, expect_successful, external_u64, run_bin, Fixture, AGENT_TIMEOUT};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;

#[test]
fn bwlimit_bounds_the_wire_rate_and_the_status_reports_it() -> Result<()> {
    let fx = Fixture::random(12 * MIB, 0xb11_0001)?;
    let rate: u64 = 4 << 20;
    let started = Instant::now();
    let run = fx.sync_with(&["--bwlimit", "4M"])?;
    let elapsed = started.elapsed().as_secs_f64();
    run.ensure_success()?;
    fx.expect_target_matches_volume()?;
    let status = expect_successful(&fx.source_status, Kind::Source)?;
    let sent = external_u64(&status, "wireBytesSent")?;
    let achieved = external_u64(&status, "wireSendRate")?;
    println!("sent {sent} bytes in {elapsed:.2} s, wireSendRate {achieved}");
    assert_eq!(external_u64(&status, "bwlimit")?, rate);
    assert!(sent > 12 * MIB, "random data is sent whole: {sent}");
    assert!(
        achieved <= rate * 105 / 100,
        "achieved {achieved} B/s over a limit of {rate}"
    );
    // At most one burst (20 ms of the rate) leaves ahead of the rate.
    let burst = rate / 50;
    assert!(
        elapsed >= (sent - burst) as f64 / rate as f64,
        "{sent} bytes in {elapsed:.2} s is faster than {rate} B/s"
    );
    Ok(())
}

#[test]
fn a_bwlimit_below_64k_or_without_a_known_unit_is_a_usage_error() -> Result<()> {
    for (rate, why) in [
        ("10K", "at least 64K"),
        ("5X", "unknown unit"),
        ("fast", "not a rate"),
    ] {
        let out = run_bin(
            &[
                "source",
                "--connect",
                "127.0.0.1:9",
                "--volume",
                "/dev/null",
                "--psk",
                "/dev/null",
                "--bwlimit",
                rate,
            ],
            AGENT_TIMEOUT,
        )?;
        assert_eq!(out.status.code(), Some(2), "{rate}: {}", out.stderr);
        assert!(
            error_line(&out.stderr).contains(why),
            "{rate}: {}",
            out.stderr
        );
    }
    Ok(())
}
