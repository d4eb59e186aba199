//! Long-running agents on both sides: a scheduled source (`--schedule @yearly`, its syncs asked for with
//! `blockmover trigger`) and a serving destination. Without `--state-dir` both keep their manifests in memory;
//! `--verify full` on a long-running agent applies to its first sync only.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::Value;

use super::{scattered, scribble, text, Pair, CHUNK, MIB, SOURCE_NO_MANIFEST};
use crate::common::{
    bin, expect_successful, read_status, result_of, run_bin, sigterm, spawn_source_with,
    wait_until, Destination, Running, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const WAIT: Duration = Duration::from_secs(60);

/// A scheduled source and a serving destination of a pair, with extra flags each.
struct Agents<'a> {
    p: &'a Pair,
    source: Running,
    destination: Destination,
}

impl<'a> Agents<'a> {
    fn start(p: &'a Pair, source: &[&str], destination: &[&str]) -> Result<Agents<'a>> {
        let mut d = vec!["--serve"];
        d.extend_from_slice(destination);
        let destination =
            Destination::spawn(&p.fx.target, &p.fx.psk, &p.fx.destination_status, &d)?;
        let mut s = vec!["--schedule", "@yearly"];
        s.extend_from_slice(source);
        let source = Running::new(spawn_source_with(
            destination.addr,
            &p.fx.volume,
            &p.fx.psk,
            &p.fx.source_status,
            &s,
        )?)?;
        Ok(Agents {
            p,
            source,
            destination,
        })
    }

    /// Waits for the sync `token` names (None: the first one, at start) to be recorded by both agents; checks
    /// target == volume; returns both statuses.
    fn synced(&mut self, token: Option<&str>) -> Result<(Value, Value)> {
        let p = self.p;
        let mut digest = None;
        wait_until("the source's sync", WAIT, || {
            let Ok(s) = read_status(&p.fx.source_status) else {
                return Ok(false);
            };
            let idle = s.get("lastSyncStartTime").is_none();
            if idle && result_of(&s) == "Failed" {
                bail!("the source's sync failed: {s:#}");
            }
            let done = result_of(&s) == "Successful"
                && idle
                && token.is_none_or(|t| s.get("lastManualSync").and_then(Value::as_str) == Some(t));
            digest = text(&s, "volumeDigest").map(str::to_owned);
            Ok(done)
        })?;
        super::policy::wait_destination_recorded(p, digest)?;
        assert!(
            self.source.exited().ok() == Some(false),
            "the scheduled source exited"
        );
        p.fx.expect_target_matches_volume()?;
        Ok((
            expect_successful(&p.fx.source_status, Kind::Source)?,
            expect_successful(&p.fx.destination_status, Kind::Destination)?,
        ))
    }

    /// `blockmover trigger STATUS TOKEN`, then [`Agents::synced`].
    fn trigger(&mut self, token: &str) -> Result<(Value, Value)> {
        let status = self.p.fx.source_status.to_string_lossy().into_owned();
        let out = run_bin(&["trigger", status.as_str(), token], AGENT_TIMEOUT)?;
        assert!(out.status.success(), "{} trigger: {}", bin(), out.stderr);
        self.synced(Some(token))
    }

    fn stop(self) -> Result<()> {
        sigterm(self.source.id())?;
        let ended = self.source.finish(AGENT_TIMEOUT)?;
        assert_eq!(ended.code(), Some(0), "{}", ended.stderr);
        let mut destination = self.destination;
        sigterm(destination.child.id())?;
        let finished = destination.wait(AGENT_TIMEOUT)?;
        assert!(finished.status.success(), "{}", finished.stderr);
        Ok(())
    }
}

fn kind(status: &Value) -> &str {
    text(status, "syncKind").unwrap_or("")
}

fn figure(status: &Value, key: &str) -> u64 {
    crate::common::external_u64(status, key).expect("figure")
}

/// `source --schedule` and `destination --serve`, neither with `--state-dir`: the first sync is full, the
/// triggered ones are deltas by manifest from the memory stores, and nothing is written to disk.
#[test]
fn a_scheduled_source_and_a_serving_destination_keep_their_manifests_in_memory() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xdea_0001)?;
    let size = p.size();
    let mut agents = Agents::start(&p, &[], &[])?;
    let (s, d) = agents.synced(None)?;
    assert_eq!((kind(&s), kind(&d)), ("full", "full"), "{s:#}");
    assert_eq!(text(&s, "fullReason"), Some(SOURCE_NO_MANIFEST), "{s:#}");

    scribble(&p.fx.volume, &scattered(size, 5, 1), 1)?;
    let (s, d) = agents.trigger("t1")?;
    assert_eq!(
        (kind(&s), kind(&d)),
        ("delta-manifest", "delta-manifest"),
        "{s:#}\n{d:#}"
    );
    assert_eq!(figure(&d, "chunksChanged"), 5, "{d:#}");
    assert!(figure(&d, "bytesRead") <= 2 * 5 * CHUNK, "{d:#}");

    let (s, d) = agents.trigger("t2")?;
    assert_eq!(
        (kind(&s), kind(&d)),
        ("delta-manifest", "delta-manifest"),
        "{s:#}"
    );
    assert_eq!(figure(&s, "chunksChanged"), 0, "{s:#}");
    agents.stop()?;
    for dir in [&p.sa, &p.sb] {
        assert!(!Path::new(dir).exists(), "{dir} was made");
    }
    Ok(())
}

/// `source --schedule --verify full`: the first sync compares in full although a delta is possible; the flag is
/// then spent (as on a serving destination), and the next, triggered sync is a delta.
#[test]
fn verify_full_on_a_scheduled_source_is_spent_by_its_first_sync() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xdea_0002)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    scribble(&p.fx.volume, &scattered(size, 2, 1), 1)?;
    // New status files: the agents' first sync is the one waited for.
    std::fs::remove_file(&p.fx.source_status)?;
    std::fs::remove_file(&p.fx.destination_status)?;
    let mut agents = Agents::start(
        &p,
        &["--state-dir", &p.sa, "--verify", "full"],
        &["--state-dir", &p.sb],
    )?;
    let (s, _) = agents.synced(None)?;
    assert_eq!(kind(&s), "full", "{s:#}");
    assert!(
        text(&s, "fullReason")
            .is_some_and(|r| r.contains("the source asked for a full comparison")),
        "{s:#}"
    );
    scribble(&p.fx.volume, &scattered(size, 2, 2), 2)?;
    let (s, _) = agents.trigger("t1")?;
    assert_eq!(
        kind(&s),
        "delta-manifest",
        "--verify full is spent by the first sync of a long-running source: {s:#}"
    );
    agents.stop()
}

/// A state directory removed while the agents run (by an operator, a cleanup job, a remounted volume) holds no
/// manifest: the next sync compares in full and succeeds, as for any other manifest that cannot be used, instead of
/// failing on the removal of a manifest that is not there. `source_side` picks the source's directory, else the
/// destination's.
fn state_directory_removed(seed: u64, source_side: bool) -> Result<()> {
    let p = Pair::new(16 * MIB, seed)?;
    let size = p.size();
    let mut agents = Agents::start(&p, &["--state-dir", &p.sa], &["--state-dir", &p.sb])?;
    agents.synced(None)?;
    std::fs::remove_dir_all(if source_side { &p.sa } else { &p.sb })?;
    for round in 1..=2 {
        scribble(&p.fx.volume, &scattered(size, 2, round), round)?;
        let (s, _) = agents.trigger(&format!("t{round}"))?;
        println!("sync {round}: {} {:?}", kind(&s), text(&s, "fullReason"));
        if round == 1 {
            assert_eq!(kind(&s), "full", "{s:#}");
        }
    }
    agents.stop()
}

#[test]
fn a_serving_destination_whose_state_directory_was_removed_syncs_in_full() -> Result<()> {
    state_directory_removed(0xdea_0003, false)
}

#[test]
fn a_scheduled_source_whose_state_directory_was_removed_syncs_in_full() -> Result<()> {
    state_directory_removed(0xdea_0004, true)
}
