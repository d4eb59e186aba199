//! `blockmover bench` end to end: a small generated volume, the JSON report, and what it must say about it.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::common::bin;

fn bench(dir: &std::path::Path, mib: u64) -> Result<Value> {
    let out = Command::new(bin())
        .args(["bench", "--json", "--size-mib", &mib.to_string(), "--dir"])
        .arg(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "bench failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("bench --json printed no JSON")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn bench_reports_verified_syncs_the_change_on_the_wire_and_the_storage_rate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report = bench(dir.path(), 64)?;
    let syncs = report["syncs"].as_array().context("syncs")?;
    assert_eq!(syncs.len(), 2, "{syncs:?}");
    let (full, incr) = (&syncs[0], &syncs[1]);
    assert_eq!(
        (full["kind"].as_str(), incr["kind"].as_str()),
        (Some("full"), Some("incremental"))
    );
    for s in syncs {
        assert_eq!(s["tool"], "blockmover");
        assert_eq!(s["verified"], true, "{s}");
        assert_eq!(u(s, "volumeBytes"), 64 << 20);
        assert_eq!(u(s, "dataBytes"), u(s, "blocksSent") * 4096, "{s}");
        assert!(s["durationSecs"].as_f64().unwrap_or(0.0) > 0.0);
    }
    // The sample volume is a third zeros (holes): they do not travel on a full sync.
    let data = u(full, "dataBytes");
    assert!(
        data > (64 << 20) / 2 && data < (64 << 20) * 3 / 4,
        "full sync data {data}"
    );
    // 1% of 4 KiB blocks, random bytes: exactly the changed blocks travel, raw.
    assert_eq!(u(incr, "blocksSent"), u(incr, "changedBlocks"), "{incr}");
    assert_eq!(
        u(incr, "changedBlocks"),
        ((64 << 20) as f64 / 4096.0 / 100.0).round() as u64
    );
    assert!(u(incr, "wireSent") < u(incr, "dataBytes") * 2, "{incr}");
    assert!(
        u(incr, "wireSent") * 20 < u(full, "wireSent"),
        "{incr} vs {full}"
    );
    // The storage probe wrote as many bytes as the volume (64 MiB at least) where the target lives.
    let storage = &report["storage"];
    assert_eq!(u(storage, "bytes"), 64 << 20);
    assert!(
        storage["bytesPerSec"].as_f64().unwrap_or(0.0) > 0.0,
        "{storage}"
    );
    assert_eq!(storage["dir"].as_str(), dir.path().to_str());
    assert!(report["blake3Raw"]["bytesPerSec"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(
        !dir.path().join(".blockmover-bench-storage-probe").exists(),
        "the storage probe file is left behind"
    );

    // A second run in the same directory replaces the key of the first.
    let again = bench(dir.path(), 16)?;
    assert_eq!(again["syncs"][0]["verified"], true);
    Ok(())
}
