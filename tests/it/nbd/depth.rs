//! Reads in flight (issue 15, item 3): `source --read-depth N` keeps N reads on the wire. The export is the real
//! `nbdkit` (`file` plugin, parallel thread model) behind its `delay` filter, which holds every read request for
//! `rdelay` before answering: a sync of R reads takes at least R x rdelay at depth 1, and about R x rdelay / N at
//! depth N. The test asserts the bound a depth of 4 would just meet (so depth 1 never can), which depth 16 meets
//! by 4x even on a loaded machine (at depth 2, what this 2-core machine had before `--read-depth`, it fails: 5.8 s
//! against the 2.56 s bound). The NBD tests skip, printing why, without `nbdkit`; a file volume's default (one
//! read per core) and depths of 1 and 200 (several segments at once) are checked on plain files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::{CHUNK, MIB};
use crate::common::{bin, keygen, random_volume, sparse_file, wait_until};
use crate::delta::{sync_files, End};

/// The delay the export adds to every read request.
const RDELAY: Duration = Duration::from_millis(20);

/// Whether nbdkit is here; prints why not (the caller then returns: a skip).
fn nbdkit_present() -> bool {
    super::tools_present(&["nbdkit"], "nbdkit")
}

/// `nbdkit -f -r -U SOCKET --threads 64 --filter=delay file FILE rdelay=...`, killed on drop.
struct Delayed {
    child: Child,
    socket: PathBuf,
}

impl Delayed {
    fn serve(file: &Path, socket: &Path, rdelay: Duration) -> Result<Delayed> {
        let child = Command::new("nbdkit")
            .args(["-f", "-r", "--threads", "64", "-U"])
            .arg(socket)
            .args(["--filter=delay", "file"])
            .arg(file)
            .arg(format!("rdelay={}ms", rdelay.as_millis()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn nbdkit")?;
        let served = Delayed {
            child,
            socket: socket.to_owned(),
        };
        wait_until("nbdkit listening", Duration::from_secs(20), || {
            Ok(socket.exists())
        })?;
        Ok(served)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

impl Drop for Delayed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the source made on the export, from its `nbd export ...: N bytes read in M reads` line.
fn nbd_reads(log: &str) -> Result<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("bytes read in") && l.contains("nbd export"))
        .context("no `nbd export ...: N bytes read in M reads` line in the source's log")?;
    let after = line.split(" bytes read in ").nth(1).unwrap_or("");
    let n = after.split(' ').next().unwrap_or("");
    n.parse().with_context(|| format!("bad count in {line:?}"))
}

#[test]
fn sixteen_reads_in_flight_beat_a_quarter_of_the_serial_time_on_a_slow_export() -> Result<()> {
    if !nbdkit_present() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    let size = 16 * MIB; // 256 chunks
    random_volume(&p("volume.img"), size, 15)?;
    sparse_file(&p("target.img"), size)?;
    let psk = keygen(dir.path())?;
    let export = Delayed::serve(&p("volume.img"), &p("nbd.sock"), RDELAY)?;
    let uri = export.uri();

    let started = Instant::now();
    let outcome = sync_files(
        &psk,
        End {
            path: Path::new(&uri),
            status: &p("source-status.json"),
            flags: &["--read-depth", "16"],
        },
        End {
            path: &p("target.img"),
            status: &p("destination-status.json"),
            flags: &[],
        },
    )?;
    let took = started.elapsed();
    ensure!(
        blockmover::sample::file_digest(&p("target.img"), size)?
            == blockmover::sample::file_digest(&p("volume.img"), size)?,
        "the target differs from the volume"
    );
    assert_eq!(outcome.src("readDepth"), 16, "{}", outcome.describe());
    assert!(
        outcome.source_log.contains("read depth 16"),
        "{}",
        outcome.source_log
    );
    // The empty target needs every chunk: scanned once (four chunks a read), read again for its DATA.
    let reads = nbd_reads(&outcome.source_log)?;
    let chunks = size / CHUNK;
    assert!(
        reads >= chunks + chunks / blockmover::scan::RUN_CHUNKS,
        "{reads} reads"
    );
    let serial = RDELAY * reads as u32;
    assert!(
        took < serial / 4,
        "{reads} reads of {RDELAY:?} took {took:?}: not below a quarter of the serial {serial:?}"
    );
    println!("{reads} reads of {RDELAY:?} at depth 16: {took:?} (serial {serial:?})");
    Ok(())
}

#[test]
fn the_default_depth_of_an_nbd_export_is_sixteen() -> Result<()> {
    if !nbdkit_present() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    let size = MIB;
    random_volume(&p("volume.img"), size, 16)?;
    sparse_file(&p("target.img"), size)?;
    let psk = keygen(dir.path())?;
    let export = Delayed::serve(&p("volume.img"), &p("nbd.sock"), Duration::from_millis(1))?;
    let uri = export.uri();
    let outcome = sync_files(
        &psk,
        End {
            path: Path::new(&uri),
            status: &p("source-status.json"),
            flags: &[],
        },
        End {
            path: &p("target.img"),
            status: &p("destination-status.json"),
            flags: &[],
        },
    )?;
    assert_eq!(outcome.src("readDepth"), 16, "{}", outcome.describe());
    ensure!(
        blockmover::sample::file_digest(&p("target.img"), size)?
            == blockmover::sample::file_digest(&p("volume.img"), size)?,
        "the target differs from the volume"
    );
    Ok(())
}

#[test]
fn a_file_volume_reads_one_per_core_by_default_and_any_depth_gives_the_same_target() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let pair = crate::delta::Pair::new(4 * MIB + 12345, 17)?;
    let first = pair.sync(&[], &[])?;
    assert_eq!(first.src("readDepth"), cores, "{}", first.describe());
    // A deeper pool than a segment (several segments at once), on a delta and on a full comparison.
    crate::delta::scribble_chunks(&pair.fx.volume, &[3, 40, 62], 5)?;
    let delta = pair.sync(&["--read-depth", "200"], &[])?;
    assert_eq!(delta.src("readDepth"), 200, "{}", delta.describe());
    assert_eq!(delta.dst("chunksChanged"), 3, "{}", delta.describe());
    crate::delta::scribble_chunks(&pair.fx.volume, &[0, 63], 6)?;
    let full = pair.sync_flags(&["--read-depth", "1"], &[])?;
    pair.fx.expect_target_matches_volume()?;
    assert_eq!(full.src("readDepth"), 1, "{}", full.describe());
    assert_eq!(full.dst("chunksChanged"), 2, "{}", full.describe());
    // A delta by change list reads scattered blocks, but on a file its rounds are prefetched: one per core too, as
    // for a delta by manifest. The full comparison above ran without state: one with it first.
    pair.sync(&[], &[])?;
    let extents = crate::delta::scribble_chunks(&pair.fx.volume, &[7, 21], 7)?;
    let list = crate::delta::change_list(pair.fx.dir.path(), "depth.json", &extents)?;
    let listed = pair.sync(&["--changed-extents", &list], &[])?;
    listed.expect_delta("delta-changelist");
    assert_eq!(listed.src("readDepth"), cores, "{}", listed.describe());
    let manifest = pair.sync(&[], &[])?;
    manifest.expect_delta("delta-manifest");
    assert_eq!(manifest.src("readDepth"), cores, "{}", manifest.describe());
    Ok(())
}

#[test]
fn a_read_depth_of_0_or_257_is_a_usage_error() -> Result<()> {
    for depth in ["0", "257", "x"] {
        let out = Command::new(bin())
            .args([
                "source",
                "--connect",
                "127.0.0.1:9",
                "--volume",
                "/nonexistent",
                "--psk",
                "/nonexistent",
                "--read-depth",
                depth,
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--read-depth {depth}: {stderr}");
        assert!(stderr.contains("--read-depth"), "{stderr}");
    }
    Ok(())
}
