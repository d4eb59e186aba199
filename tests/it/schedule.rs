//! A pod per volume without the VolSync controller: scheduled and manually triggered agents, their status
//! (`nextSyncTime`, `lastManualSync`, conditions), `blockmover status`, `/metrics` scraped over real HTTP and parsed
//! by an independent parser, and failback (roles swapped after the secondary changed).
//!
//! No test waits on wall time: schedules are `@yearly` (the only scheduled sync is the one at start) and further
//! syncs are requested with `blockmover trigger`. Waits poll an observable condition (a status field, a metric)
//! under a safety-net deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use blockmover::sample::{self, BLOCK};
use chrono::{Datelike, TimeZone, Utc};
use prometheus_parse::Scrape;
use serde_json::Value;

use crate::common::metrics::{metric, scrape_with_head};
use crate::common::{
    expect_failure, expect_successful, external_str, external_u64, read_block, read_status,
    run_bin, run_source, sigterm, wait_until, Destination, Finished, Fixture, ObservedSource,
    AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
const SEED: u64 = 0x5eed_0404;

/// Safety net for a condition to become true.
const WAIT: Duration = Duration::from_secs(120);

/// `GET /metrics` ([`crate::common::metrics::scrape`]), also asserting the Prometheus text format's content type.
fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let (head, scrape) = scrape_with_head(addr)?;
    anyhow::ensure!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(scrape)
}

/// The value of sample `name`; an error naming it when the scrape has none.
fn must(s: &Scrape, name: &str) -> Result<f64> {
    metric(s, name, None).with_context(|| format!("{name} missing from the scrape"))
}

fn syncs_succeeded(addr: SocketAddr) -> Result<f64> {
    Ok(metric(
        &scrape(addr)?,
        "blockmover_syncs_total",
        Some(("result", "Successful")),
    )
    .unwrap_or(0.0))
}

fn str_field<'a>(status: &'a Value, key: &str) -> Option<&'a str> {
    status.get(key).and_then(Value::as_str)
}

fn condition_reason(status: &Value) -> Option<&str> {
    status
        .pointer("/conditions/0/reason")
        .and_then(Value::as_str)
}

/// `blockmover ARGS...` to completion ([`run_bin`], safety net [`AGENT_TIMEOUT`]).
fn blockmover(args: &[&str]) -> Result<Finished> {
    run_bin(args, AGENT_TIMEOUT)
}

/// Jan 1 00:00:00 UTC of the year after `t`: `@yearly`'s next time.
fn next_new_year(t: &str) -> Result<String> {
    let t = chrono::DateTime::parse_from_rfc3339(t)?;
    let next = Utc
        .with_ymd_and_hms(t.year() + 1, 1, 1, 0, 0, 0)
        .single()
        .context("new year")?;
    Ok(blockmover::status::rfc3339(next))
}

fn blocks_differing(a: &Path, b: &Path, blocks: u64) -> Result<u64> {
    let mut n = 0;
    for i in 0..blocks {
        if read_block(a, i)? != read_block(b, i)? {
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn scheduled_agents_sync_at_start_then_on_manual_trigger_with_status_and_metrics() -> Result<()> {
    let size = 8 * MIB;
    let fx = Fixture::new(size, SEED)?;
    let labels = [
        "--schedule",
        "@yearly",
        "--name",
        "vm-disk",
        "--namespace",
        "ns1",
    ];
    let mut dargs = vec!["--serve", "--metrics-listen", "127.0.0.1:0"];
    dargs.extend(labels);
    let dst = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &dargs)?;
    let dmetrics = dst.metrics.context("destination printed no metrics line")?;
    let src = ObservedSource::spawn(dst.addr, &fx.volume, &fx.psk, &fx.source_status, &labels)?;

    // The first sync runs at start, whatever the schedule.
    wait_until("first scheduled sync", WAIT, || {
        Ok(syncs_succeeded(src.metrics)? >= 1.0 && syncs_succeeded(dmetrics)? >= 1.0)
    })?;
    fx.expect_target_matches_volume()?;
    let first = expect_successful(&fx.source_status, Kind::Source)?;
    let dfirst = expect_successful(&fx.destination_status, Kind::Destination)?;
    for status in [&first, &dfirst] {
        let last = str_field(status, "lastSyncTime").context("lastSyncTime")?;
        assert_eq!(
            str_field(status, "nextSyncTime"),
            Some(next_new_year(last)?.as_str()),
            "{status:#}"
        );
        assert_eq!(condition_reason(status), Some("WaitingForSchedule"));
        assert_eq!(status.get("lastManualSync"), None);
    }

    // Metrics equal the status figures, with VolSync's labels.
    let s = scrape(src.metrics)?;
    let sent = external_u64(&first, "wireBytesSent")?;
    assert!(sent > 0);
    assert_eq!(must(&s, "blockmover_wire_sent_bytes_total")?, sent as f64);
    assert_eq!(
        must(&s, "blockmover_wire_received_bytes_total")?,
        external_u64(&first, "wireBytesReceived")? as f64
    );
    assert_eq!(
        must(&s, "blockmover_chunks_sent_total")?,
        external_u64(&first, "chunksSent")? as f64
    );
    assert_eq!(must(&s, "blockmover_scanned_bytes_total")?, size as f64);
    assert_eq!(must(&s, "volsync_sync_duration_seconds_count")?, 1.0);
    assert_eq!(must(&s, "volsync_sync_duration_seconds")?, 3.0); // three quantiles
    assert_eq!(must(&s, "volsync_missed_intervals_total")?, 0.0);
    assert_eq!(must(&s, "volsync_volume_out_of_sync")?, 0.0);
    assert_eq!(must(&s, "blockmover_sync_in_progress")?, 0.0);
    assert!(must(&s, "blockmover_scan_rate_bytes_per_second")? > 0.0);
    let next = chrono::DateTime::parse_from_rfc3339(
        str_field(&first, "nextSyncTime").context("nextSyncTime")?,
    )?;
    assert_eq!(
        must(&s, "blockmover_next_sync_timestamp_seconds")?,
        next.timestamp() as f64
    );
    let missed = s
        .samples
        .iter()
        .find(|x| x.metric == "volsync_missed_intervals_total")
        .context("missed intervals")?;
    for (k, v) in [
        ("obj_name", "vm-disk"),
        ("obj_namespace", "ns1"),
        ("role", "source"),
        ("method", "blockmover"),
    ] {
        assert_eq!(missed.labels.get(k), Some(v), "{k}");
    }
    // The data age counts from the start of that sync: its duration, plus the time since it ended.
    let image = blockmover::status::parse_time(str_field(&first, "lastSyncTime"))
        .context("lastSyncTime")?;
    let age = must(&s, "blockmover_data_age_seconds")?;
    let since_end = (chrono::Utc::now() - image).num_milliseconds() as f64 / 1e3;
    assert!(
        age.is_finite() && age >= since_end - 1.0 && age <= since_end + 60.0,
        "data age {age} s, the sync ended {since_end} s ago"
    );
    let d = scrape(dmetrics)?;
    assert!(must(&d, "blockmover_data_age_seconds")?.is_finite());
    assert_eq!(
        must(&d, "blockmover_wire_received_bytes_total")?,
        external_u64(&dfirst, "wireBytesReceived")? as f64
    );
    assert_eq!(
        metric(
            &d,
            "volsync_volume_out_of_sync",
            Some(("role", "destination"))
        ),
        Some(0.0)
    );

    // A manual request to the running agent: only the change travels, lastManualSync records the token.
    let change = sample::scattered_change(&fx.volume, size, 0.01, SEED + 1)?;
    let trig = blockmover(&["trigger", &fx.source_status.to_string_lossy(), "manual-1"])?;
    assert!(trig.status.success(), "{trig:?}");
    assert_eq!(trig.stdout.trim(), "manual-1");
    wait_until("manual sync", WAIT, || {
        let st = read_status(&fx.source_status)?;
        Ok(str_field(&st, "lastManualSync") == Some("manual-1")
            && syncs_succeeded(src.metrics)? >= 2.0)
    })?;
    fx.expect_target_matches_volume()?;
    let second = expect_successful(&fx.source_status, Kind::Source)?;
    assert_eq!(condition_reason(&second), Some("WaitingForSchedule"));
    let blocks = external_u64(&second, "blocksSent")?;
    assert!(
        blocks > 0 && blocks <= change.blocks.len() as u64,
        "{blocks} blocks sent for {} changed",
        change.blocks.len()
    );
    let s = scrape(src.metrics)?;
    assert_eq!(must(&s, "volsync_sync_duration_seconds_count")?, 2.0);
    assert_eq!(
        must(&s, "blockmover_wire_sent_bytes_total")?,
        (sent + external_u64(&second, "wireBytesSent")?) as f64
    );

    // Requesting the synced token again, then a new one: one more sync, not two.
    blockmover(&["trigger", &fx.source_status.to_string_lossy(), "manual-1"])?;
    blockmover(&["trigger", &fx.source_status.to_string_lossy(), "manual-2"])?;
    wait_until("second manual sync", WAIT, || {
        let st = read_status(&fx.source_status)?;
        Ok(str_field(&st, "lastManualSync") == Some("manual-2")
            && syncs_succeeded(src.metrics)? >= 3.0)
    })?;
    assert_eq!(syncs_succeeded(src.metrics)?, 3.0);

    // `blockmover status` shows both, as a table and as the documents.
    let (sp, dp) = (
        fx.source_status.to_string_lossy().into_owned(),
        fx.destination_status.to_string_lossy().into_owned(),
    );
    let out = blockmover(&["status", &sp, &dp])?;
    assert!(out.status.success(), "{out:?}");
    let text = out.stdout;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for col in [
        "NAME",
        "LAST SYNC",
        "DURATION",
        "NEXT SYNC",
        "RESULT",
        "KIND",
        "CONDITION",
    ] {
        assert!(lines[0].contains(col), "{text}");
    }
    let kind = external_str(&read_status(&fx.source_status)?, "syncKind")?;
    assert!(
        ["full", "delta-manifest"].contains(&kind.as_str())
            && lines[1].contains(&format!("   {kind}   ")),
        "{text}"
    );
    let st = read_status(&fx.source_status)?;
    assert!(lines[1].starts_with("source "), "{text}");
    for field in ["lastSyncTime", "lastSyncDuration", "nextSyncTime"] {
        let v = str_field(&st, field).context("field")?;
        assert!(lines[1].contains(v), "{field} {v} not in {text}");
    }
    assert!(lines[1].contains("Successful") && lines[1].ends_with("WaitingForSchedule"));
    assert!(lines[2].starts_with("destination "), "{text}");
    let json = blockmover(&["status", "-o", "json", &sp])?;
    assert_eq!(serde_json::from_str::<Value>(&json.stdout)?, st);
    let yaml = blockmover(&["status", "-o", "yaml", &sp])?;
    assert_eq!(serde_yaml::from_str::<Value>(&yaml.stdout)?, st);

    // SIGTERM while waiting stops the agent cleanly.
    sigterm(src.running.id())?;
    let stopped = src.running.wait(AGENT_TIMEOUT)?;
    assert!(
        stopped.status.success(),
        "{}: {}",
        stopped.status,
        stopped.stderr
    );
    Ok(())
}

#[test]
fn manual_one_shot_records_last_manual_sync_and_is_not_repeated() -> Result<()> {
    let fx = Fixture::new(4 * MIB, SEED + 2)?;
    let mut dst = fx.destination()?;
    let (addr, vol, psk, st) = (
        dst.addr.to_string(),
        fx.volume.to_string_lossy().into_owned(),
        fx.psk.to_string_lossy().into_owned(),
        fx.source_status.to_string_lossy().into_owned(),
    );
    let args = |to: &str| {
        [
            "source",
            "--connect",
            to,
            "--volume",
            &vol,
            "--psk",
            &psk,
            "--status",
            &st,
            "--manual",
            "tok-7",
        ]
        .map(str::to_owned)
    };
    let a = args(&addr);
    let run = blockmover(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(run.status.success(), "{run:?}");
    assert!(dst.wait(AGENT_TIMEOUT)?.status.success());
    fx.expect_target_matches_volume()?;
    let status = expect_successful(&fx.source_status, Kind::Source)?;
    assert_eq!(str_field(&status, "lastManualSync"), Some("tok-7"));
    assert_eq!(condition_reason(&status), Some("WaitingForManual"));
    assert_eq!(status.get("nextSyncTime"), None);

    // The same token again: nothing to do, not even a connection (port 1 is closed), status untouched.
    let before = std::fs::read(&fx.source_status)?;
    let a = args("127.0.0.1:1");
    let again = blockmover(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(again.status.success(), "{again:?}");
    assert_eq!(std::fs::read(&fx.source_status)?, before);
    Ok(())
}

#[test]
fn invalid_schedules_fail_with_one_error_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = crate::common::keygen(dir.path())?;
    let psk = psk.to_string_lossy().into_owned();
    let src = |schedule: &str| {
        blockmover(&[
            "source",
            "--connect",
            "127.0.0.1:1",
            "--volume",
            "/nonexistent",
            "--psk",
            &psk,
            "--schedule",
            schedule,
        ])
    };
    for bad in ["*/5 * * *", "0 */5 * * * *", "@every 5m"] {
        let out = src(bad)?;
        let err = expect_failure("bad schedule", out.status, &out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("invalid schedule"), "{err}");
    }
    let out = blockmover(&[
        "destination",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "/nonexistent",
        "--psk",
        &psk,
        "--schedule",
        "@daily",
    ])?;
    let err = expect_failure("one-shot schedule", out.status, &out.stderr);
    assert!(err.contains("needs --serve"), "{err}");
    let out = blockmover(&[
        "source",
        "--connect",
        "127.0.0.1:1",
        "--volume",
        "/x",
        "--psk",
        &psk,
        "--schedule",
        "@daily",
        "--manual",
        "t",
    ])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    Ok(())
}

#[test]
fn failback_after_the_secondary_changed_sends_only_its_changes() -> Result<()> {
    // A (fx.volume) is the primary, B (fx.target) the secondary.
    let size = 16 * MIB;
    let fx = Fixture::new(size, SEED + 3)?;
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    let full = expect_successful(&fx.source_status, Kind::Source)?;

    // Failover: B becomes active and is written to.
    let change = sample::scattered_change(&fx.target, size, 0.02, SEED + 4)?;
    let differing = blocks_differing(&fx.volume, &fx.target, size / BLOCK)?;
    assert!(differing > 0 && differing <= change.blocks.len() as u64);

    // Failback: B is the source, A the destination.
    let a_status = fx.dir.path().join("a-destination-status.json");
    let b_status = fx.dir.path().join("b-source-status.json");
    let mut dst = Destination::spawn(&fx.volume, &fx.psk, &a_status, &[])?;
    let out = run_source(dst.addr, &fx.target, &fx.psk, &b_status)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dst.wait(AGENT_TIMEOUT)?.status.success());
    assert_eq!(
        sample::file_digest(&fx.volume, size)?,
        sample::file_digest(&fx.target, size)?,
        "A differs from B after failback"
    );

    let b = expect_successful(&b_status, Kind::Source)?;
    let a = expect_successful(&a_status, Kind::Destination)?;
    assert_eq!(external_u64(&a, "blocksSent")?, differing);
    let chunks = external_u64(&b, "chunksSent")?;
    assert!(
        chunks > 0 && chunks <= differing,
        "{chunks} chunks for {differing} blocks"
    );
    // Random data does not compress: the change itself, plus 32-byte digests per chunk and framing.
    let wire = external_u64(&b, "wireBytesSent")?;
    let digests = (size / 65536) * 32;
    assert!(
        wire <= differing * BLOCK * 11 / 10 + digests + 64 * 1024,
        "failback sent {wire} bytes for {differing} changed blocks"
    );
    assert!(
        wire * 5 < external_u64(&full, "wireBytesSent")?,
        "failback sent {wire} bytes, the full sync {}",
        external_u64(&full, "wireBytesSent")?
    );
    Ok(())
}

#[test]
fn sigterm_to_a_serving_destination_while_it_waits_exits_0_and_keeps_its_status() -> Result<()> {
    let fx = Fixture::new(4 * MIB, SEED + 9)?;
    let mut dst = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &["--serve"])?;
    let out = fx.source(dst.addr)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx.expect_target_matches_volume()?;
    // The session has ended when the status says so; the destination then waits for the next source.
    wait_until("destination status", WAIT, || {
        Ok(read_status(&fx.destination_status)?
            .get("lastSyncTime")
            .is_some())
    })?;
    let before = expect_successful(&fx.destination_status, Kind::Destination)?;
    sigterm(dst.child.id())?;
    let finished = dst.wait(AGENT_TIMEOUT)?;
    assert!(
        finished.status.success(),
        "{:?}: {}",
        finished.status,
        finished.stderr
    );
    assert!(
        finished
            .stderr
            .contains("stopped by a signal while waiting for a source"),
        "{}",
        finished.stderr
    );
    // Nothing was under way: the status still says the last sync succeeded, unchanged.
    assert_eq!(
        expect_successful(&fx.destination_status, Kind::Destination)?,
        before
    );
    Ok(())
}
