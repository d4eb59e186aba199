//! The image in a real container engine: VolSync's rsync-tls scenario with podman. The destination runs
//! `server.sh` and the source `client.sh`, each in its own container on a podman network (the source reaches the
//! destination by its name, as a Service name), with a loop device at `/dev/block` (`--device`, read-only for the
//! source), the key Secret mounted read-only at `/keys` (laid out as the kubelet does: `psk.txt` a symlink into
//! `..data/`), and the mover pod's security context: read-only root, a tmpfs `/tmp`, no capabilities, no privilege
//! escalation, a numeric uid:gid.
//!
//! Device nodes and the key get the owners and modes a cluster gives them ([`Shape`]). Needs root (loop devices,
//! rootful podman); the image is built once per run by `container/build-local.sh` (see `container/podman.rs`),
//! which installs podman when it is missing. Where podman cannot start a container the tests print
//! `skipped: podman cannot start a container here (<reason>)` and pass. Synchronisation points are the log lines
//! (`listening on`, the source's retry lines) and, for the kill mid-sync, the target's bytes; timeouts are safety
//! nets only.

mod examples;
mod kube;
mod observe;
mod podman;
mod scenario;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmover::sample::{self, SampleSpec};

use podman::{engine, Engine, Ran, SAFETY_NET};
use scenario::{timer, Role, Scenario, Shape, MIB, SIZE, UID};

#[test]
fn container_full_then_incremental_sync_converge_and_log_what_volsync_keeps() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("full then incremental sync");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(SIZE, 0x13_0001),
        Shape::OwnedByPodUser,
    )?;
    let (server, client) = s.sync()?;
    s.expect_success(&server, &client)?;
    client.expect_line("try 1/5");

    let change = sample::scattered_change(&s.volume.path, SIZE, 0.01, 0x13_0002)?;
    let (server, client) = s.sync()?;
    s.expect_success(&server, &client)?;
    let sent = server.figure("blocks sent ");
    let changed = change.blocks.len() as u64;
    server.check(sent == Some(changed), &format!("{changed} blocks changed"));
    Ok(())
}

#[test]
fn container_source_started_before_the_destination_retries_until_it_listens() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("source before destination");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(SIZE, 0x13_0003),
        Shape::OwnedByPodUser,
    )?;
    let name = engine.unique_name("dst");
    let mut client = s.source(&name).env("RETRY_DELAYS", "1 2 4 8 16").start()?;
    let retry = client.wait_for("failed (retryable), retrying in ", 1)?;
    assert!(retry.contains("try 1/5"), "{retry}");
    let server = s.destination(&name)?;
    let client = client.finish()?;
    s.expect_success(&server.finish()?, &client)
}

/// The index of the host-side veth of a container's eth0.
fn host_veth(engine: &Engine, container: &str) -> Result<String> {
    let index = engine.podman(&["exec", container, "cat", "/sys/class/net/eth0/iflink"])?;
    let index = index.trim();
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let found = std::fs::read_to_string(entry.path().join("ifindex")).unwrap_or_default();
        if found.trim() == index {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    bail!("no host interface with index {index} (the veth of {container})")
}

#[test]
fn container_destination_killed_mid_sync_is_replaced_and_the_source_retry_resumes() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("destination killed mid-sync");
    let size = 64 * MIB;
    let s = Scenario::new(
        engine,
        &crate::common::random_spec(size, 0x13_0004),
        Shape::OwnedByPodUser,
    )?;
    let name = engine.unique_name("dst");
    let server = s.destination(&name)?;
    // 100 Mbit/s into the destination (tbf on its host-side veth, which goes with the container): the sync takes
    // about 6 s, so the kill lands mid-sync. The replacement gets a new veth, unthrottled.
    let veth = host_veth(engine, &name)?;
    let tc = std::process::Command::new("tc")
        .args([
            "qdisc", "add", "dev", &veth, "root", "tbf", "rate", "100mbit",
        ])
        .args(["burst", "64kb", "latency", "500ms"])
        .status()
        .context("run tc")?;
    assert!(tc.success(), "tc qdisc add dev {veth}: {tc}");
    let client = s.source(&name).env("RETRY_DELAYS", "1 2 4 8 16").start()?;
    let started = Instant::now();

    // Kill once a quarter of the volume is on the target (the host sees the container's writes: one page cache).
    let target = std::fs::File::open(&s.target.path)?;
    let mut block = vec![0u8; 4096];
    let deadline = Instant::now() + SAFETY_NET;
    loop {
        target.read_exact_at(&mut block, size / 4)?;
        if block.iter().any(|&b| b != 0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the target never received a quarter of the volume");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "{:.1} s: a quarter of the volume is on the target: kill",
        started.elapsed().as_secs_f64()
    );
    // The replacement takes the killed one's address, like a new pod behind the same Service.
    let network = format!("(index .NetworkSettings.Networks {:?})", s.network.name);
    let format = format!("{{{{{network}.IPAddress}}}} {{{{{network}.MacAddress}}}}");
    let address = engine.podman(&["inspect", "--format", &format, &name])?;
    let (ip, mac) = address.trim().split_once(' ').context("IP and MAC")?;
    let address = (ip.to_owned(), mac.to_owned());
    let killed = server.kill()?;
    killed.expect_code(137);
    println!("{:.1} s: killed", started.elapsed().as_secs_f64());
    let mut server = s.pod(Role::Destination, &name).address(address).start()?;
    server.wait_for("listening on ", 1)?;
    println!(
        "{:.1} s: the replacement listens",
        started.elapsed().as_secs_f64()
    );
    let (server, client) = (server.finish()?, client.finish()?);
    client.expect_line("try 1/5 failed (retryable)");
    s.expect_success(&server, &client)?;
    // The replacement kept what the killed destination wrote: it received only the rest.
    let total = size / (64 << 10);
    let changed = server.figure("changed chunks ").context("changed chunks")?;
    println!("the retry sent {changed} of {total} chunks");
    server.check(changed < total * 4 / 5, "the retry did not resume");
    Ok(())
}

#[test]
fn container_wrong_key_fails_the_source_at_once_and_the_destination_keeps_listening() -> Result<()>
{
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("wrong key");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(SIZE, 0x13_0005),
        Shape::OwnedByPodUser,
    )?;
    let other = s.key_secret("other-keys", (0, UID, 0o640))?;
    let name = engine.unique_name("dst");
    let server = s.destination(&name)?;
    let started = Instant::now();
    let client = s.source(&name).keys(other).start()?.finish()?;
    client.expect_code(1);
    let tries = client
        .output
        .lines()
        .filter(|l| l.starts_with("error: "))
        .count();
    client.check(tries == 1, "the binary ran more than once");
    client.check(!client.output.contains("retrying in"), "it retried");
    client.expect_line("failed permanently on try 1/5 (exit 1)");
    let reason = client.volsync_logs(true).contains("keys do not match");
    client.check(reason, "VolSync would not show the reason");
    println!(
        "wrong key: the source ended in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The destination did not end: the source with the right key syncs with it.
    let client = s.source(&name).start()?.finish()?;
    s.expect_success(&server.finish()?, &client)
}

#[test]
fn container_exit_codes_are_0_or_1_with_the_reason_volsync_shows() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("exit codes");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(MIB, 0x13_0006),
        Shape::OwnedByPodUser,
    )?;
    let failed = |ran: &Ran, reason: &str| {
        ran.expect_code(1);
        let logs = ran.volsync_logs(true);
        ran.check(
            logs.contains(reason),
            &format!("VolSync would show {logs:?}"),
        );
    };
    let no_device = s.source("nowhere").without_device().start()?.finish()?;
    failed(&no_device, "no block device at /dev/block");
    let name = engine.unique_name("src");
    let no_address = s.pod(Role::Source, &name).start()?.finish()?;
    failed(&no_address, "DESTINATION_ADDRESS is not set");
    let nobody = engine.unique_name("nobody");
    let unreachable = s
        .source(&nobody)
        .env("RETRY_DELAYS", "0 0")
        .start()?
        .finish()?;
    failed(&unreachable, "failed after 2 tries");
    // SIGTERM to PID 1 (the script; a process with PID 1 gets no default signal handling) reaches the binary.
    let server = s.destination(&engine.unique_name("dst"))?;
    let stopped = server.stop()?;
    failed(&stopped, "interrupted by SIGTERM");
    Ok(())
}

/// One full sync with the device and key laid out as `shape`.
fn sync_as(shape: Shape, seed: u64) -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let s = Scenario::new(engine, &SampleSpec::mixed(SIZE, seed), shape)?;
    let (server, client) = s.sync()?;
    s.expect_success(&server, &client)
}

#[test]
fn container_root_disk_0660_device_with_the_disk_group_and_an_fs_group_key_syncs() -> Result<()> {
    let _t = timer("root:disk 0660 device, disk group added");
    sync_as(Shape::DiskGroup, 0x13_0007)
}

#[test]
fn container_privileged_mover_as_uid_0_without_capabilities_syncs() -> Result<()> {
    let _t = timer("privileged mover (uid 0, no capabilities)");
    sync_as(Shape::Privileged, 0x13_0008)
}

#[test]
fn container_unopenable_device_or_unreadable_key_names_the_fix() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("permission errors");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(MIB, 0x13_0009),
        Shape::Unprepared,
    )?;
    let ids = format!("uid:gid {UID}:{UID}");
    let client = s.source("nowhere").start()?.finish()?;
    client.expect_code(1);
    let line = client.expect_line("permission denied: /dev/block (root:root 600)");
    for needle in [
        "for reading by",
        &ids,
        "device_ownership_from_security_context",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    let name = engine.unique_name("dst");
    let server = s.pod(Role::Destination, &name).start()?.finish()?;
    server.expect_code(1);
    server.expect_line("cannot be opened for reading and writing by");

    // The device handed over, the key still root 0600 (no fsGroup).
    s.volume.set_owner(UID, UID, 0o600)?;
    let client = s.source("nowhere").start()?.finish()?;
    client.expect_code(1);
    let line = client.expect_line("the key file /keys/psk.txt exists but is not readable by");
    for needle in [ids.as_str(), "root:root 600", "fsGroup", "defaultMode"] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    assert!(crate::entrypoint::failure_filter(line), "{line}");
    Ok(())
}
