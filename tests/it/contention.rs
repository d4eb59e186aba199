//! Contention and change under a sync: two sources with one key on one destination, a source superseded by its
//! own retry, a volume that changes between its scan and its DATA reads, and a target written or truncated by
//! someone else during a sync (caught by `destination --read-back`). Issue 10, findings 7, 8 and 1.
//!
//! Real release binaries as separate processes on loopback with real TLS; the proxy's stalls hold a sync still at a
//! known point, and the tests poll status files, the target's bytes or the source's `/metrics`, never the clock.

mod observe;
mod turns;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use blockmover::sample::{self, SampleSpec};

use crate::common::proxy::{Direction, Faults, Proxy};
use crate::common::{
    error_line, expect_failed, expect_successful, external_u64, keygen, last_sync_time,
    random_spec, read_status, result_of, run_source_with, sparse_file, spawn_source_with,
    wait_until, Destination, Finished, Fixture, ObservedSource, Running, AGENT_TIMEOUT,
};
use crate::schema::Kind;
use observe::{bytes_through_hello, wait_scanned};
use turns::{contest, Contender, BUSY, MAX_TRIES};

const MIB: u64 = 1 << 20;
/// The source's default chunk size.
const CHUNK: u64 = 65536;
/// Exit code of a failure a retry may cure.
const RETRYABLE: i32 = 75;

/// A volume of `size` bytes, a quarter zeros and the rest random (zstd cannot shrink it, so the bytes on the wire
/// track the data and a stall at a byte offset lands where the test means it to).
fn quarter_zeros_spec(size: u64, seed: u64) -> SampleSpec {
    SampleSpec {
        zero_share: 0.25,
        random_share: 0.75,
        ..random_spec(size, seed)
    }
}

/// One target served by one `--serve` destination, and the key its sources share.
struct Arena {
    dir: tempfile::TempDir,
    psk: PathBuf,
    target: PathBuf,
    destination_status: PathBuf,
}

impl Arena {
    fn new(size: u64) -> Result<Arena> {
        let dir = tempfile::tempdir()?;
        let psk = keygen(dir.path())?;
        let target = dir.path().join("target.img");
        sparse_file(&target, size)?;
        Ok(Arena {
            psk,
            target,
            destination_status: dir.path().join("destination-status.json"),
            dir,
        })
    }

    /// A seeded volume at `relative` (directories made as needed).
    fn volume(&self, relative: &str, size: u64, seed: u64) -> Result<PathBuf> {
        let path = self.dir.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        sample::write_sample_volume(&path, &quarter_zeros_spec(size, seed))?;
        Ok(path)
    }
}

/// Both sources start at once against one `--serve` destination, each through its own proxy that stalls its
/// stream a quarter into the volume (held until a try of the other source has ended, so some try surely meets a
/// sync under way), and retry like `client.sh`.
fn two_sources_take_turns(
    volumes: [(&'static str, &str); 2],
    flags: [Vec<&'static str>; 2],
) -> Result<()> {
    const SIZE: u64 = 16 * MIB;
    let arena = Arena::new(SIZE)?;
    let destination = Destination::spawn(
        &arena.target,
        &arena.psk,
        &arena.destination_status,
        &["--serve"],
    )?;
    let [(label_a, path_a), (label_b, path_b)] = volumes;
    let [flags_a, flags_b] = flags;
    let stalled = || {
        Proxy::start(
            destination.addr,
            Faults::none().stall_at(SIZE / 4),
            Faults::none(),
        )
    };
    let mut contenders = [
        Contender::new(
            label_a,
            arena.volume(path_a, SIZE, 0xc0_0001)?,
            arena.dir.path().join("a-status.json"),
            flags_a,
            stalled()?,
        ),
        Contender::new(
            label_b,
            arena.volume(path_b, SIZE, 0xc0_0002)?,
            arena.dir.path().join("b-status.json"),
            flags_b,
            stalled()?,
        ),
    ];
    let checks = contest(&arena.psk, &arena.target, SIZE, &mut contenders)?;

    let tries: Vec<_> = contenders.iter().flat_map(|c| c.tries.iter()).collect();
    let busy = tries.iter().filter(|t| t.busy()).count();
    println!(
        "{} tries in all ({} and {}), {busy} refused as busy",
        tries.len(),
        contenders[0].tries.len(),
        contenders[1].tries.len()
    );
    ensure!(
        busy > 0,
        "no try was refused with exit 75 and {BUSY:?}: {:#?}",
        tries
    );
    for t in tries.iter().filter(|t| !t.succeeded()) {
        ensure!(
            t.busy(),
            "a try failed other than as busy (a livelock's symptom is each source ending the other's sync): {t:?}"
        );
    }
    for c in &contenders {
        ensure!(
            c.succeeded(),
            "{} never succeeded in {MAX_TRIES} tries: {:#?}",
            c.label,
            c.tries
        );
        expect_successful(&c.status, Kind::Source)?;
    }
    for check in &checks {
        ensure!(
            check.equal != Some(false),
            "right after {}'s success the target differs from its volume: {checks:?}",
            check.label
        );
    }
    ensure!(
        checks.iter().filter(|c| c.equal == Some(true)).count() >= 1,
        "no success could be checked: {checks:?}"
    );
    expect_successful(&arena.destination_status, Kind::Destination)?;
    drop(destination);
    Ok(())
}

/// Finding 7: two sources with one key and different volumes (file names `alpha.img` and `beta.img`, so different
/// default `--name`s) on one `--serve` destination take turns: a source that arrives during the other's sync is
/// refused with exit 75 and "busy with another source", neither ends the other's sync, both succeed within a
/// bounded number of tries, and right after each success the target equals that source's volume.
#[test]
fn two_sources_named_by_their_volumes_take_turns_on_one_serving_destination() -> Result<()> {
    two_sources_take_turns(
        [("alpha", "alpha.img"), ("beta", "beta.img")],
        [Vec::new(), Vec::new()],
    )
}

/// Finding 7, the identity coming from `--name`: both volumes are called `disk.img` (in two directories), so only
/// `--name a` and `--name b` tell the sources apart; they must take turns as above, not supersede each other.
#[test]
fn two_sources_named_by_flag_take_turns_on_one_serving_destination() -> Result<()> {
    two_sources_take_turns(
        [("a", "a/disk.img"), ("b", "b/disk.img")],
        [vec!["--name", "a"], vec!["--name", "b"]],
    )
}

/// Finding 7, the other half: a source whose sync is held still (its stream stalled by the proxy) is superseded by
/// a new process of the SAME source (same volume, same `--name`) connecting directly. The newcomer succeeds with
/// target == volume; the stalled source, once released, is told why: exit 75 and an `error:` line saying
/// "superseded" (an ABORT, not "peer closed the connection"). Its failure does not touch the destination's
/// Successful status.
#[test]
fn a_superseded_source_is_told_so_and_its_successor_succeeds() -> Result<()> {
    const SIZE: u64 = 16 * MIB;
    let fx = Fixture::with_spec(&quarter_zeros_spec(SIZE, 0xc0_0003), SIZE)?;
    let destination =
        Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &["--serve"])?;
    let name = ["--name", "disk"];
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(SIZE / 4),
        Faults::none(),
    )?;
    let stale_status = fx.dir.path().join("stale-source-status.json");
    let stale = Running::new(spawn_source_with(
        proxy.addr(),
        &fx.volume,
        &fx.psk,
        &stale_status,
        &name,
    )?)?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;

    let successor = run_source_with(
        destination.addr,
        &fx.volume,
        &fx.psk,
        &fx.source_status,
        &name,
    )?;
    let stderr = String::from_utf8_lossy(&successor.stderr);
    ensure!(
        successor.status.success(),
        "the successor failed ({}): {}",
        successor.status,
        error_line(&stderr)
    );
    fx.expect_target_matches_volume()?;
    let succeeded = expect_successful(&fx.destination_status, Kind::Destination)?;

    proxy.release();
    let stale = stale.wait(AGENT_TIMEOUT)?;
    let (code, line) = (stale.status, stale.error_line());
    println!("the superseded source: {code}, {line}");
    ensure!(
        code.code() == Some(RETRYABLE) && line.contains("superseded"),
        "the superseded source must exit 75 saying it was superseded, got {code}: {line:?}"
    );
    let stale_recorded = expect_failed(&stale_status, Kind::Source)?;
    ensure!(
        stale_recorded.to_string().contains("superseded"),
        "{stale_recorded:#}"
    );
    let after = expect_successful(&fx.destination_status, Kind::Destination)?;
    ensure!(
        last_sync_time(&after)? == last_sync_time(&succeeded)?,
        "the superseded session changed the destination's status: {after:#}"
    );
    Ok(())
}

/// Overwrites block 0 of `chunk` of `path` (in place, as a guest writing a live volume) with bytes no sample holds.
fn overwrite_chunk(path: &Path, chunk: u64, fill: u8) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all_at(&[fill; 4096], chunk * CHUNK)?;
    Ok(())
}

/// After a sync that failed: a plain sync of the fixture succeeds on both sides, target == volume, and both statuses
/// say Successful.
fn resync_converges(fx: &Fixture) -> Result<()> {
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.source_status, Kind::Source)?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}

/// Finding 8: a live (unsnapshotted) volume changes between the source's scan and its DATA reads. The sync of a
/// 16 MiB volume (256 chunks, announced whole within the default window of 8192) is held by stalling the source's
/// stream one byte after its HELLO: READY has reached the source, but no DIGESTS reach the destination, so no NEED
/// comes back. Once the source's `/metrics` show the whole volume scanned, two chunks are overwritten in place and
/// the stream released. The source sees that a re-read chunk no longer hashes to what it announced: exit 75 with
/// "the volume changed during the sync (chunk N)", status Failed; the destination does not report Successful; a
/// retry (of the changed volume, now still) succeeds with target == volume.
#[test]
fn a_volume_changed_between_scan_and_data_fails_retryable_and_a_retry_converges() -> Result<()> {
    const SIZE: u64 = 16 * MIB;
    let fx = Fixture::random(SIZE, 0xc0_0004)?;
    let through_hello = bytes_through_hello(&fx.psk, &fx.volume, &[])?;
    println!("the source's stream carries {through_hello} bytes up to its HELLO");

    let mut destination = fx.destination()?;
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(through_hello + 1),
        Faults::none(),
    )?;
    let mut source =
        ObservedSource::spawn(proxy.addr(), &fx.volume, &fx.psk, &fx.source_status, &[])?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;
    wait_scanned(&mut source, SIZE)?;
    assert_eq!(proxy.bytes_forwarded(Direction::Up), through_hello + 1);
    overwrite_chunk(&fx.volume, 5, 0xa5)?;
    overwrite_chunk(&fx.volume, 200, 0x5a)?;
    proxy.release();

    let ended = source.running.wait(AGENT_TIMEOUT)?;
    let (code, line) = (ended.status, ended.error_line());
    println!("source: {code}: {line}");
    ensure!(
        code.code() == Some(RETRYABLE)
            && line.contains("the volume changed during the sync (chunk"),
        "a volume that changed under the sync must fail retryable, naming the chunk; got {code}: {line:?}"
    );
    let recorded = expect_failed(&fx.source_status, Kind::Source)?;
    ensure!(
        recorded
            .to_string()
            .contains("the volume changed during the sync"),
        "{recorded:#}"
    );
    let finished = destination.wait(AGENT_TIMEOUT)?;
    ensure!(
        !finished.status.success(),
        "the destination claimed the sync: {}",
        finished.stderr
    );
    let dst = read_status(&fx.destination_status)?;
    ensure!(
        result_of(&dst) != "Successful" && last_sync_time(&dst)?.is_none(),
        "the destination reported a sync of a volume that changed under it: {dst:#}"
    );

    resync_converges(&fx)
}

/// Finding 1, `destination --read-back`: a full sync with it succeeds (target == volume, both Successful), and an
/// unchanged sync with it reads at least the whole volume more on the destination (`external.bytesRead`) than the
/// same unchanged sync without it: the target really is read back, not vouched for by scan-time hashes.
#[test]
fn read_back_reads_the_whole_target_again_and_a_normal_sync_succeeds() -> Result<()> {
    const SIZE: u64 = 16 * MIB;
    let fx = Fixture::new(SIZE, 0xc0_0005)?;
    let sync = |flags: &[&str]| -> Result<u64> {
        let mut destination =
            Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, flags)?;
        fx.sync_into(&mut destination, &[])?
            .ensure_success()
            .with_context(|| format!("sync with {flags:?}"))?;
        fx.expect_target_matches_volume()?;
        expect_successful(&fx.source_status, Kind::Source)?;
        let dst = expect_successful(&fx.destination_status, Kind::Destination)?;
        external_u64(&dst, "bytesRead")
    };
    let full = sync(&["--read-back"])?;
    let plain = sync(&[])?;
    let read_back = sync(&["--read-back"])?;
    println!("destination bytesRead: full sync with --read-back {full}, unchanged {plain} without, {read_back} with");
    ensure!(
        read_back >= plain + SIZE,
        "--read-back read {read_back} bytes, without it {plain}: the {SIZE}-byte target was not read back"
    );
    Ok(())
}

/// A full sync of a dense 32 MiB volume (512 chunks) held still by a proxy that stalls the source's stream half way.
struct HeldSync {
    fx: Fixture,
    destination: Destination,
    proxy: Proxy,
    source: Running,
}

impl HeldSync {
    /// Writes 4 KiB of 0xee at byte 0 of the target (a chunk the sync already wrote), behind the destination's back.
    fn scribble_first_block(&self) -> Result<()> {
        let target = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.fx.target)?;
        target.write_all_at(&[0xee; 4096], 0)?;
        Ok(())
    }

    /// Lets the sync go on and waits for both agents: the fixture, the source's exit status and the destination's
    /// end.
    fn release(self) -> Result<(Fixture, std::process::ExitStatus, Finished)> {
        let HeldSync {
            fx,
            mut destination,
            proxy,
            source,
        } = self;
        proxy.release();
        let source_exit = source.wait(AGENT_TIMEOUT)?.status;
        let finished = destination.wait(AGENT_TIMEOUT)?;
        Ok((fx, source_exit, finished))
    }
}

/// Starts a [`HeldSync`] into a destination started with `flags`; returns once the destination has written `chunk`
/// (polled on the target's bytes; its DATA lies well before the stall point), so that chunk is settled and this
/// session will not write it again.
fn held_with_chunk_written(seed: u64, flags: &[&str], chunk: u64) -> Result<HeldSync> {
    const SIZE: u64 = 32 * MIB;
    let fx = Fixture::random(SIZE, seed)?;
    let destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, flags)?;
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(SIZE / 2),
        Faults::none(),
    )?;
    let source = Running::source(proxy.addr(), &fx, &[])?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;
    let want = chunk_bytes(&fx.volume, chunk)?;
    wait_until(
        &format!("the destination writes chunk {chunk} while half the volume passes"),
        AGENT_TIMEOUT,
        || Ok(chunk_bytes(&fx.target, chunk)? == want),
    )?;
    Ok(HeldSync {
        fx,
        destination,
        proxy,
        source,
    })
}

fn chunk_bytes(path: &Path, chunk: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK as usize];
    let n = std::fs::File::open(path)?.read_at(&mut buf, chunk * CHUNK)?;
    buf.truncate(n);
    Ok(buf)
}

/// Releases a held sync whose target was changed behind the destination's back and checks it failed on both
/// sides: the destination exits 75 with status Failed naming one of `needles`, the source exits non-zero, and no
/// status says Successful. Then a plain sync repairs the target.
fn expect_caught_then_repaired(held: HeldSync, needles: &[&str]) -> Result<()> {
    let (fx, source_exit, finished) = held.release()?;
    let line = error_line(&finished.stderr);
    println!(
        "destination: {}: {line}; source: {source_exit}",
        finished.status
    );
    let named = |text: &str| needles.iter().any(|n| text.contains(n));
    ensure!(
        finished.status.code() == Some(RETRYABLE) && named(line),
        "a target changed during the sync must fail the destination with exit 75 naming {needles:?}; got {}: {line:?}",
        finished.status
    );
    let dst = expect_failed(&fx.destination_status, Kind::Destination)?;
    ensure!(named(&dst.to_string()), "{dst:#}");
    ensure!(last_sync_time(&dst)?.is_none(), "{dst:#}");
    ensure!(!source_exit.success(), "the source claimed the sync");
    let src = read_status(&fx.source_status)?;
    ensure!(result_of(&src) != "Successful", "{src:#}");

    // An operator who finds the target shorter than the volume gives it its size back; the sync does the rest.
    if std::fs::metadata(&fx.target)?.len() < fx.size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.target)?
            .set_len(fx.size)?;
    }
    resync_converges(&fx)
}

/// Finding 1: another process writes 4 KiB at byte 0 of the target (a chunk this sync already wrote) while the
/// sync is held half way. With `--read-back` the destination reads the target back after its fsync, finds a volume
/// digest other than the source's, and fails: exit 75, status Failed with "read-back"; the source fails too and
/// neither side says Successful. The next sync repairs the target.
#[test]
fn read_back_catches_a_write_to_the_target_during_the_sync() -> Result<()> {
    let held = held_with_chunk_written(0xc0_0006, &["--read-back"], 0)?;
    held.scribble_first_block()?;
    expect_caught_then_repaired(held, &["read-back"])
}

/// Finding 1: the target file is truncated to a quarter of its size while the sync is held half way, once the
/// chunk just past the cut was written, so chunks the sync wrote are lost. With `--read-back` the sync fails as above (exit 75, Failed, naming the read-back or the
/// target's size, which is always checked at the end of a sync). Without `--read-back` such a truncation is the
/// consistency contract's stated assumption (nothing else writes the target): when the destination's later writes
/// give the file its size back, only the read-back can see the lost chunks, so no test claims more for it.
#[test]
fn read_back_catches_a_target_truncated_during_the_sync() -> Result<()> {
    const QUARTER: u64 = 8 * MIB;
    let held = held_with_chunk_written(0xc0_0007, &["--read-back"], QUARTER / CHUNK)?;
    let quarter = held.fx.size / 4;
    assert_eq!(quarter, QUARTER);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&held.fx.target)?
        .set_len(quarter)?;
    expect_caught_then_repaired(held, &["read-back", "size"])
}

/// The destination writes its next manifest while it makes the target durable, and keeps it only once the target
/// is checked. Here the check after the fsync fails (`--read-back` finds a write made behind its back while the
/// sync was held): the destination's state directory must hold no manifest afterwards (neither the one sealed
/// during the fsync under a temporary name, never published, nor anything the failure invalidates), so that the
/// next sync compares in full; that sync repairs the target.
#[test]
fn a_manifest_written_during_the_final_fsync_is_dropped_when_the_read_back_fails() -> Result<()> {
    let state = tempfile::tempdir()?;
    let state_dir = state.path().join("destination-state");
    let dir_flag = state_dir.to_string_lossy().into_owned();
    let held = held_with_chunk_written(0xc0_0008, &["--read-back", "--state-dir", &dir_flag], 0)?;
    held.scribble_first_block()?;
    let (fx, source_exit, finished) = held.release()?;
    ensure!(
        finished.status.code() == Some(RETRYABLE) && !source_exit.success(),
        "the read-back must fail both sides: destination {}, source {source_exit}: {}",
        finished.status,
        error_line(&finished.stderr)
    );
    expect_failed(&fx.destination_status, Kind::Destination)?;
    let left: Vec<String> = std::fs::read_dir(&state_dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    println!("destination state directory after the failed read-back: {left:?}");
    ensure!(
        !left.iter().any(|f| f.contains("manifest")),
        "a manifest (or its temporary) outlived the failed sync: {left:?}"
    );
    let mut again = Destination::spawn(
        &fx.target,
        &fx.psk,
        &fx.destination_status,
        &["--state-dir", &dir_flag],
    )?;
    let run = fx.sync_into(&mut again, &[])?;
    run.ensure_success()?;
    fx.expect_target_matches_volume()?;
    let dst = expect_successful(&fx.destination_status, Kind::Destination)?;
    ensure!(
        dst["external"]["syncKind"] == "full",
        "the sync after the failure compares in full: {dst:#}"
    );
    Ok(())
}
