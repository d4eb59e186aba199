//! Root-only local checks: a mounted loop device as target, two destinations on one loop device, a second device
//! node of the volume as bench target, a read-only status directory.
//!
//! Each test prints `skipped: ... (<reason>)` and passes when it cannot run (not root, no `losetup`, no
//! `mkfs.ext4`, no mount). Loop devices are detached and mounts unmounted by drop guards, also when an assertion
//! fails. File systems are only ever mounted read-only: overwriting a read-write mounted file system under the
//! kernel can hang its unmount, and then every later `sync` on the machine.

use std::os::unix::fs::MetadataExt;

use anyhow::Result;
use blockmover::sample;

use super::files::both_agents_refuse_the_status_dir;
use super::target::{expect_bench_refused, second_destination_is_refused};
use super::MIB;
use crate::common::mounts::{run, LoopDevice, Mount};
use crate::common::{keygen, random_volume, run_source, Destination, Started, AGENT_TIMEOUT};
use crate::or_skip;

const SIZE: u64 = 16 * MIB;

#[test]
fn a_mounted_loop_device_is_refused_naming_the_mount_and_left_unchanged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = or_skip!(
        LoopDevice::on_sparse_file(&dir.path().join("fs.backing"), SIZE),
        "loop devices unavailable"
    );
    if let Err(e) = run("mkfs.ext4", &["-q".as_ref(), device.path.as_os_str()]) {
        println!("skipped: cannot make an ext4 file system ({e:#})");
        return Ok(());
    }
    // Read-only, always: see the module doc.
    let mount = or_skip!(
        Mount::new(&["-o".as_ref(), "ro".as_ref(), device.path.as_os_str()]),
        "cannot mount ext4 read-only"
    );
    let before = sample::file_digest(&device.path, SIZE)?;
    let psk = keygen(dir.path())?;
    let volume = dir.path().join("volume.img");
    random_volume(&volume, SIZE, 0x10ca_0101)?;
    let status = dir.path().join("destination.json");
    let (exit, source) = match Destination::start(&device.path, &psk, &status, &[])? {
        Started::Exited(exit) => (exit, None),
        Started::Listening(mut destination) => {
            let source = run_source(destination.addr, &volume, &psk, &dir.path().join("s.json"))?;
            (destination.wait(AGENT_TIMEOUT)?, Some(source))
        }
    };
    let expected = format!(
        "error: target {} is mounted at {}: refusing to overwrite a mounted filesystem",
        device.path.display(),
        mount.path().display()
    );
    assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
    assert_eq!(exit.error_line(), expected, "{}", exit.stderr);
    if let Some(source) = source {
        assert_eq!(
            source.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&source.stderr)
        );
    }
    assert_eq!(
        sample::file_digest(&device.path, SIZE)?,
        before,
        "the mounted device was written"
    );
    drop(mount);
    drop(device);
    Ok(())
}

#[test]
fn a_second_destination_on_a_loop_device_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = or_skip!(
        LoopDevice::on_sparse_file(&dir.path().join("target.backing"), SIZE),
        "loop devices unavailable"
    );
    let (volume, other) = (dir.path().join("volume.img"), dir.path().join("other.img"));
    random_volume(&volume, SIZE, 0x10ca_0111)?;
    random_volume(&other, SIZE, 0x10ca_0112)?;
    let refusal = second_destination_is_refused(dir.path(), &device.path, &volume, &other, SIZE)?;
    refusal.print();
    Ok(())
}

#[test]
fn bench_refuses_a_second_device_node_of_the_volume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = or_skip!(
        LoopDevice::on_sparse_file(&dir.path().join("volume.backing"), 4 * MIB),
        "loop devices unavailable"
    );
    random_volume(&device.path, 4 * MIB, 0x10ca_0121)?;
    let before = sample::file_digest(&device.path, 4 * MIB)?;
    let rdev = std::fs::metadata(&device.path)?.rdev();
    let node = dir.path().join("same-disk");
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    run(
        "mknod",
        &[
            node.as_os_str(),
            "b".as_ref(),
            major.to_string().as_ref(),
            minor.to_string().as_ref(),
        ],
    )?;
    expect_bench_refused(&device.path, &node, dir.path())?;
    assert_eq!(
        sample::file_digest(&device.path, 4 * MIB)?,
        before,
        "the volume was written"
    );
    Ok(())
}

#[test]
fn a_read_only_status_directory_stops_both_agents_at_start_up() -> Result<()> {
    let mount = or_skip!(
        Mount::new(&[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            "ro,size=1m".as_ref(),
            "tmpfs".as_ref(),
        ]),
        "cannot mount a read-only tmpfs"
    );
    both_agents_refuse_the_status_dir(mount.path(), "Read-only file system")
}
