//! Happy-path syncs and their byte accounting, odd sizes, a too-small target, CLI basics.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use anyhow::Result;
use blockmover::sample::{self, SampleSpec, BLOCK};

use crate::common::{
    bin, expect_failed, expect_failure, expect_successful, external_u64, keygen, keygen_named,
    last_sync_time, nonzero_block_bytes, read_block, run_source, sparse_file, Destination, Fixture,
    AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 32 * MIB;
const SEED: u64 = 0x5eed_0001;

/// Full sync of a fresh fixture; returns it with both statuses checked.
fn fully_synced(size: u64, seed: u64) -> Result<Fixture> {
    let fx = Fixture::new(size, seed)?;
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.source_status, Kind::Source)?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(fx)
}

#[test]
fn full_sync_copies_mixed_sparse_volume_and_zero_regions_cost_nothing() -> Result<()> {
    let fx = fully_synced(VOLUME, SEED)?;
    let source = expect_successful(&fx.source_status, Kind::Source)?;
    let destination = expect_successful(&fx.destination_status, Kind::Destination)?;
    let nonzero = nonzero_block_bytes(&fx.volume, VOLUME)?;
    assert!(
        nonzero > VOLUME / 2 && nonzero < VOLUME,
        "fixture is mixed: {nonzero} non-zero bytes"
    );
    // Zero regions cost nothing: at most the non-zero bytes (raw, when compression is off) plus framing, TLS
    // and the digests (33 bytes per 64 KiB chunk) travel.
    let wire = external_u64(&source, "wireBytesSent")?;
    assert!(
        wire < nonzero + nonzero / 50,
        "full sync sent {wire} wire bytes for {nonzero} non-zero bytes"
    );
    for status in [&source, &destination] {
        assert_eq!(external_u64(status, "volumeSize")?, VOLUME);
        assert_eq!(external_u64(status, "chunkSize")?, 65536);
        assert_eq!(external_u64(status, "chunksTotal")?, VOLUME / 65536);
    }
    let sent = external_u64(&destination, "blocksSent")?;
    assert!(
        sent * BLOCK <= nonzero,
        "{sent} blocks carried as data, only {nonzero} non-zero bytes exist"
    );
    Ok(())
}

#[test]
fn compress_always_shrinks_a_full_sync_and_never_sends_payloads_raw() -> Result<()> {
    let mut sent = Vec::new();
    for mode in ["always", "never"] {
        let fx = Fixture::new(VOLUME, SEED + 50)?;
        fx.sync_with(&["--compress", mode])?.expect_success();
        fx.expect_target_matches_volume()?;
        let source = expect_successful(&fx.source_status, Kind::Source)?;
        let (data, compressed) = (
            external_u64(&source, "dataBytes")?,
            external_u64(&source, "compressedBytes")?,
        );
        assert_eq!(data, nonzero_block_bytes(&fx.volume, VOLUME)?);
        match mode {
            // The fixture is one third text: that third shrinks several times.
            "always" => assert!(compressed < data * 5 / 6, "{compressed} of {data}"),
            _ => assert_eq!(compressed, data, "--compress never compressed"),
        }
        sent.push(external_u64(&source, "wireBytesSent")?);
    }
    assert!(sent[0] < sent[1], "wire bytes always/never: {sent:?}");
    Ok(())
}

#[test]
fn incremental_sync_sends_only_changed_blocks() -> Result<()> {
    let fx = fully_synced(VOLUME, SEED)?;
    let first = last_sync_time(&expect_successful(
        &fx.destination_status,
        Kind::Destination,
    )?)?;

    let change = sample::scattered_change(&fx.volume, VOLUME, 0.01, SEED + 1)?;
    assert_eq!(change.blocks.len() as u64, (VOLUME / BLOCK).div_ceil(100)); // round(1% of 8192) = 82
    let mut differing = 0u64;
    for &block in &change.blocks {
        if read_block(&fx.volume, block)? != read_block(&fx.target, block)? {
            differing += 1;
        }
    }

    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    let source = expect_successful(&fx.source_status, Kind::Source)?;
    let destination = expect_successful(&fx.destination_status, Kind::Destination)?;
    assert_eq!(
        external_u64(&destination, "blocksSent")?,
        differing,
        "blocks carried = blocks that differ"
    );
    assert_eq!(external_u64(&destination, "dataBytes")?, differing * BLOCK);
    let wire = external_u64(&source, "wireBytesSent")?;
    let bound = differing * BLOCK + VOLUME / 100;
    assert!(
        wire < bound,
        "incremental sync sent {wire} wire bytes, bound {bound}"
    );
    let chunks = external_u64(&destination, "chunksChanged")?;
    assert!(
        chunks >= 1 && chunks <= differing,
        "{chunks} chunks changed for {differing} blocks"
    );
    let second = last_sync_time(&destination)?;
    assert!(
        second >= first,
        "lastSyncTime went back: {first:?} -> {second:?}"
    );
    Ok(())
}

#[test]
fn unchanged_resync_sends_no_data() -> Result<()> {
    let fx = fully_synced(VOLUME, SEED + 2)?;
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    for (path, kind) in [
        (&fx.source_status, Kind::Source),
        (&fx.destination_status, Kind::Destination),
    ] {
        let status = expect_successful(path, kind)?;
        for key in ["chunksSent", "blocksSent", "dataBytes"] {
            assert_eq!(
                external_u64(&status, key)?,
                0,
                "{kind:?} {key} on an unchanged resync"
            );
        }
    }
    Ok(())
}

#[test]
fn volume_size_not_a_multiple_of_block_or_chunk_syncs_exactly() -> Result<()> {
    let size = 5 * MIB + 1234;
    // No zero regions, so the partial tail block carries data.
    let spec = SampleSpec {
        size,
        zero_share: 0.0,
        text_share: 0.5,
        random_share: 0.5,
        seed: SEED + 3,
    };
    let fx = Fixture::with_spec(&spec, size)?;
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    assert_eq!(
        std::fs::metadata(&fx.target)?.len(),
        size,
        "target keeps its size"
    );
    for (path, kind) in [
        (&fx.source_status, Kind::Source),
        (&fx.destination_status, Kind::Destination),
    ] {
        let status = expect_successful(path, kind)?;
        assert_eq!(external_u64(&status, "volumeSize")?, size);
        assert_eq!(external_u64(&status, "chunksTotal")?, size.div_ceil(65536));
    }
    Ok(())
}

#[test]
fn target_smaller_than_volume_fails_both_sides_and_leaves_target_alone() -> Result<()> {
    let fx = Fixture::new(8 * MIB, SEED + 4)?;
    let target_size = 4 * MIB;
    sample::write_sample_volume(&fx.target, &SampleSpec::mixed(target_size, SEED + 5))?;
    let before = sample::file_digest(&fx.target, target_size)?;

    let run = fx.sync()?;
    let source_err = expect_failure("source", run.source.status, &run.source_stderr());
    let destination_err = expect_failure(
        "destination",
        run.destination.status,
        &run.destination.stderr,
    );
    assert!(
        source_err.contains("too small"),
        "source stderr:\n{source_err}"
    );
    assert!(
        destination_err.contains("too small"),
        "destination stderr:\n{destination_err}"
    );
    expect_failed(&fx.destination_status, Kind::Destination)?;
    assert_eq!(
        std::fs::metadata(&fx.target)?.len(),
        target_size,
        "target was resized"
    );
    assert_eq!(
        sample::file_digest(&fx.target, target_size)?,
        before,
        "target bytes changed"
    );
    Ok(())
}

#[test]
fn missing_volume_fails_source_with_exit_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let target = dir.path().join("target.img");
    sparse_file(&target, MIB)?;
    // A real destination, so the source fails on its volume and not on the network.
    let destination = Destination::spawn(&target, &psk, &dir.path().join("destination.json"), &[])?;
    let missing = dir.path().join("no-such-volume.img");
    let output = run_source(
        destination.addr,
        &missing,
        &psk,
        &dir.path().join("source.json"),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "source exit for a missing volume; stderr:\n{stderr}"
    );
    assert!(stderr.contains("error:"), "stderr:\n{stderr}");
    drop(destination); // killed if still waiting for a source
    Ok(())
}

/// A source that cannot reach its destination names the address it tried, and a retry may cure it (exit 75).
#[test]
fn connect_failure_names_the_address_and_is_retryable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let volume = dir.path().join("volume.img");
    sparse_file(&volume, MIB)?;
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let status = dir.path().join("source.json");
    let output = run_source(addr, &volume, &psk, &status)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "stderr:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("");
    assert!(
        line.contains(&format!("connect to {addr}")) && line.contains("Connection refused"),
        "{line}"
    );
    let failed = crate::common::expect_failed(&status, crate::schema::Kind::Source)?;
    assert!(failed.to_string().contains(&addr.to_string()), "{failed}");
    Ok(())
}

#[test]
fn keygen_writes_hex_key_readable_by_owner_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let first = keygen(dir.path())?;
    let second = keygen_named(dir.path(), "other.txt")?;
    let text = std::fs::read_to_string(&first)?;
    let hex = text
        .strip_prefix("volsync:")
        .and_then(|rest| rest.strip_suffix('\n'));
    let valid = hex.is_some_and(|h| {
        h.len() == 128
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    assert!(
        valid,
        "key file is not volsync:<128 lowercase hex>\\n: {text:?}"
    );
    let mode = std::fs::metadata(&first)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode {mode:o}");
    assert_ne!(
        text,
        std::fs::read_to_string(&second)?,
        "two keygens gave the same key"
    );
    Ok(())
}

#[test]
fn cli_without_subcommand_is_a_usage_error() -> Result<()> {
    let mut child = Command::new(bin())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let status = crate::common::wait_with_timeout(&mut child, AGENT_TIMEOUT)?;
    assert_eq!(status.code(), Some(2), "clap usage errors exit 2");
    Ok(())
}

#[test]
fn full_sync_with_a_small_window_keeps_open_needs_within_it() -> Result<()> {
    // A window of one scan segment: the destination must acknowledge only settled chunks, or the source's queue
    // of open NEEDs (sized by the window) overflows as soon as compression lags the scan.
    let fx = Fixture::new(24 * MIB, SEED + 40)?;
    let mut destination = Destination::spawn(
        &fx.target,
        &fx.psk,
        &fx.destination_status,
        &["--window", "64"],
    )?;
    let source = fx.source(destination.addr)?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        source.status.success() && finished.status.success(),
        "sync with window 64 failed:\n{}\n{}",
        String::from_utf8_lossy(&source.stderr),
        finished.stderr
    );
    fx.expect_target_matches_volume()?;
    let status = expect_successful(&fx.destination_status, Kind::Destination)?;
    assert!(
        external_u64(&status, "chunksSent")? > 64,
        "more NEEDs than the window: {status}"
    );
    Ok(())
}
