//! Two sources with one key against one `--serve` destination, each retrying like `container/client.sh` (only
//! after exit 75, a short growing pause, a bounded number of tries), driven from one loop so that every success can
//! be checked against the target before anything else may write it.
//!
//! Why the check is sound: when a source exits 0 no new try of the other is started, and a try of the other that
//! is still running is waited for. If that try was refused as busy it wrote nothing, so the target must equal the
//! successful source's volume; if it succeeded too (its session began after the first one ended), the target must
//! equal *its* volume and that is what is checked. Any other outcome of a try is itself a failed expectation.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use blockmover::sample;

use crate::common::proxy::Proxy;
use crate::common::{spawn_source_with, Running, AGENT_TIMEOUT};

/// Tries per source (client.sh makes 5 over a minute; here pauses are short, so more tries fit the same idea).
pub const MAX_TRIES: usize = 20;
/// First pause after a retryable failure; it doubles up to [`MAX_PAUSE`] (pacing, not synchronisation).
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_millis(800);
/// Safety net for the whole contest: beyond it the sources are taken to livelock.
pub const CONTEST_LIMIT: Duration = Duration::from_secs(90);
/// Exit code of a failure a retry may cure.
const RETRYABLE: i32 = 75;
/// What a source refused because another source's sync runs says.
pub const BUSY: &str = "busy with another source";

/// How one try ended.
#[derive(Clone, Debug)]
pub struct TryEnd {
    pub code: Option<i32>,
    /// The `error: ` line ("" on success).
    pub error: String,
    pub took: Duration,
}

impl TryEnd {
    pub fn succeeded(&self) -> bool {
        self.code == Some(0)
    }
    pub fn busy(&self) -> bool {
        self.code == Some(RETRYABLE) && self.error.contains(BUSY)
    }
}

/// One of the two sources: its volume, status, flags, its own proxy to the destination, and its tries so far.
pub struct Contender {
    pub label: &'static str,
    pub volume: PathBuf,
    pub status: PathBuf,
    pub flags: Vec<&'static str>,
    pub proxy: Proxy,
    pub tries: Vec<TryEnd>,
    running: Option<(Running, Instant)>,
    next_start: Instant,
    pause: Duration,
}

impl Contender {
    pub fn new(
        label: &'static str,
        volume: PathBuf,
        status: PathBuf,
        flags: Vec<&'static str>,
        proxy: Proxy,
    ) -> Contender {
        Contender {
            label,
            volume,
            status,
            flags,
            proxy,
            tries: Vec::new(),
            running: None,
            next_start: Instant::now(),
            pause: FIRST_PAUSE,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.tries.last().is_some_and(TryEnd::succeeded)
    }

    fn gave_up(&self) -> bool {
        !self.succeeded()
            && self
                .tries
                .last()
                .is_some_and(|t| t.code != Some(RETRYABLE) || self.tries.len() >= MAX_TRIES)
    }

    fn wants_to_start(&self, now: Instant) -> bool {
        self.running.is_none() && !self.succeeded() && !self.gave_up() && now >= self.next_start
    }

    fn start(&mut self, psk: &std::path::Path) -> Result<()> {
        let child = spawn_source_with(
            self.proxy.addr(),
            &self.volume,
            psk,
            &self.status,
            &self.flags,
        )?;
        self.running = Some((Running::new(child)?, Instant::now()));
        Ok(())
    }

    /// The try that ended since the last call, if any; `block` waits for it (safety net [`AGENT_TIMEOUT`]).
    fn reap(&mut self, block: bool) -> Result<Option<TryEnd>> {
        let Some((running, _)) = self.running.as_mut() else {
            return Ok(None);
        };
        if !block && !running.exited()? {
            return Ok(None);
        }
        let Some((running, started)) = self.running.take() else {
            bail!("no running try");
        };
        let finished = running.wait(AGENT_TIMEOUT)?;
        let end = TryEnd {
            code: finished.code(),
            error: finished.error_line().to_owned(),
            took: started.elapsed(),
        };
        println!(
            "  {} try {}: exit {:?} after {:.2}s {}",
            self.label,
            self.tries.len() + 1,
            end.code,
            end.took.as_secs_f64(),
            end.error
        );
        self.tries.push(end.clone());
        if !end.succeeded() {
            self.next_start = Instant::now() + self.pause;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
        Ok(Some(end))
    }
}

/// A check of the target right after a success.
#[derive(Debug)]
pub struct Check {
    /// The source whose success was checked.
    pub label: &'static str,
    /// Whether the target equalled that source's volume; `None` when the other source's try that was running at
    /// that moment succeeded too: it wrote last, legitimately, and the target was checked against its volume.
    pub equal: Option<bool>,
}

/// Runs both contenders (their first tries started back to back) until both succeeded or one gave up; the first
/// stall any proxy reports is held until a try of the other contender has ended (so at least one try meets a
/// sync under way), then every proxy is released. Returns the checks made after each success.
pub fn contest(
    psk: &std::path::Path,
    target: &std::path::Path,
    size: u64,
    contenders: &mut [Contender; 2],
) -> Result<Vec<Check>> {
    let started = Instant::now();
    let mut checks = Vec::new();
    let mut stalled: Option<usize> = None;
    let mut released = false;
    loop {
        let now = Instant::now();
        for c in contenders.iter_mut() {
            if c.wants_to_start(now) {
                c.start(psk)?;
            }
        }
        if stalled.is_none() {
            stalled = (0..2).find(|&i| contenders[i].proxy.try_stalled().is_some());
        }
        for i in 0..2 {
            let Some(end) = contenders[i].reap(false)? else {
                continue;
            };
            if end.succeeded() {
                checks.extend(check_success(target, size, contenders, i)?);
            }
        }
        if let (Some(s), false) = (stalled, released) {
            let other_ended = !contenders[1 - s].tries.is_empty();
            let stalled_ended = contenders[s].running.is_none();
            if other_ended || stalled_ended {
                contenders.iter().for_each(|c| c.proxy.release());
                released = true;
            }
        }
        if contenders.iter().all(Contender::succeeded) || contenders.iter().any(Contender::gave_up)
        {
            for c in contenders.iter_mut() {
                c.reap(true)?;
            }
            return Ok(checks);
        }
        if started.elapsed() > CONTEST_LIMIT {
            bail!(
                "livelock: after {CONTEST_LIMIT:?} the sources made {} and {} tries, successes: {} and {}",
                contenders[0].tries.len(),
                contenders[1].tries.len(),
                contenders[0].succeeded(),
                contenders[1].succeeded()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// After contender `i` exited 0: waits for the other's running try (no new try starts meanwhile), then compares
/// the target with the volume of whoever wrote it last.
fn check_success(
    target: &std::path::Path,
    size: u64,
    contenders: &mut [Contender; 2],
    i: usize,
) -> Result<Vec<Check>> {
    let j = 1 - i;
    let overtaken = contenders[j].reap(true)?.is_some_and(|t| t.succeeded());
    let writer = if overtaken { j } else { i };
    let equal = sample::file_digest(target, size)?
        == sample::file_digest(&contenders[writer].volume, size)?;
    let checks = match overtaken {
        false => vec![Check {
            label: contenders[i].label,
            equal: Some(equal),
        }],
        true => vec![
            Check {
                label: contenders[i].label,
                equal: None,
            },
            Check {
                label: contenders[j].label,
                equal: Some(equal),
            },
        ],
    };
    println!("  checked the target after a success: {checks:?}");
    Ok(checks)
}
