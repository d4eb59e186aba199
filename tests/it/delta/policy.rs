//! Who keeps state, and when a full comparison is due: one side without `--state-dir`, a serving destination that
//! keeps its manifest in memory, `--verify full` on a serving destination, `--verify-every N`.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::{
    change_list, scattered, scribble, text, Outcome, Pair, BLOCK, CHUNK, DESTINATION_NO_STATE, MIB,
    SOURCE_NO_MANIFEST, SOURCE_NO_STATE,
};
use crate::common::{
    expect_successful, read_status, result_of, run_source_with, sigterm, wait_until, Destination,
    Finished, AGENT_TIMEOUT,
};
use crate::schema::Kind;

/// Issue 11, case 4: the source keeps a manifest, a one-shot destination keeps none: every sync is full, the
/// second because the destination keeps no state; it hashes its whole target and succeeds.
#[test]
fn a_destination_without_state_makes_every_sync_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde4_0001)?;
    let size = p.size();
    let src = ["--state-dir", p.sa.as_str()];
    let first = p.sync_flags(&src, &[])?;
    p.fx.expect_target_matches_volume()?;
    first.expect_full(SOURCE_NO_MANIFEST);
    for round in 0..2 {
        scribble(&p.fx.volume, &scattered(size, 3, round), round)?;
        let out = p.sync_flags(&src, &[])?;
        p.fx.expect_target_matches_volume()?;
        out.expect_full(DESTINATION_NO_STATE);
        out.expect_whole_target_read();
        assert_eq!(out.src("blocksSent"), 3, "{}", out.describe());
    }
    assert!(p.source_manifest().is_file());
    assert!(
        !std::path::Path::new(&p.sb).exists(),
        "nothing made a destination state directory"
    );
    Ok(())
}

/// Issue 11, case 4, the other way round: a one-shot source without `--state-dir` makes every sync full (the
/// source keeps no state) although the destination keeps its manifest; once the source gets a state directory the
/// first sync is full (it has no manifest yet) and the next one is a delta.
#[test]
fn a_source_without_state_makes_every_sync_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde4_0002)?;
    let size = p.size();
    let dst = ["--state-dir", p.sb.as_str()];
    for round in 0..2 {
        scribble(&p.fx.volume, &scattered(size, 3, round), round)?;
        let out = p.sync_flags(&[], &dst)?;
        p.fx.expect_target_matches_volume()?;
        out.expect_full(SOURCE_NO_STATE);
        assert!(p.destination_manifest().is_file());
    }
    scribble(&p.fx.volume, &scattered(size, 3, 7), 7)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    scribble(&p.fx.volume, &scattered(size, 3, 8), 8)?;
    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), 3, "{}", out.describe());
    Ok(())
}

/// A serving destination and one-shot sources (with a state directory) against it.
pub(super) struct Served<'a> {
    pub p: &'a Pair,
    pub destination: Destination,
}

/// Waits until the destination's status records a finished Successful sync of the image of volume digest
/// `digest` (a serving destination writes it after the source has its COMMIT).
pub(super) fn wait_destination_recorded(p: &Pair, digest: Option<String>) -> Result<()> {
    wait_until("the destination's status", Duration::from_secs(30), || {
        let Ok(d) = read_status(&p.fx.destination_status) else {
            return Ok(false);
        };
        Ok(result_of(&d) == "Successful"
            && d.get("lastSyncStartTime").is_none()
            && text(&d, "volumeDigest").map(str::to_owned) == digest)
    })
}

impl<'a> Served<'a> {
    /// A `destination --serve` of the pair's target with `flags`.
    pub fn spawn(p: &'a Pair, flags: &[&str]) -> Result<Served<'a>> {
        let mut all = vec!["--serve"];
        all.extend_from_slice(flags);
        let destination =
            Destination::spawn(&p.fx.target, &p.fx.psk, &p.fx.destination_status, &all)?;
        Ok(Served { p, destination })
    }

    /// Runs a source with the pair's source state directory and `flags`; waits for the destination's status to
    /// record the sync (its volume digest is the source's), and checks target == volume.
    pub fn sync(&mut self, flags: &[&str]) -> Result<Outcome> {
        let p = self.p;
        let mut all = vec!["--state-dir", p.sa.as_str()];
        all.extend_from_slice(flags);
        let source = run_source_with(
            self.destination.addr,
            &p.fx.volume,
            &p.fx.psk,
            &p.fx.source_status,
            &all,
        )?;
        assert!(
            source.status.success(),
            "{}",
            String::from_utf8_lossy(&source.stderr)
        );
        let src = expect_successful(&p.fx.source_status, Kind::Source)?;
        let digest = text(&src, "volumeDigest").map(str::to_owned);
        wait_destination_recorded(p, digest)?;
        let dst: Value = expect_successful(&p.fx.destination_status, Kind::Destination)?;
        p.fx.expect_target_matches_volume()?;
        assert!(
            self.destination.child.try_wait()?.is_none(),
            "the destination still serves"
        );
        let outcome = Outcome {
            source_log: String::from_utf8_lossy(&source.stderr).into_owned(),
            // A serving destination's output is read when it stops.
            destination_log: None,
            source: src,
            destination: dst,
        };
        assert_eq!(
            text(&outcome.source, "syncKind"),
            text(&outcome.destination, "syncKind")
        );
        Ok(outcome)
    }

    /// SIGTERM; the destination exits 0.
    pub fn stop(mut self) -> Result<Finished> {
        sigterm(self.destination.child.id())?;
        let finished = self.destination.wait(AGENT_TIMEOUT)?;
        assert!(finished.status.success(), "{}", finished.stderr);
        Ok(finished)
    }
}

/// Issue 11, case 8: `destination --serve` without `--state-dir` keeps its manifest in memory: the first sync is
/// full, the next ones are deltas (by manifest, then by change list), all correct.
#[test]
fn a_serving_destination_keeps_its_manifest_in_memory() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde8_0001)?;
    let size = p.size();
    let mut served = Served::spawn(&p, &[])?;
    served.sync(&[])?.expect_full(SOURCE_NO_MANIFEST);

    let changed = scattered(size, 6, 1);
    scribble(&p.fx.volume, &changed, 1)?;
    let out = served.sync(&[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), 6, "{}", out.describe());
    assert!(out.dst("bytesRead") <= 2 * 6 * CHUNK, "{}", out.describe());

    let extents = scribble(&p.fx.volume, &scattered(size, 2, 9), 2)?;
    let list = change_list(p.fx.dir.path(), "changes.json", &extents)?;
    let out = served.sync(&["--changed-extents", &list])?;
    out.expect_delta("delta-changelist");
    assert_eq!(out.src("bytesRead"), 2 * BLOCK, "{}", out.describe());
    assert!(!std::path::Path::new(&p.sb).exists());
    let finished = served.stop()?;
    assert!(
        finished.stderr.contains("sync delta-changelist"),
        "{}",
        finished.stderr
    );
    Ok(())
}

/// `destination --serve --verify full`: the first sync it serves compares in full although a delta is possible;
/// the flag is then spent and the next sync is a delta.
#[test]
fn verify_full_on_a_serving_destination_is_spent_by_its_first_sync() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde8_0002)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let mut served = Served::spawn(&p, &["--state-dir", &p.sb, "--verify", "full"])?;
    scribble(&p.fx.volume, &scattered(size, 2, 1), 1)?;
    let out = served.sync(&[])?;
    out.expect_full("the destination asked for a full comparison");
    out.expect_whole_target_read();
    scribble(&p.fx.volume, &scattered(size, 2, 2), 2)?;
    served.sync(&[])?.expect_delta("delta-manifest");
    served.stop()?;
    Ok(())
}

/// Issue 11, case 9: `--verify-every 2` (on the source, then on the destination): after two deltas in a row the
/// next sync is full, "periodic"; `--verify-every 0` makes every sync full.
#[test]
fn verify_every_n_syncs_makes_every_third_delta_eligible_sync_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde9_0001)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let every = ["--verify-every", "2"];
    let mut seed = 0;
    let mut next = |source: &[&str], destination: &[&str]| -> Result<Outcome> {
        seed += 1;
        scribble(&p.fx.volume, &scattered(size, 2, seed), seed)?;
        let out = p.sync(source, destination)?;
        println!("sync {seed}: {} {}", out.kind(), out.reason());
        Ok(out)
    };
    next(&every, &[])?.expect_delta("delta-manifest");
    next(&every, &[])?.expect_delta("delta-manifest");
    let out = next(&every, &[])?;
    out.expect_full("the source's periodic full comparison is due");
    out.expect_whole_target_read();

    next(&[], &every)?.expect_delta("delta-manifest");
    next(&[], &every)?.expect_delta("delta-manifest");
    next(&[], &every)?.expect_full("the destination's periodic full comparison is due");
    next(&[], &every)?.expect_delta("delta-manifest");

    next(&["--verify-every", "0"], &[])?.expect_full("the source's periodic");
    next(&["--verify-every", "never"], &[])?.expect_delta("delta-manifest");
    Ok(())
}

/// `--verify-every 1s`: a sync more than a second after the last full comparison is full, "periodic"; with an
/// hour it is a delta.
#[test]
fn verify_every_a_duration_makes_a_sync_after_it_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde9_0002)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    scribble(&p.fx.volume, &scattered(size, 2, 1), 1)?;
    p.sync(&["--verify-every", "1h"], &[])?
        .expect_delta("delta-manifest");
    std::thread::sleep(Duration::from_millis(1200));
    scribble(&p.fx.volume, &scattered(size, 2, 2), 2)?;
    p.sync(&[], &["--verify-every", "1s"])?
        .expect_full("the destination's periodic full comparison is due");
    Ok(())
}
