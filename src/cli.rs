//! Command-line types (clap only), turned into the library's validated configurations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use blockmover::changes::{CbtConfig, CsiSnapshotMetadata, ExtentsFile, Tracker};
use blockmover::chunk::DEFAULT_CHUNK_SIZE;
use blockmover::delta::{Policy, Verify};
use blockmover::destination::DestinationConfig;
use blockmover::manifest::Store;
use blockmover::metrics::Labels;
use blockmover::net::Timeouts;
use blockmover::schedule::Schedule;
use blockmover::snapshot::{Hooks, Method, SnapshotConfig};
use blockmover::source::{Compression, SourceConfig};
use blockmover::status::Role;
use blockmover::tls::Psk;
use blockmover::volume::Source;

/// Replicate block volumes over TLS, sending only the 4 KiB blocks that changed.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new key file in VolSync's format (volsync:<128 hex digits>), mode 0600.
    Keygen {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Receive a sync into a target block device or file.
    Destination(DestinationArgs),
    /// Send a snapshot (block device or file) to a destination.
    Source(SourceArgs),
    /// Show status files like `kubectl get replicationsource` (or the whole document with -o yaml|json).
    Status(StatusArgs),
    /// Ask a running scheduled source for a sync now: writes TOKEN to <STATUS>.trigger.
    Trigger(TriggerArgs),
    /// Make a sample volume, sync it, change 1% in scattered 4 KiB writes, sync again, and print the figures.
    Demo(DemoArgs),
    /// Measure full and incremental syncs (duration, bytes on the wire, RSS, max RPO), optionally against rsync.
    Bench(crate::bench::BenchArgs),
}

/// Flags shared by both agents.
#[derive(Debug, Args)]
pub struct Common {
    /// Key file: <identity>:<hex secret> (VolSync rsync-tls format).
    #[arg(long)]
    pub psk: PathBuf,
    /// Write a VolSync-shaped status (JSON) here.
    #[arg(long)]
    pub status: Option<PathBuf>,
    /// Fail when the peer is silent this long (seconds, at least 1).
    #[arg(long, default_value_t = 600, value_parser = timeout_secs)]
    pub idle_timeout: u64,
    /// Limit on connect, TLS handshake, authentication and hello, each (seconds, at least 1).
    #[arg(long, default_value_t = 30, value_parser = timeout_secs)]
    pub handshake_timeout: u64,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9090, or port 0 for any).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// The `obj_name` metrics label (VolSync: the ReplicationSource/Destination name). Default: the file name of
    /// the volume or target.
    #[arg(long, env = "BLOCKMOVER_NAME")]
    pub name: Option<String>,
    /// The `obj_namespace` metrics label (VolSync: the object's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Cron schedule: five fields ("*/5 * * * *") or @hourly, @daily, @weekly, @monthly, @yearly (UTC).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Keep the manifest of the last synced image here, so that the next sync is a delta (one directory per
    /// volume, for both roles; see the README's "Delta syncs"). Without it a long-running agent keeps it in memory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --state-dir, keep the digests of every chunk's 4 KiB blocks there too (`on`): a delta then reads only
    /// the blocks that changed. They take up to 1/128 of the volume per role (8 GiB for 1 TiB); `off` keeps none
    /// (and removes those left there): a delta reads whole changed chunks instead.
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    pub block_digests: OnOff,
    /// `full`: compare everything in the next sync although a delta is possible (repairs what a delta missed).
    #[arg(long, value_enum, value_name = "MODE")]
    pub verify: Option<VerifyArg>,
    /// Compare in full after this many delta syncs (24), or when the last full comparison is older than a
    /// duration (90s, 30m, 12h, 7d), or never.
    #[arg(long, value_name = "N|DURATION", default_value = "24h", value_parser = blockmover::delta::Every::parse)]
    pub verify_every: blockmover::delta::Every,
    /// Scans read the parts of the volume (source) or target (destination) that are not in the page cache with
    /// O_DIRECT, in 1 MiB reads, instead of through the cache (a cold scan then reads at the storage's rate and
    /// does not fill the cache; the chunks a sync sends are read again from storage).
    #[arg(long)]
    pub direct_reads: bool,
}

/// `--block-digests` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Yes.
    On,
    /// No.
    Off,
}

/// `--verify` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyArg {
    /// A full comparison.
    Full,
}

/// The most a long-running agent without `--state-dir` keeps in memory for a manifest (32 bytes per chunk: a
/// 128 GiB volume at 64 KiB chunks).
const MEMORY_MANIFEST: u64 = 64 << 20;

impl Common {
    /// The parsed schedule, if any.
    pub fn schedule(&self) -> blockmover::Result<Option<Schedule>> {
        self.schedule
            .as_deref()
            .map(Schedule::parse)
            .transpose()
            .map_err(|e| blockmover::Error::Config(e.to_string()))
    }

    /// The object's name: `--name`, else the file name of `device`.
    fn name_of(&self, device: &std::path::Path) -> String {
        self.name.clone().unwrap_or_else(|| {
            device
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| "blockmover".to_owned())
        })
    }

    /// The metrics labels for `role`, naming the object after `device` unless `--name` is given.
    pub fn labels(&self, role: Role, device: &std::path::Path) -> Labels {
        Labels {
            name: self.name_of(device),
            namespace: self.namespace.clone(),
            role,
        }
    }

    /// `namespace/name`: who a source is, as its HELLO tells the destination.
    pub fn identity(&self, device: &std::path::Path) -> String {
        format!("{}/{}", self.namespace, self.name_of(device))
    }

    /// Where manifests live: `--state-dir`, else memory for a long-running agent, else nowhere.
    fn state(&self, long_running: bool) -> blockmover::Result<Arc<Store>> {
        let store = match &self.state_dir {
            Some(dir) => {
                let store = Store::dir(dir).map_err(|e| blockmover::Error::State(e.to_string()))?;
                match self.block_digests {
                    OnOff::On => store,
                    OnOff::Off => store.without_block_digests(),
                }
            }
            None if long_running => Store::memory(MEMORY_MANIFEST),
            None => Store::none(),
        };
        Ok(Arc::new(store))
    }

    fn verify(&self) -> Verify {
        Verify {
            full: self.verify == Some(VerifyArg::Full),
            every: self.verify_every,
        }
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(self.handshake_timeout),
            handshake: Duration::from_secs(self.handshake_timeout),
            idle: Duration::from_secs(self.idle_timeout),
        }
    }
}

/// `blockmover destination`.
#[derive(Debug, Args)]
pub struct DestinationArgs {
    /// Address to listen on, e.g. 0.0.0.0:8000 or 127.0.0.1:0.
    #[arg(long)]
    pub listen: String,
    /// Target block device or file (must exist and hold at least the volume).
    #[arg(long)]
    pub target: PathBuf,
    /// Keep accepting syncs instead of exiting after one.
    #[arg(long)]
    pub serve: bool,
    /// After the final fsync, read the whole target back and compare its volume digest with the source's before
    /// reporting success: catches another writer of the target during the sync, at the cost of one more read of
    /// the volume's size.
    #[arg(long)]
    pub read_back: bool,
    /// Chunks the source may announce beyond those settled (flow-control window; for testing).
    #[arg(long, hide = true, default_value_t = blockmover::destination::WINDOW)]
    pub window: u32,
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,
}

/// `blockmover source`.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Destination address, host:port.
    #[arg(long)]
    pub connect: String,
    /// The snapshot to send: block device, file, or NBD export (nbd+unix:///EXPORT?socket=PATH,
    /// nbd://HOST[:PORT]/EXPORT; see the README's "Source kinds").
    #[arg(long)]
    pub volume: PathBuf,
    /// First-level chunk size in bytes (power of two, 4096..=262144).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u32,
    /// zstd compression level (1..=22). Without it, `--compress auto` chooses it during the sync (from 1, up to 9
    /// while the link is what the sync waits for), and the other modes use 1.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_level: Option<i32>,
    /// When to compress: auto (changed blocks always; whole chunks of a first sync when that measures faster
    /// than sending them raw), always (fewest bytes), never (links faster than zstd).
    #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
    pub compress: CompressArg,
    /// The byte ranges changed since the last synced image, as JSON {"extents": [[offset, length], ...]}: the sync
    /// reads and hashes only those (a delta by change list; trusted: see the README's "Delta syncs").
    #[arg(long, value_name = "FILE")]
    pub changed_extents: Option<PathBuf>,
    /// With an NBD volume: take the change list since the last synced image from the export's dirty bitmap NAME
    /// (`qemu:dirty-bitmap:NAME`; trusted: see the README's "Source kinds").
    #[arg(long, value_name = "NAME", conflicts_with = "changed_extents")]
    pub dirty_bitmap: Option<String>,
    /// One sync for this manual trigger token, skipped when the status file's lastManualSync already equals it.
    #[arg(long, value_name = "TOKEN", conflicts_with = "schedule")]
    pub manual: Option<String>,
    /// How the point-in-time copy is taken: none (the volume is one already: a CSI snapshot's clone, an NBD
    /// export of a backup job), or reflink (a FICLONE clone of a file volume on XFS or btrfs, removed after the
    /// sync; with --state-dir the last synced clone is kept and the next change list comes from the extent maps).
    #[arg(long, value_enum, default_value_t = SnapshotArg::None)]
    pub snapshot: SnapshotArg,
    /// A command run (sh -c) before the copy is taken, e.g. `fsfreeze --freeze /mnt`; its failure fails the sync.
    #[arg(long, value_name = "CMD")]
    pub pre_snapshot: Option<String>,
    /// A command run after the copy is taken, whenever the pre-snapshot command ran (e.g. the thaw).
    #[arg(long, value_name = "CMD")]
    pub post_snapshot: Option<String>,
    /// At most this many bytes per second on the wire (TLS included), e.g. 50M, 800KB: K, M, G are powers of
    /// 1024 and KB, MB, GB powers of 1000; a bare number is bytes. At least 64K.
    #[arg(long, value_name = "RATE", value_parser = blockmover::ratelimit::parse_rate)]
    pub bwlimit: Option<u64>,
    /// Reads kept in flight on the volume, 1..=256 (network disks give their throughput only with many).
    /// Default: the number of cores for a regular file (a delta by change list asks the kernel for each round of
    /// its scattered reads at once), 16 for a block device or an NBD export.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub read_depth: Option<u16>,
    /// Seconds each snapshot hook may run before it is killed (the sync then fails, retryable).
    #[arg(long, default_value_t = 60, value_parser = timeout_secs)]
    pub hook_timeout: u64,
    /// The change list and allocation map from CSI changed block tracking (boxed: most sources have none).
    #[command(flatten)]
    pub cbt: Box<CbtArgs>,
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,
}

/// `--snapshot` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotArg {
    /// Read the volume as it is.
    None,
    /// Clone the file volume with FICLONE.
    Reflink,
}

/// `source --cbt-*`: CSI changed block tracking (the Kubernetes SnapshotMetadata service, KEP-3314).
#[derive(Debug, Args)]
pub struct CbtArgs {
    /// The SnapshotMetadata gRPC service (the external-snapshot-metadata sidecar), HOST:PORT: the change list
    /// since --cbt-base-snapshot-id and the allocation map of a full comparison (trusted: see the README's "Source
    /// kinds: CSI changed block tracking"). One sync per snapshot: not with --schedule.
    #[arg(long, value_name = "HOST:PORT", value_parser = host_port, conflicts_with_all = ["changed_extents", "schedule"],
          requires_all = ["cbt_ca", "cbt_token_file", "cbt_namespace", "cbt_snapshot"])]
    pub cbt_endpoint: Option<String>,
    /// PEM CA certificate that signs the sidecar's certificate.
    #[arg(long, value_name = "FILE", requires = "cbt_endpoint")]
    pub cbt_ca: Option<PathBuf>,
    /// The service account token, sent as security_token (read again for every sync).
    #[arg(long, value_name = "FILE", requires = "cbt_endpoint")]
    pub cbt_token_file: Option<PathBuf>,
    /// The namespace of the VolumeSnapshots.
    #[arg(long, value_name = "NS", requires = "cbt_endpoint")]
    pub cbt_namespace: Option<String>,
    /// The VolumeSnapshot being synced (--volume is its clone).
    #[arg(long, value_name = "NAME", requires = "cbt_endpoint")]
    pub cbt_snapshot: Option<String>,
    /// The CSI snapshot handle of the snapshot the last sync read: the base of the change list.
    #[arg(long, value_name = "ID", requires = "cbt_endpoint")]
    pub cbt_base_snapshot_id: Option<String>,
    /// The name the sidecar's certificate must carry, when not the endpoint's host (e.g. an IP endpoint).
    #[arg(long, value_name = "NAME", requires = "cbt_endpoint")]
    pub cbt_server_name: Option<String>,
    /// The limit on connecting to the service, on each call's answer and on each message (seconds, at least 1).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = timeout_secs)]
    pub cbt_timeout: u64,
    /// Ranges asked per response message (max_results; for testing).
    #[arg(long, hide = true, default_value_t = blockmover::changes::cbt::DEFAULT_MAX_RESULTS,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub cbt_max_results: u32,
}

impl CbtArgs {
    /// The tracker, when `--cbt-endpoint` is given (clap has checked the flags it needs).
    fn tracker(&self) -> Option<Arc<dyn Tracker>> {
        let endpoint = self.cbt_endpoint.clone()?;
        Some(Arc::new(CsiSnapshotMetadata::new(CbtConfig {
            endpoint,
            ca: self.cbt_ca.clone().unwrap_or_default(),
            token_file: self.cbt_token_file.clone().unwrap_or_default(),
            namespace: self.cbt_namespace.clone().unwrap_or_default(),
            snapshot: self.cbt_snapshot.clone().unwrap_or_default(),
            base_snapshot_id: self.cbt_base_snapshot_id.clone(),
            server_name: self.cbt_server_name.clone(),
            timeout: Duration::from_secs(self.cbt_timeout),
            max_results: self.cbt_max_results,
        })))
    }
}

/// `HOST:PORT` with a non-empty host and a port number.
fn host_port(text: &str) -> Result<String, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "not HOST:PORT".to_owned())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err("not HOST:PORT".to_owned());
    }
    port.parse::<u16>()
        .map_err(|e| format!("port {port:?}: {e}"))?;
    Ok(text.to_owned())
}

/// How `blockmover status` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns like `kubectl get`.
    Table,
    /// The whole status document as YAML.
    Yaml,
    /// The whole status document as JSON.
    Json,
}

/// `blockmover status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Status files written by `--status`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `blockmover trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// The status file of the running source (its `--status`).
    pub status: PathBuf,
    /// The manual trigger token; recorded as lastManualSync once synced. Default: the current time.
    pub token: Option<String>,
}

/// `blockmover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample volume size in MiB.
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Share of 4 KiB blocks changed between the two syncs, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// Seed of the sample data and of the change.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Work here instead of a temporary directory (kept afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl DestinationArgs {
    /// The validated configuration.
    pub fn config(&self) -> blockmover::Result<DestinationConfig> {
        use blockmover::destination::{MIN_WINDOW, WINDOW};
        if !(MIN_WINDOW..=WINDOW * 8).contains(&self.window) {
            return Err(blockmover::Error::Config(format!(
                "--window must be from {MIN_WINDOW} to {}",
                WINDOW * 8
            )));
        }
        let schedule = self.common.schedule()?;
        if schedule.is_some() && !self.serve {
            return Err(blockmover::Error::Config(
                "--schedule on the destination needs --serve (a one-shot destination serves one sync)".into(),
            ));
        }
        if let Some(status) = &self.common.status {
            refuse_same(status, "status file", &self.target, "target")?;
        }
        refuse_same(&self.common.psk, "key file", &self.target, "target")?;
        Ok(DestinationConfig {
            schedule,
            metrics: None,
            window: self.window,
            listen: self.listen.clone(),
            target: self.target.clone(),
            psk: Psk::load(&self.common.psk)?,
            status: self.common.status.clone(),
            serve: self.serve,
            timeouts: self.common.timeouts(),
            read_back: self.read_back,
            direct_reads: self.common.direct_reads,
            state: self.common.state(self.serve)?,
            verify: self.common.verify(),
        })
    }
}

impl SourceArgs {
    /// The validated configuration.
    pub fn config(&self) -> blockmover::Result<SourceConfig> {
        blockmover::chunk::Geometry::new(0, self.chunk_size).map_err(blockmover::Error::Config)?;
        let volume = match (self.source()?, &self.dirty_bitmap) {
            (Source::Nbd { address, .. }, Some(b)) if !b.is_empty() => Source::Nbd {
                address,
                dirty_bitmap: Some(b.clone()),
            },
            (_, Some(_)) => {
                return Err(blockmover::Error::Config(
                    "--dirty-bitmap needs an NBD volume (--volume nbd+unix:///EXPORT?socket=PATH) and a name".into(),
                ))
            }
            (v, None) => v,
        };
        if let (Some(status), Some(path)) = (&self.common.status, volume.file()) {
            refuse_same(status, "status file", path, "volume")?;
        }
        let snapshot = self.snapshot()?;
        Ok(SourceConfig {
            connect: self.connect.clone(),
            identity: self.identity(&volume),
            volume,
            psk: Psk::load(&self.common.psk)?,
            chunk_size: self.chunk_size,
            zstd_level: self.zstd_level,
            compression: match self.compress {
                CompressArg::Auto => Compression::Auto,
                CompressArg::Always => Compression::Always,
                CompressArg::Never => Compression::Never,
            },
            timeouts: self.common.timeouts(),
            state: self.common.state(self.common.schedule.is_some())?,
            tracker: self
                .changed_extents
                .clone()
                .map(|p| Arc::new(ExtentsFile::new(p)) as Arc<dyn Tracker>)
                .or_else(|| self.cbt.tracker()),
            verify: Arc::new(Policy::new(self.common.verify())),
            snapshot,
            bwlimit: self.bwlimit,
            read_depth: self.read_depth.map(usize::from),
            direct_reads: self.common.direct_reads,
        })
    }

    /// `--snapshot` and its hooks.
    fn snapshot(&self) -> blockmover::Result<SnapshotConfig> {
        let method = match self.snapshot {
            SnapshotArg::None => Method::None,
            SnapshotArg::Reflink => Method::Reflink,
        };
        let hooked = self.pre_snapshot.is_some() || self.post_snapshot.is_some();
        if hooked && method == Method::None {
            return Err(blockmover::Error::Config(
                "--pre-snapshot and --post-snapshot run around the copy that --snapshot takes; without \
                 --snapshot blockmover takes none"
                    .into(),
            ));
        }
        if method == Method::Reflink && Source::parse(self.volume.as_os_str())?.file().is_none() {
            return Err(blockmover::Error::Config(
                "--snapshot reflink clones a file volume; an NBD export is a point-in-time copy already".into(),
            ));
        }
        if method == Method::Reflink && self.changed_extents.is_some() {
            return Err(blockmover::Error::Config(
                "--changed-extents and --snapshot reflink both give the change list; choose one"
                    .into(),
            ));
        }
        if method == Method::Reflink && self.cbt.cbt_endpoint.is_some() {
            return Err(blockmover::Error::Config(
                "--cbt-endpoint and --snapshot reflink both give the change list; choose one"
                    .into(),
            ));
        }
        Ok(SnapshotConfig {
            method,
            hooks: Hooks {
                pre: self.pre_snapshot.clone(),
                post: self.post_snapshot.clone(),
                timeout: std::time::Duration::from_secs(self.hook_timeout),
            },
            keep_base: self.common.state_dir.is_some() || self.common.schedule.is_some(),
        })
    }
}

impl SourceArgs {
    /// What `--volume` names: a file or device, or an NBD export.
    fn source(&self) -> blockmover::Result<Source> {
        Source::parse(self.volume.as_os_str())
    }

    /// What names the source's metrics by default (`--name` unset): the volume's path, or an NBD export's name.
    pub fn label_device(&self) -> blockmover::Result<PathBuf> {
        Ok(match self.source()? {
            Source::File(p) => p,
            Source::Nbd { address, .. } if address.export.is_empty() => PathBuf::from("nbd"),
            Source::Nbd { address, .. } => PathBuf::from(address.export),
        })
    }

    /// `namespace/name` (HELLO, the manifest's identity); without `--name`, an NBD source is named by its URI.
    fn identity(&self, volume: &Source) -> String {
        match (volume, &self.common.name) {
            (Source::Nbd { address, .. }, None) => format!("{}/{address}", self.common.namespace),
            (Source::File(p), _) => self.common.identity(p),
            (Source::Nbd { .. }, Some(_)) => self.common.identity(Path::new("")),
        }
    }
}

/// A timeout flag: whole seconds, at least 1 (0 would fail every phase at once; it never means "no timeout").
fn timeout_secs(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("a timeout must be at least 1 second".to_owned()),
        Ok(secs) => Ok(secs),
        Err(e) => Err(format!("not a whole number of seconds ({e})")),
    }
}

/// Refuses `a` (an existing file the agent writes) being the same file as `b` (the volume or target), through
/// symlinks, hard links and device nodes ([`blockmover::volume::same_file`]). Nothing to check while `a` does not
/// exist; a `b` that cannot be looked at is reported where it is opened.
fn refuse_same(a: &Path, a_what: &str, b: &Path, b_what: &str) -> blockmover::Result<()> {
    if !a.exists() {
        return Ok(());
    }
    match blockmover::volume::same_file(a, b) {
        Ok(true) => Err(blockmover::Error::Config(format!(
            "the {a_what} {} is the {b_what} {}: they must be different files",
            a.display(),
            b.display()
        ))),
        Ok(false) | Err(_) => Ok(()),
    }
}

/// `--compress` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    /// Changed blocks always; whole chunks of a first sync when that measures faster than raw.
    Auto,
    /// Every payload that compresses.
    Always,
    /// No payload.
    Never,
}
