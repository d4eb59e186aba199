//! The scenario the container tests share: a podman network, the volume and target loop devices with the owners
//! and modes a cluster gives them ([`Shape`]), the key Secret laid out as the kubelet does, and the mover
//! containers ([`Pod`]) started on them with the mover pod's security context.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use blockmover::sample::{self, SampleSpec};

use super::podman::{Container, Engine, LoopDevice, Network, Ran};
use crate::entrypoint::chain_matches;

/// The pod's uid and gid (the image's USER).
pub const UID: u32 = 65532;
/// Debian's `disk` group, which owns block device nodes on a node.
pub const DISK_GID: u32 = 6;
/// A pod `fsGroup` other than the pod's gid.
pub const FS_GROUP: u32 = 2000;

pub const MIB: u64 = 1 << 20;
/// The volume of most scenarios: holes, text-like and random regions.
pub const SIZE: u64 = 32 * MIB;

/// Owner, group and mode of a device node or key file.
pub type Owner = (u32, u32, u32);

/// How a cluster hands the mover pod its device and its key Secret.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// containerd / CRI-O with `device_ownership_from_security_context`: the device node is owned by
    /// runAsUser:runAsGroup; the key is `root:fsGroup 0640` with fsGroup = runAsGroup.
    OwnedByPodUser,
    /// The node's `root:disk 0660` device with `disk` in supplementalGroups; the key `root:fsGroup 0640` with an
    /// fsGroup the pod gets as a supplementary group.
    DiskGroup,
    /// A privileged mover: uid 0 (still without capabilities); device and key `root:root 0600`.
    Privileged,
    /// A non-root mover given the node's `root:root 0600` device and no fsGroup: it can open neither.
    Unprepared,
}

impl Shape {
    /// (device owner, group, mode), (key owner, group, mode), podman's `--user` and `--group-add`s.
    pub fn layout(self) -> (Owner, Owner, String, Vec<u32>) {
        let pod = format!("{UID}:{UID}");
        match self {
            Shape::OwnedByPodUser => ((UID, UID, 0o660), (0, UID, 0o640), pod, vec![]),
            Shape::DiskGroup => (
                (0, DISK_GID, 0o660),
                (0, FS_GROUP, 0o640),
                pod,
                vec![DISK_GID, FS_GROUP],
            ),
            Shape::Privileged => ((0, 0, 0o600), (0, 0, 0o600), "0:0".into(), vec![]),
            Shape::Unprepared => ((0, 0, 0o600), (0, 0, 0o600), pod, vec![]),
        }
    }
}

/// Prints how long a scenario took when it ends.
pub struct Timer(&'static str, Instant);

impl Drop for Timer {
    fn drop(&mut self) {
        println!(
            "container scenario {:?}: {:.1} s",
            self.0,
            self.1.elapsed().as_secs_f64()
        );
    }
}

pub fn timer(what: &'static str) -> Timer {
    Timer(what, Instant::now())
}

/// A network, a volume and a target loop device, and the key Secret, for one scenario. Fields drop in order:
/// the devices are detached only after every container using them is gone (containers are locals of the test,
/// dropped before it).
pub struct Scenario {
    pub engine: &'static Engine,
    pub shape: Shape,
    pub network: Network,
    pub volume: LoopDevice,
    pub target: LoopDevice,
    pub size: u64,
    pub dir: tempfile::TempDir,
}

/// Which entrypoint a container runs.
#[derive(Clone, Copy)]
pub enum Role {
    Destination,
    Source,
}

/// One mover container to start: its name, env and key Secret.
pub struct Pod<'a> {
    scenario: &'a Scenario,
    role: Role,
    name: String,
    env: Vec<String>,
    keys: PathBuf,
    device: bool,
    address: Option<(String, String)>,
    tmp: Option<PathBuf>,
}

impl Scenario {
    pub fn new(engine: &'static Engine, spec: &SampleSpec, shape: Shape) -> Result<Scenario> {
        let dir = tempfile::tempdir()?;
        for name in ["volume.img", "target.img"] {
            std::fs::File::create(dir.path().join(name))?.set_len(spec.size)?;
        }
        let volume = LoopDevice::attach(&dir.path().join("volume.img"))?;
        let target = LoopDevice::attach(&dir.path().join("target.img"))?;
        sample::write_sample_volume(&volume.path, spec)?;
        let scenario = Scenario {
            engine,
            shape,
            network: Network::create(engine)?,
            volume,
            target,
            size: spec.size,
            dir,
        };
        let (device, key, _, _) = shape.layout();
        for node in [&scenario.volume, &scenario.target] {
            node.set_owner(device.0, device.1, device.2)?;
        }
        scenario.key_secret("keys", key)?;
        Ok(scenario)
    }

    /// A key Secret volume as the kubelet lays it out: DIR/NAME/psk.txt -> ..data/psk.txt, the file with `owner`
    /// (uid, gid, mode). Returns the directory.
    pub fn key_secret(&self, name: &str, owner: Owner) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let keys = self.dir.path().join(name);
        let data = keys.join("..data");
        std::fs::create_dir_all(&data)?;
        for dir in [&keys, &data] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let key = data.join("psk.txt");
        if !key.exists() {
            let made = crate::common::keygen_named(self.dir.path(), &format!("{name}.psk"))?;
            std::fs::rename(made, &key)?;
            std::os::unix::fs::symlink("..data/psk.txt", keys.join("psk.txt"))?;
        }
        std::os::unix::fs::chown(&key, Some(owner.0), Some(owner.1))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(owner.2))?;
        Ok(keys)
    }

    pub fn pod(&self, role: Role, name: &str) -> Pod<'_> {
        Pod {
            scenario: self,
            role,
            name: name.to_owned(),
            env: Vec::new(),
            keys: self.dir.path().join("keys"),
            device: true,
            address: None,
            tmp: None,
        }
    }

    /// The destination `name` (a new unique name when None), started and listening.
    pub fn destination(&self, name: &str) -> Result<Container> {
        let mut server = self.pod(Role::Destination, name).start()?;
        server.wait_for("listening on ", 1)?;
        Ok(server)
    }

    /// The source, sending to the destination container `destination`.
    pub fn source(&self, destination: &str) -> Pod<'_> {
        let name = self.engine.unique_name("src");
        self.pod(Role::Source, &name)
            .env("DESTINATION_ADDRESS", destination)
    }

    /// One whole sync: a new destination, then a source; both ended.
    pub fn sync(&self) -> Result<(Ran, Ran)> {
        let name = self.engine.unique_name("dst");
        let server = self.destination(&name)?;
        let client = self.source(&name).start()?.finish()?;
        Ok((server.finish()?, client))
    }

    pub fn expect_target_matches_volume(&self) -> Result<()> {
        let volume = sample::file_digest(&self.volume.path, self.size)?;
        let target = sample::file_digest(&self.target.path, self.size)?;
        assert_eq!(target, volume, "the target differs from the volume");
        Ok(())
    }

    /// Both entrypoints exited 0, the target holds the volume, and VolSync would show the summary lines.
    pub fn expect_success(&self, server: &Ran, client: &Ran) -> Result<()> {
        client.expect_code(0);
        server.expect_code(0);
        self.expect_target_matches_volume()?;
        for ran in [client, server] {
            let logs = ran.volsync_logs(false);
            let kept = logs
                .lines()
                .any(|l| chain_matches(l, &["sent", "bytes", "received", "bytes"]))
                && logs.contains("total size is")
                && logs.contains("blockmover: rsync completed in ");
            ran.check(kept, &format!("VolSync would keep only {logs:?}"));
        }
        Ok(())
    }
}

impl Pod<'_> {
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push(format!("{name}={value}"));
        self
    }

    pub fn keys(mut self, keys: PathBuf) -> Self {
        self.keys = keys;
        self
    }

    /// A fixed IP and MAC address on the network, as a Service's ClusterIP outlives the pods behind it (the MAC
    /// too: the source's neighbour cache would otherwise send to the old one until the entry expires).
    pub fn address(mut self, address: (String, String)) -> Self {
        self.address = Some(address);
        self
    }

    /// A host directory at `/tmp` instead of a tmpfs, so that the status file outlives the container.
    pub fn tmp(mut self, dir: PathBuf) -> Self {
        self.tmp = Some(dir);
        self
    }

    /// No `/dev/block` at all (a filesystem PVC, or none).
    pub fn without_device(mut self) -> Self {
        self.device = false;
        self
    }

    pub fn start(self) -> Result<Container> {
        let s = self.scenario;
        let (_, _, user, groups) = s.shape.layout();
        // /tmp: a tmpfs, or a host directory standing for an emptyDir that outlives the container.
        let tmp = match &self.tmp {
            Some(dir) => ["-v".to_owned(), format!("{}:/tmp", dir.display())],
            None => ["--tmpfs".to_owned(), "/tmp".to_owned()],
        };
        let mut args: Vec<String> = [
            "--network",
            &s.network.name,
            "--read-only",
            &tmp[0],
            &tmp[1],
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--user",
            &user,
        ]
        .map(str::to_owned)
        .into();
        for group in groups {
            args.extend(["--group-add".into(), group.to_string()]);
        }
        args.extend(["-v".into(), format!("{}:/keys:ro", self.keys.display())]);
        let script = match self.role {
            Role::Destination => {
                if self.device {
                    let device = format!("{}:/dev/block", s.target.path.display());
                    args.extend(["--device".into(), device]);
                }
                "/mover-rsync-tls/server.sh"
            }
            Role::Source => {
                if self.device {
                    // The source's PVC is mounted read-only: the device cgroup lets it only read.
                    let device = format!("{}:/dev/block:r", s.volume.path.display());
                    args.extend(["--device".into(), device]);
                }
                "/mover-rsync-tls/client.sh"
            }
        };
        if let Some((ip, mac)) = self.address {
            args.extend(["--ip".into(), ip, "--mac-address".into(), mac]);
        }
        for env in self.env {
            args.extend(["-e".into(), env]);
        }
        args.extend([s.engine.image.clone(), "/bin/bash".into(), "-c".into()]);
        args.push(script.into());
        Container::start(s.engine, &self.name, &args)
    }
}
