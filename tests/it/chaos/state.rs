//! State in the chaos suite: state directories on either agent (delta syncs), and truthful change lists.
//!
//! Each iteration draws whether the source and the destination keep a state directory (the same directories
//! across the run, as one volume's would be) and whether the source is given a change list. The change list is
//! always true: every 4 KiB block that differs between the volume now and the volume as the source last synced it
//! (its manifest's image). A lying list is the one documented way to a wrong Successful, and `tests/it/delta/`
//! shows that `--verify full` repairs it; here every Successful must still mean target == volume.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::agents::Site;

/// Which agents keep state in one iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub source: bool,
    pub destination: bool,
    /// The source is given a change list (only with `source`).
    pub change_list: bool,
}

impl State {
    pub fn random(rng: &mut ChaCha8Rng) -> State {
        let (source, destination) = match rng.random_range(0..6) {
            0 => (false, false),
            1 => (true, false),
            2 => (false, true),
            _ => (true, true),
        };
        State {
            source,
            destination,
            change_list: source && rng.random_bool(0.5),
        }
    }

    pub fn describe(&self) -> String {
        match (self.source, self.destination, self.change_list) {
            (false, false, _) => String::new(),
            (s, d, c) => format!(
                ", state on {}{}",
                match (s, d) {
                    (true, true) => "both",
                    (true, false) => "the source",
                    _ => "the destination",
                },
                if c { " with a change list" } else { "" }
            ),
        }
    }
}

/// The state directories of a run, and the volume as the source last synced it.
pub struct Dirs {
    source: PathBuf,
    destination: PathBuf,
    changes: PathBuf,
    /// The volume's bytes when the source last claimed success: the image of its manifest.
    synced: Option<Vec<u8>>,
}

impl Dirs {
    pub fn new(site: &Site) -> Dirs {
        let dir = site.volume.parent().map(PathBuf::from).unwrap_or_default();
        Dirs {
            source: dir.join("source-state"),
            destination: dir.join("destination-state"),
            changes: dir.join("changes.json"),
            synced: None,
        }
    }

    pub fn destination_args(&self, state: State) -> Vec<OsString> {
        match state.destination {
            true => vec!["--state-dir".into(), self.destination.clone().into()],
            false => Vec::new(),
        }
    }

    /// The source's flags for a try; writes the change list (since the last synced image) when one is wanted.
    pub fn source_args(&self, state: State, site: &Site) -> Result<Vec<OsString>> {
        let mut args = Vec::new();
        if !state.source {
            return Ok(args);
        }
        args.extend(["--state-dir".into(), self.source.clone().into()]);
        if state.change_list {
            let volume = std::fs::read(&site.volume)?;
            let extents = match &self.synced {
                Some(before) => changed_blocks(before, &volume),
                // Never synced with state: any list will do, the source has no manifest and compares in full.
                None => vec![(0, volume.len() as u64)],
            };
            let json = serde_json::json!({ "extents": extents });
            std::fs::write(&self.changes, serde_json::to_vec(&json)?)?;
            args.extend(["--changed-extents".into(), self.changes.clone().into()]);
        }
        Ok(args)
    }

    /// The source claimed success: its manifest (if it keeps one) is the volume as it is now.
    pub fn source_synced(&mut self, site: &Site) -> Result<()> {
        self.synced = Some(std::fs::read(&site.volume)?);
        Ok(())
    }
}

/// The 4 KiB blocks that differ, as byte extents (adjacent blocks merged).
fn changed_blocks(before: &[u8], now: &[u8]) -> Vec<(u64, u64)> {
    const BLOCK: usize = 4096;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let len = before.len().max(now.len());
    for start in (0..len).step_by(BLOCK) {
        let end = (start + BLOCK).min(len);
        if before.get(start..end) != now.get(start..end) {
            let size = (end - start) as u64;
            match out.last_mut() {
                Some((o, l)) if *o + *l == start as u64 => *l += size,
                _ => out.push((start as u64, size)),
            }
        }
    }
    out
}
