//! One writer per target, and a bench target that is the volume under another name.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use blockmover::sample;

use super::{MIB, PROMPT, STALL_AT};
use crate::common::proxy::{Faults, Proxy};
use crate::common::{
    expect_successful, keygen, random_volume, read_status, result_of, run_bin, run_source,
    spawn_source, Destination, Finished, Running, Started, AGENT_TIMEOUT,
};
use crate::schema::Kind;

/// What the second destination on a held target did.
pub struct Refusal {
    /// Its `error: ` line.
    pub error: String,
    /// Whether it was refused at start-up (rather than when its source connected).
    pub at_start_up: bool,
}

impl Refusal {
    /// Prints how the second destination was refused, and its error.
    pub fn print(&self) {
        let when = match self.at_start_up {
            true => "at start-up",
            false => "when its source connected",
        };
        println!("refused {when}: {}", self.error);
    }
}

/// A source of a volume into a destination, its sync held by a proxy stalled at [`STALL_AT`] (so that the
/// destination holds the target), its output drained.
struct Held {
    proxy: Proxy,
    source: Running,
}

impl Held {
    /// Starts a source of `volume` (key `psk`, status `status`) through a proxy to the destination at `addr`;
    /// returns once the proxy holds the stream at [`STALL_AT`].
    fn start(addr: SocketAddr, volume: &Path, psk: &Path, status: &Path) -> Result<Held> {
        let proxy = Proxy::start(addr, Faults::none().stall_at(STALL_AT), Faults::none())?;
        let source = Running::new(spawn_source(proxy.addr(), volume, psk, status)?)?;
        proxy.wait_stalled(AGENT_TIMEOUT)?;
        Ok(Held { proxy, source })
    }

    /// Lets the held sync go on and waits for the source to exit.
    fn release(self) -> Result<Finished> {
        self.proxy.release();
        self.source.wait(AGENT_TIMEOUT)
    }
}

/// A first destination syncs `volume` into `target` through a proxy that holds the sync at [`STALL_AT`] (so the
/// first destination holds the target); a second destination on the same `target` must be refused, retryable
/// (75), naming "in use" and the first one's pid, either at start-up or when its own source (of `other_volume`)
/// connects, and that source must fail. Then the first sync is released and must complete, target == volume.
pub fn second_destination_is_refused(
    dir: &Path,
    target: &Path,
    volume: &Path,
    other_volume: &Path,
    size: u64,
) -> Result<Refusal> {
    let psk = keygen(dir)?;
    let (s1, d1) = (dir.join("source-1.json"), dir.join("destination-1.json"));
    let (s2, d2) = (dir.join("source-2.json"), dir.join("destination-2.json"));
    let Started::Listening(mut first) = Destination::start(target, &psk, &d1, &[])? else {
        bail!("the first destination did not start");
    };
    let held = Held::start(first.addr, volume, &psk, &s1)?;

    let refusal = match Destination::start(target, &psk, &d2, &[])? {
        Started::Exited(exit) => Refusal {
            error: exit.error_line().to_owned(),
            at_start_up: true,
        },
        Started::Listening(mut second) => {
            let other = run_source(second.addr, other_volume, &psk, &s2)?;
            let exit = second.wait(AGENT_TIMEOUT)?;
            assert_eq!(exit.code(), Some(75), "second destination: {}", exit.stderr);
            assert!(
                !other.status.success(),
                "the second destination's source succeeded: {}",
                String::from_utf8_lossy(&other.stderr)
            );
            let status = read_status(&d2)?;
            assert_ne!(result_of(&status), "Successful", "{status:#}");
            Refusal {
                error: exit.error_line().to_owned(),
                at_start_up: false,
            }
        }
    };
    assert!(
        refusal.error.contains("is in use by")
            && refusal.error.contains(&first.child.id().to_string()),
        "the error names the first destination (pid {}): {:?}",
        first.child.id(),
        refusal.error
    );

    let source = held.release()?;
    assert!(
        source.status.success(),
        "the first source failed: {}",
        source.stderr
    );
    let exit = first.wait(AGENT_TIMEOUT)?;
    assert!(
        exit.status.success(),
        "the first destination failed: {}",
        exit.stderr
    );
    expect_successful(&d1, Kind::Destination)?;
    assert_eq!(
        sample::file_digest(target, size)?,
        sample::file_digest(volume, size)?,
        "the target differs from the volume its destination reported synced"
    );
    Ok(refusal)
}

#[test]
fn a_second_destination_on_a_target_file_is_refused_naming_the_first() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let size = 16 * MIB;
    let (volume, other, target) = (
        dir.path().join("volume.img"),
        dir.path().join("other.img"),
        dir.path().join("target.img"),
    );
    random_volume(&volume, size, 0x10ca_0001)?;
    random_volume(&other, size, 0x10ca_0002)?;
    crate::common::sparse_file(&target, size)?;
    let refusal = second_destination_is_refused(dir.path(), &target, &volume, &other, size)?;
    assert!(
        refusal.error.contains("another process (pid"),
        "{:?}",
        refusal.error
    );
    refusal.print();
    Ok(())
}

/// One agent pair's outcome in the two-destination scenario.
struct Pair {
    volume: PathBuf,
    source: Option<Finished>,
    destination: Finished,
    statuses: [PathBuf; 2],
}

#[test]
fn two_destinations_on_one_target_never_report_a_target_that_differs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let size = 16 * MIB;
    let psk = keygen(dir.path())?;
    let target = dir.path().join("target.img");
    crate::common::sparse_file(&target, size)?;
    let volumes = [dir.path().join("a.img"), dir.path().join("b.img")];
    random_volume(&volumes[0], size, 0x10ca_0011)?;
    random_volume(&volumes[1], size, 0x10ca_0012)?;
    let status = |name: &str| dir.path().join(name);

    // Both destinations are started first, as two mover pods would be.
    let first = Destination::start(&target, &psk, &status("d-a.json"), &[])?;
    let second = Destination::start(&target, &psk, &status("d-b.json"), &[])?;
    let Started::Listening(mut first) = first else {
        bail!("the first destination did not start");
    };
    // The first sync is held mid-way while the second source runs, so that the two overlap for sure.
    let held_a = Held::start(first.addr, &volumes[0], &psk, &status("s-a.json"))?;
    let pair_b = match second {
        Started::Exited(exit) => Pair {
            volume: volumes[1].clone(),
            source: None,
            destination: exit,
            statuses: [status("s-b.json"), status("d-b.json")],
        },
        Started::Listening(mut second) => {
            let out = run_source(second.addr, &volumes[1], &psk, &status("s-b.json"))?;
            Pair {
                volume: volumes[1].clone(),
                source: Some(out.into()),
                destination: second.wait(AGENT_TIMEOUT)?,
                statuses: [status("s-b.json"), status("d-b.json")],
            }
        }
    };
    let pair_a = Pair {
        volume: volumes[0].clone(),
        source: Some(held_a.release()?),
        destination: first.wait(AGENT_TIMEOUT)?,
        statuses: [status("s-a.json"), status("d-a.json")],
    };

    let target_digest = sample::file_digest(&target, size)?;
    let mut failures = 0;
    for (name, pair) in [("a", &pair_a), ("b", &pair_b)] {
        let exits = [pair.source.as_ref(), Some(&pair.destination)];
        let succeeded = exits
            .iter()
            .flatten()
            .filter(|e| e.status.success())
            .count();
        let successful_status = pair
            .statuses
            .iter()
            .filter(|p| p.exists())
            .map(|p| read_status(p).map(|s| result_of(&s) == "Successful"))
            .collect::<Result<Vec<bool>>>()?
            .into_iter()
            .filter(|&s| s)
            .count();
        failures += exits
            .iter()
            .flatten()
            .filter(|e| !e.status.success())
            .count()
            + usize::from(pair.source.is_none());
        if succeeded + successful_status > 0 {
            assert_eq!(
                target_digest,
                sample::file_digest(&pair.volume, size)?,
                "pair {name} reports success but the target differs from its volume"
            );
        }
        println!(
            "pair {name}: source {:?}, destination {:?} {}",
            pair.source.as_ref().map(Finished::code),
            pair.destination.code(),
            pair.destination.error_line()
        );
    }
    assert!(failures > 0, "one target, two writers: someone must fail");
    assert!(
        pair_a.destination.status.success(),
        "{}",
        pair_a.destination.stderr
    );
    Ok(())
}

#[test]
fn bench_refuses_a_target_that_is_the_volume_under_another_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let volume = dir.path().join("volume.img");
    random_volume(&volume, 4 * MIB, 0x10ca_0021)?;
    let before = sample::file_digest(&volume, 4 * MIB)?;
    let (symlink, hard) = (dir.path().join("symlink.img"), dir.path().join("hard.img"));
    std::os::unix::fs::symlink(&volume, &symlink)?;
    std::fs::hard_link(&volume, &hard)?;
    for target in [&symlink, &hard] {
        expect_bench_refused(&volume, target, dir.path())?;
    }
    assert_eq!(
        sample::file_digest(&volume, 4 * MIB)?,
        before,
        "the volume was written"
    );
    Ok(())
}

/// `bench --volume V --target T` must fail (exit 1) before writing, saying they are the same.
pub fn expect_bench_refused(volume: &Path, target: &Path, dir: &Path) -> Result<()> {
    let bench_dir = dir.join("bench");
    let args: [&OsStr; 7] = [
        "bench".as_ref(),
        "--volume".as_ref(),
        volume.as_os_str(),
        "--target".as_ref(),
        target.as_os_str(),
        "--dir".as_ref(),
        bench_dir.as_os_str(),
    ];
    let exit = run_bin(&args, PROMPT)?;
    assert_eq!(
        exit.code(),
        Some(1),
        "bench on {}: {}",
        target.display(),
        exit.stderr
    );
    assert!(
        exit.error_line()
            .contains("is the same file or device as --volume"),
        "{}",
        exit.stderr
    );
    Ok(())
}
