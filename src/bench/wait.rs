//! Waiting for the bench's children: each one's exit is seen the moment it happens (its pidfd becomes readable),
//! and the kernel's account of its CPU time (all its threads) is taken when it is reaped (`wait4`). A sync is
//! timed to that instant: a loop that polled every 2 ms added about a millisecond to every duration, and its
//! `/proc` reads every tick took CPU from the agents it timed, both of which weigh on a 0.1 s sync and not on a
//! 4 s one. Peak RSS still comes from the probes ([`Probe`]), sampled from `/proc` every [`SAMPLE_TICK`].

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::procs::{ChildGuard, Probe};

/// How often the probes are sampled; also the poll interval without pidfds.
pub const SAMPLE_TICK: Duration = Duration::from_millis(10);

/// How long the other children may take to exit once one has failed.
const GRACE_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// The kernel's account of a reaped child (from `wait4`'s `struct rusage`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// User plus system CPU time of all its threads, seconds.
    pub cpu_secs: f64,
}

/// How and when a child ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// When its exit was seen.
    pub at: Instant,
    /// Its resource use.
    pub usage: Usage,
}

/// Reaps child `pid` if it has exited (`block`: waiting until it does), with its resource use.
pub(super) fn reap(pid: u32, block: bool) -> std::io::Result<Option<(ExitStatus, Usage)>> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero `rusage` is a valid value (plain integers and timevals).
    #[allow(unsafe_code)]
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: wait4 writes only through the two pointers, which point to live locals of the right types.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut usage) };
    match rc {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        _ => {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            Ok(Some((
                ExitStatus::from_raw(status),
                Usage {
                    cpu_secs: secs(usage.ru_utime) + secs(usage.ru_stime),
                },
            )))
        }
    }
}

/// Waits until every child in `children` has exited, sampling `probes` every [`SAMPLE_TICK`]; returns how each
/// ended. Fails (the guards then kill what is left) after `limit`, or [`GRACE_AFTER_FAILURE`] after a child
/// exited unsuccessfully.
pub fn wait_all(
    children: &mut [&mut ChildGuard],
    probes: &mut [&mut Probe],
    mut limit: Duration,
) -> anyhow::Result<Vec<Exit>> {
    let start = Instant::now();
    // Without pidfds (a kernel before 5.3) the children are polled every tick instead.
    let pidfds: Option<Vec<OwnedFd>> = children
        .iter()
        .map(|c| {
            let pid = rustix::process::Pid::from_raw(c.pid() as i32)?;
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        })
        .collect();
    let mut done: Vec<Option<Exit>> = vec![None; children.len()];
    loop {
        for probe in probes.iter_mut() {
            probe.sample();
        }
        for (child, slot) in children.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                if let Some((status, usage)) = child.poll()? {
                    *slot = Some(Exit {
                        status,
                        at: Instant::now(),
                        usage,
                    });
                    if !status.success() {
                        limit = limit.min(start.elapsed() + GRACE_AFTER_FAILURE);
                    }
                }
            }
        }
        if let Some(all) = done.iter().copied().collect::<Option<Vec<_>>>() {
            return Ok(all);
        }
        let elapsed = start.elapsed();
        if elapsed > limit {
            let running: Vec<&str> = children
                .iter()
                .zip(&done)
                .filter(|(_, d)| d.is_none())
                .map(|(c, _)| c.name.as_str())
                .collect();
            bail!(
                "{} still running after {:.0} s; stopped",
                running.join(" and "),
                limit.as_secs_f64()
            );
        }
        let pause = match probes.is_empty() {
            true => (limit - elapsed).min(Duration::from_millis(500)),
            false => SAMPLE_TICK,
        };
        match &pidfds {
            Some(fds) => {
                use rustix::event::{PollFd, PollFlags, Timespec};
                let mut polled: Vec<PollFd<'_>> = fds
                    .iter()
                    .zip(&done)
                    .filter(|(_, d)| d.is_none())
                    .map(|(fd, _)| PollFd::new(fd, PollFlags::IN))
                    .collect();
                let timeout = Timespec {
                    tv_sec: pause.as_secs() as _,
                    tv_nsec: pause.subsec_nanos() as _,
                };
                match rustix::event::poll(&mut polled, Some(&timeout)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e).context("cannot wait for the bench's children"),
                }
            }
            None => std::thread::sleep(pause.min(SAMPLE_TICK)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_reaped_child_brings_its_exit_status_and_cpu_time() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new("sh");
        // About 0.2 s of CPU in the shell itself, then an exit code the status must carry.
        cmd.args([
            "-c",
            "i=0; while [ $i -lt 40000 ]; do i=$((i+1)); done; exit 3",
        ]);
        let mut child = ChildGuard::spawn("busy shell", cmd, &dir.path().join("sh.log"), false)?;
        let exits = wait_all(&mut [&mut child], &mut [], Duration::from_secs(60))?;
        let exit = exits[0];
        assert_eq!(exit.status.code(), Some(3));
        assert!(
            exit.usage.cpu_secs > 0.01,
            "the loop's CPU: {:?}",
            exit.usage
        );
        // Reaped: stopping the guard does not signal a process id that may now be another's.
        child.stop();
        Ok(())
    }

    #[test]
    fn a_child_that_outlives_the_limit_is_reported_by_name() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = ChildGuard::spawn("sleeper", cmd, &dir.path().join("s.log"), false)?;
        let started = Instant::now();
        let err = wait_all(&mut [&mut child], &mut [], Duration::from_millis(300))
            .expect_err("the limit passes first");
        assert!(err.to_string().contains("sleeper still running"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the wait ended at the limit"
        );
        Ok(())
    }
}
