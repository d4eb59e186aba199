//! Freezing an agent with SIGSTOP, as a paused pod or VM is frozen, and what its peer must do meanwhile: give up
//! within its idle timeout and a grace (about N + 5 s for `--idle-timeout N`), never wait for the thaw.
//!
//! The freeze is held until the peer has reacted (the source exited, or the destination ended the session or
//! dropped the connection): that takes at least the idle timeout, so the freeze always outlasts it, and nothing
//! here waits on the clock. [`FREEZE_LIMIT`] is the deadline for that reaction; missing it is a hang.

use std::process::ExitStatus;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::agents::Agent;
use super::plan::Thaw;
use super::DROPPED;
use crate::common::signal;

/// The idle timeout both agents run with (`super::IDLE_TIMEOUT`), the spec's grace of 5 s, and slack for a
/// loaded 2-core machine: a peer that has not given up by then never will.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(3 + 5 + 10);

/// Stops `agent` if it is still running; returns whether it was.
pub fn stop(agent: &mut Agent) -> Result<bool> {
    if agent.child.try_wait()?.is_some() {
        return Ok(false);
    }
    signal("STOP", agent.child.id())?;
    Ok(true)
}

/// What the destination did after its source froze.
#[derive(Debug)]
pub enum Reaction {
    /// It ended the session and exited (a one-shot destination), with this status.
    Exited(ExitStatus),
    /// It dropped the connection before authentication and keeps listening.
    Dropped,
    /// Nothing within [`FREEZE_LIMIT`]: a hang.
    Nothing,
}

/// Waits (at most [`FREEZE_LIMIT`]) for the destination to give up on a frozen source.
pub fn destination_reaction(agent: &mut Agent) -> Result<Reaction> {
    let deadline = Instant::now() + FREEZE_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent
            .stderr
            .recv_timeout(left.min(Duration::from_millis(50)))
        {
            Ok(line) => {
                let dropped = line.contains(DROPPED);
                agent.log.push(line);
                if dropped {
                    return Ok(Reaction::Dropped);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(Reaction::Exited(agent.wait("destination")?))
            }
            Err(RecvTimeoutError::Timeout) if left.is_zero() => return Ok(Reaction::Nothing),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The freezes of one try: what landed, how the destination reacted to a frozen source, and the hangs seen.
#[derive(Default)]
pub struct Freeze {
    /// A freeze took effect (the agent was still running when stopped).
    pub landed: bool,
    /// How the destination reacted to its source freezing (taken by the try: the destination's session is over).
    pub reaction: Option<Reaction>,
    /// Peers that did not give up on a frozen agent within [`FREEZE_LIMIT`].
    pub hangs: Vec<String>,
    /// The destination is stopped: since when, and how its freeze ends.
    destination: Option<(Instant, Thaw)>,
}

impl Freeze {
    /// Freezes the source and holds it until the destination gave up on it, then thaws it as `thaw` says.
    pub fn source(
        &mut self,
        source: &mut Agent,
        destination: &mut Agent,
        thaw: Thaw,
    ) -> Result<()> {
        if !stop(source)? {
            return Ok(());
        }
        self.landed = true;
        let reaction = destination_reaction(destination)?;
        if matches!(reaction, Reaction::Nothing) {
            self.hangs.push(format!(
                "the destination neither ended the session nor dropped the connection within {FREEZE_LIMIT:?} \
                 of its source freezing:\n{}",
                destination.tail()
            ));
        }
        self.reaction = Some(reaction);
        match thaw {
            Thaw::Continue => signal("CONT", source.child.id()),
            Thaw::Kill => source.kill().map(drop),
        }
    }

    /// Freezes the destination; it stays frozen until the source exits ([`Freeze::thaw_destination`]) or
    /// [`FREEZE_LIMIT`] passes ([`Freeze::tick`]).
    pub fn destination(&mut self, destination: &mut Agent, thaw: Thaw) -> Result<()> {
        if stop(destination)? {
            self.landed = true;
            self.destination = Some((Instant::now(), thaw));
        }
        Ok(())
    }

    /// While the source runs: a source still running [`FREEZE_LIMIT`] after its destination froze hangs; the
    /// destination is then woken so that the try can end.
    pub fn tick(&mut self, source: &Agent, destination: &mut Agent) -> Result<()> {
        if let Some((since, _)) = self.destination {
            if since.elapsed() > FREEZE_LIMIT {
                self.hangs.push(format!(
                    "the source did not give up within {FREEZE_LIMIT:?} of its destination freezing:\n{}",
                    source.tail()
                ));
                self.destination = None;
                signal("CONT", destination.child.id())?;
            }
        }
        Ok(())
    }

    /// Once the source exited: thaws a destination still frozen; returns whether it was killed.
    pub fn thaw_destination(&mut self, destination: &mut Agent) -> Result<bool> {
        match self.destination.take() {
            Some((_, Thaw::Continue)) => {
                signal("CONT", destination.child.id())?;
                Ok(false)
            }
            Some((_, Thaw::Kill)) => destination.kill(),
            None => Ok(false),
        }
    }
}
