//! `blockmover bench` end to end: a small generated volume, the JSON report, and what it must say about it.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::common::bin;

fn bench(dir: &std::path::Path, mib: u64) -> Result<Value> {
    bench_with(dir, mib, &[])
}

fn bench_with(dir: &std::path::Path, mib: u64, extra: &[&str]) -> Result<Value> {
    let out = Command::new(bin())
        .args(["bench", "--json", "--size-mib", &mib.to_string(), "--dir"])
        .arg(dir)
        .args(extra)
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

#[test]
fn bench_delta_rows_are_verified_deltas_and_the_change_list_reads_only_the_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report = bench_with(dir.path(), 32, &["--delta", "--change-percent", "0.1"])?;
    let syncs = report["syncs"].as_array().context("syncs")?;
    let shape: Vec<(&str, &str, &str)> = syncs
        .iter()
        .map(|s| {
            (
                s["tool"].as_str().unwrap_or("?"),
                s["kind"].as_str().unwrap_or("?"),
                s["syncKind"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("blockmover", "full", "full"),
            ("blockmover", "incremental", "full"),
            ("blockmover+manifest", "incremental", "delta-manifest"),
            ("blockmover+changelist", "incremental", "delta-changelist"),
        ],
        "{syncs:?}"
    );
    for s in syncs {
        assert_eq!(s["verified"], true, "{s}");
        assert_eq!(u(s, "volumeBytes"), 32 << 20);
    }
    let (stateless, manifest, list) = (&syncs[1], &syncs[2], &syncs[3]);
    // The same change from the same target state: every kind sends exactly the changed blocks.
    let changed = u(stateless, "changedBlocks");
    assert_eq!(
        changed,
        ((32 << 20) as f64 / 4096.0 / 1000.0).round() as u64
    );
    for s in [stateless, manifest, list] {
        assert_eq!(u(s, "changedBlocks"), changed, "{s}");
        assert_eq!(u(s, "blocksSent"), changed, "{s}");
    }
    // With the change list the source reads the changed chunks only (8 of 512); with manifests the destination
    // reads no more than the chunks it patches; stateless, both read every allocated byte.
    let read = |s: &Value, side: &str| u(s, side);
    assert!(
        read(list, "bytesReadSource") * 10 < read(stateless, "bytesReadSource"),
        "change list {list} vs stateless {stateless}"
    );
    assert!(
        read(list, "bytesReadSource") <= changed * (64 << 10),
        "change list read {list}"
    );
    for s in [manifest, list] {
        assert!(
            read(s, "bytesReadDestination") * 10 < read(stateless, "bytesReadDestination"),
            "{s} vs stateless {stateless}"
        );
    }
    assert!(
        read(manifest, "bytesReadSource") * 10 > read(stateless, "bytesReadSource") * 9,
        "with manifests the source still reads its whole volume: {manifest} vs {stateless}"
    );
    Ok(())
}

/// `--delta --cold`: after each change's runs the bench measures the storage's floor under its delta by change list
/// (the changed ranges read cold, then written and made durable), on its own files. Writing them again must leave
/// the next change's delta a delta (the target's mtime put back), and every sync still verifies.
#[test]
fn bench_cold_deltas_measure_the_storage_floor_of_each_change_list() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = [
        "--delta",
        "--cold",
        "--allocated",
        "--change-percent",
        "0.1,1",
    ];
    let report = bench_with(dir.path(), 32, &args)?;
    let syncs = report["syncs"].as_array().context("syncs")?;
    let lists: Vec<&Value> = syncs
        .iter()
        .filter(|s| s["tool"] == "blockmover+changelist")
        .collect();
    assert_eq!(lists.len(), 2, "{syncs:?}");
    for s in syncs {
        assert_eq!(s["verified"], true, "{s}");
    }
    let manifests = syncs.iter().filter(|s| s["syncKind"] == "delta-manifest");
    assert_eq!(
        manifests.count(),
        2,
        "the second change is a delta too: {syncs:?}"
    );
    let floors = report["changeFloors"].as_array().context("changeFloors")?;
    assert_eq!(floors.len(), 2, "{report}");
    for (floor, list) in floors.iter().zip(lists) {
        assert_eq!(
            u(floor, "bytes"),
            u(list, "changedBlocks") * 4096,
            "the floor moves the change's bytes: {floor} {list}"
        );
        assert!(u(floor, "ranges") >= 1 && u(floor, "ranges") <= u(list, "changedBlocks"));
        for key in ["readSecs", "writeSecs"] {
            let t = floor[key].as_f64().context("seconds")?;
            assert!(t > 0.0 && t < 60.0, "{key} {t}: {floor}");
        }
    }
    Ok(())
}

/// `--repeat 3`: each incremental row is one of three runs from the same target state (its median), every run is
/// a verified sync of the same change (the rollback between them put the target and the state back: otherwise the
/// second and third would send nothing, or not be deltas), and the JSON lists the three durations.
#[test]
fn bench_repeat_keeps_the_median_of_runs_of_the_same_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report = bench_with(
        dir.path(),
        16,
        &["--delta", "--change-percent", "1", "--repeat", "3"],
    )?;
    let syncs = report["syncs"].as_array().context("syncs")?;
    assert_eq!(syncs.len(), 4, "{syncs:?}");
    assert!(
        syncs[0].get("repeatSecs").is_none(),
        "the full sync runs once"
    );
    let changed = u(&syncs[1], "changedBlocks");
    assert!(changed > 0);
    for s in &syncs[1..] {
        assert_eq!(s["verified"], true, "{s}");
        assert_eq!(u(s, "blocksSent"), changed, "{s}");
        let runs: Vec<f64> = s["repeatSecs"]
            .as_array()
            .context("repeatSecs")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(runs.len(), 3, "{s}");
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(s["durationSecs"].as_f64(), Some(sorted[1]), "{s}");
    }
    Ok(())
}
