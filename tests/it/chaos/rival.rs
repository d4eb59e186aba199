//! A second destination started on the target while the first one serves it (a stale mover pod, or two
//! ReplicationDestinations on one PVC), fed by a source with another volume: there must never be two writers.
//!
//! The first destination opens the target exclusively at start-up and holds it, so the rival must be refused at
//! its own start-up (exit 75, "in use": a retry may find the target free), or at the latest when its source
//! connects. A rival that serves a sync is a breach, whatever the main try's outcome.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use anyhow::{Context, Result};
use blockmover::sample::{self, SampleSpec};

use super::agents::{destination_args, spawn_source_of, Agent, Site};
use super::{RETRYABLE, VOLUME};

/// What a refused rival's `error:` line must say.
pub const IN_USE: &str = "in use";

/// How the rival destination started.
pub enum Rival {
    /// It exited without listening.
    Refused { status: ExitStatus, error: String },
    /// It listens; its source (with another volume) runs against it, concurrently with the main try.
    Listening { destination: Agent, source: Agent },
}

fn rival_volume(site: &Site, seed: u64) -> Result<PathBuf> {
    let path = site.volume.with_file_name("rival-volume.img");
    if !path.exists() {
        sample::write_sample_volume(&path, &SampleSpec::mixed(VOLUME, seed))?;
    }
    Ok(path)
}

impl Rival {
    /// Starts a second destination on `site`'s target (its own status file, the same key) while the first one
    /// listens; if it listens too, starts a source of another volume against it.
    pub fn start(site: &Site, seed: u64) -> Result<Rival> {
        let status = site.volume.with_file_name("rival-destination-status.json");
        let args = destination_args(site, &status);
        let mut destination = Agent::spawn(&args)?;
        let line = match destination.stdout.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => {
                let status = destination.wait("rival destination")?;
                let error = destination
                    .log
                    .iter()
                    .find(|l| l.contains("error: "))
                    .cloned()
                    .unwrap_or_default();
                return Ok(Rival::Refused { status, error });
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = destination.kill();
                anyhow::bail!("the rival destination neither listened nor exited within 30 s");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first stdout line {line:?}"))?
            .parse()?;
        let volume = rival_volume(site, seed)?;
        let status = site.volume.with_file_name("rival-source-status.json");
        let source = spawn_source_of(&volume, &status, site, addr, 65_536, &[])?;
        Ok(Rival::Listening {
            destination,
            source,
        })
    }

    /// After the main try: the breach found, if any (`None`: refused as it must be). `refused` counts how.
    pub fn settle(
        self,
        refused: &mut std::collections::BTreeMap<&'static str, u64>,
    ) -> Result<Option<String>> {
        match self {
            Rival::Refused { status, error } => {
                if status.code() == Some(RETRYABLE) && error.contains(IN_USE) {
                    *refused.entry("at start-up").or_default() += 1;
                    return Ok(None);
                }
                Ok(Some(format!(
                    "a second destination on the target was refused at start-up without exit {RETRYABLE} and \
                     {IN_USE:?}: {status}, {error:?}"
                )))
            }
            Rival::Listening {
                mut destination,
                mut source,
            } => {
                let source_exit = source.wait("rival source")?;
                let _ = destination.kill();
                let destination_exit = destination.wait("rival destination")?;
                if source_exit.success() {
                    return Ok(Some(format!(
                        "two writers: a second destination on the target served a sync (rival source \
                         {source_exit}, rival destination {destination_exit}):\n{}",
                        destination.tail()
                    )));
                }
                *refused.entry("when its source connected").or_default() += 1;
                Ok(None)
            }
        }
    }
}
