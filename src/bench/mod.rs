//! `blockmover bench`: full and incremental syncs between separate agent processes over loopback TLS, measured
//! (duration, scan rate, bytes on the wire, peak RSS, max RPO, hashing against the raw BLAKE3 rate) and optionally
//! compared with rsync and VolSync's rsync-tls on the same volume and change, in the same run.
//!
//! Layout: `scenario` runs the syncs, `change` writes the change (and its change list, and undoes it on a target),
//! `agents` starts blockmover's agents, `rsync` the comparisons, `procs` the process guards and RSS probes,
//! `hashrate` the raw rate, `files` the untimed file work, `report` the table and JSON, `notes` the notes under
//! it, `chart` the SVG.

mod agents;
mod cache;
mod change;
mod chart;
mod coldscan;
mod compare;
mod delay;
mod files;
mod floor;
mod hashrate;
mod notes;
mod procs;
mod repeat;
mod report;
mod rsync;
mod scenario;
mod storage;
mod wait;

use std::path::PathBuf;

use anyhow::{bail, ensure, Context};

use rsync::Flavour;

/// `blockmover bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Volume size in MiB of the generated sample volume; several, separated by commas, run one after the other
    /// (each with every --change-percent).
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    pub size_mib: Vec<u64>,
    /// Relative share of all-zero 1 MiB regions in the sample volume (sparse holes).
    #[arg(long, default_value_t = 1.0)]
    pub zero_share: f64,
    /// Relative share of compressible text regions.
    #[arg(long, default_value_t = 1.0)]
    pub text_share: f64,
    /// Relative share of incompressible random regions.
    #[arg(long, default_value_t = 1.0)]
    pub random_share: f64,
    /// Seed of the sample volume and of the change (same seed, same bytes on every machine).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Change between the full and the incremental sync, percent of the volume's 4 KiB blocks; several,
    /// separated by commas, are written and synced one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub change_percent: Vec<f64>,
    /// Fraction (0..=1) of the changed blocks written as clustered runs (extents) instead of scattered 4 KiB
    /// writes.
    #[arg(long, default_value_t = 0.0)]
    pub clustered_share: f64,
    /// Length of a clustered run, in 4 KiB blocks: `N`, or `MIN-MAX` for lengths drawn uniformly between.
    #[arg(long, default_value = "16", value_parser = parse_runs)]
    pub run_blocks: (u64, u64),
    /// Fraction (0..=1) of the change's writes (4 KiB blocks or runs) that write English-like text instead of
    /// random bytes.
    #[arg(long, default_value_t = 0.0)]
    pub change_text_share: f64,
    /// A preset workload, which replaces the region shares, --clustered-share, --run-blocks and
    /// --change-text-share: `vm` (zeros, text, random 1:1:1; half the change in scattered 4 KiB writes, half in
    /// runs of 16-256 KiB; half the writes text), `text` (text-heavy: 1:4:1, 90% of the writes text), `random`
    /// (random-heavy: 1:1:4, every write random).
    #[arg(long, value_enum)]
    pub workload: Option<Workload>,
    /// Use this existing volume (file or block device) instead of a generated one; needs --target.
    #[arg(long, requires = "target")]
    pub volume: Option<PathBuf>,
    /// Sync into this existing target (file or block device, at least the volume's size); needs --volume. A
    /// regular file is emptied first (sparse), so the first sync is a full one. Its contents are overwritten.
    #[arg(long, requires = "volume")]
    pub target: Option<PathBuf>,
    /// With --volume: write the change into the volume (otherwise the second sync runs on an unchanged volume).
    #[arg(long, requires = "volume")]
    pub modify_volume: bool,
    /// Sync interval in seconds, for max RPO = interval + sync duration.
    #[arg(long, default_value_t = 60.0)]
    pub interval: f64,
    /// Also run each blockmover incremental sync again, from the same target state, through a proxy that adds
    /// this round-trip time (milliseconds) on loopback, and print how much longer it took.
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Run every blockmover source with `--bwlimit RATE` (e.g. 50M) and print the rate each achieved against it.
    #[arg(long, value_name = "RATE", value_parser = blockmover::ratelimit::parse_rate)]
    pub bwlimit: Option<u64>,
    /// Run every volume size in --sizes with every change rate in --rates.
    #[arg(long, conflicts_with = "volume")]
    pub sweep: bool,
    /// Volume sizes in MiB for --sweep.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub sizes: Vec<u64>,
    /// Change rates in percent for --sweep.
    #[arg(long, value_delimiter = ',', default_value = "0.1,1,10")]
    pub rates: Vec<f64>,
    /// Also run these on the same volume and change: rsync (daemon on loopback, --inplace --no-whole-file -z),
    /// volsync-rsync-tls (-aAhHSxz through stunnel with the PSK). Repeat or separate with commas.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub compare: Vec<Flavour>,
    /// Run each incremental sync of a change this many times from the same target state, every tool once per
    /// round, and show the median run of each (all durations listed under the table, and in the JSON).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub repeat: u32,
    /// Print JSON on stdout instead of the table (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Draw sync duration and bytes on the wire against change rate and volume size into this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Before each timed sync, write zeros over every hole of the volume and the targets (regular files), so that
    /// every byte is allocated as on a block PVC and no reader can skip a hole.
    #[arg(long)]
    pub allocated: bool,
    /// Before each timed sync, write back and drop the volume and the target from the page cache (fsync, then
    /// posix_fadvise DONTNEED), as for a fresh snapshot clone; the note says how much stayed cached.
    #[arg(long)]
    pub cold: bool,
    /// Also sync each change as a delta: the blockmover full sync runs with --state-dir on both agents, and each
    /// change is synced again from the same target with the manifests (delta-manifest) and with the manifests and
    /// the exact change list (delta-changelist, source --changed-extents), besides the stateless row.
    #[arg(long, visible_alias = "state")]
    pub delta: bool,
    /// With --delta, a row more: the source takes a reflink clone of the volume (source --snapshot reflink) and
    /// its change list comes from the extent maps of that clone and the one kept by the last sync, as a tracker
    /// would give it. The volume's directory (--dir) must be on XFS or btrfs.
    #[arg(long, requires = "delta")]
    pub reflink: bool,
    /// A flag for every blockmover source, e.g. `--source-arg=--zstd-level=3` or `--source-arg=--compress=always`;
    /// repeat for more.
    #[arg(long, allow_hyphen_values = true)]
    pub source_arg: Vec<String>,
    /// A flag for every blockmover destination, e.g. `--destination-arg=--direct-reads`; repeat for more.
    #[arg(long, allow_hyphen_values = true)]
    pub destination_arg: Vec<String>,
    /// Keep volumes, targets, logs and status files in this directory instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The preset workloads of `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// A VM disk: zeros, text and random regions alike; half the writes text.
    Vm,
    /// Text-heavy: mostly text regions, 90% of the writes text.
    Text,
    /// Random-heavy: mostly random regions, every write random.
    Random,
}

/// `N` or `MIN-MAX` blocks.
fn parse_runs(text: &str) -> Result<(u64, u64), String> {
    let number = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|e| format!("{t:?} is not a number of blocks: {e}"))
    };
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => (number(text)?, number(text)?),
    };
    if min == 0 || max < min {
        return Err(format!("runs need 1 <= MIN <= MAX blocks, not {text}"));
    }
    Ok((min, max))
}

impl BenchArgs {
    /// These arguments with `--workload`'s preset applied.
    fn resolved(mut self) -> Self {
        let Some(w) = self.workload else {
            return self;
        };
        let (shares, text) = match w {
            Workload::Vm => ([1.0, 1.0, 1.0], 0.5),
            Workload::Text => ([1.0, 4.0, 1.0], 0.9),
            Workload::Random => ([1.0, 1.0, 4.0], 0.0),
        };
        [self.zero_share, self.text_share, self.random_share] = shares;
        self.change_text_share = text;
        self.clustered_share = 0.5;
        self.run_blocks = (4, 64);
        self
    }

    /// The volume sizes to run, MiB: --sizes with --sweep, else --size-mib.
    fn size_list(&self) -> &[u64] {
        if self.sweep {
            &self.sizes
        } else {
            &self.size_mib
        }
    }

    /// The change rates to run, percent: --rates with --sweep, else --change-percent.
    fn rate_list(&self) -> &[f64] {
        if self.sweep {
            &self.rates
        } else {
            &self.change_percent
        }
    }

    /// Checks the numbers that clap cannot.
    fn validate(&self) -> anyhow::Result<()> {
        let rates = self.rate_list();
        for rate in rates {
            ensure!(
                (0.0..=100.0).contains(rate),
                "change rates must be between 0 and 100 percent, not {rate}"
            );
        }
        let sizes = self.size_list();
        ensure!(!sizes.is_empty(), "--sizes needs at least one size");
        ensure!(!rates.is_empty(), "--rates needs at least one rate");
        ensure!(
            self.volume.is_none() || self.size_mib.len() == 1,
            "--size-mib takes one size with --volume (it is not used then)"
        );
        ensure!(
            sizes.iter().all(|s| *s > 0),
            "volume sizes must be at least 1 MiB"
        );
        ensure!(
            (0.0..=1.0).contains(&self.clustered_share),
            "--clustered-share must be between 0 and 1"
        );
        ensure!(
            (0.0..=1.0).contains(&self.change_text_share),
            "--change-text-share must be between 0 and 1"
        );
        ensure!(
            self.interval.is_finite() && self.interval >= 0.0,
            "--interval must be a number of seconds"
        );
        if let (Some(volume), Some(target)) = (&self.volume, &self.target) {
            // By identity, not by name: a symlink, a hard link or a second device node of the volume as the
            // target would have the bench overwrite the volume (and then verify the copy against itself).
            let same = volume == target
                || match blockmover::volume::same_file(volume, target) {
                    Ok(same) => same,
                    // A target that does not exist yet is created; a missing volume is reported when read.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => bail!(
                        "cannot compare --volume {} with --target {}: {e}",
                        volume.display(),
                        target.display()
                    ),
                };
            if same {
                bail!(
                    "--target {} is the same file or device as --volume {}: the bench would overwrite the volume",
                    target.display(),
                    volume.display()
                );
            }
        }
        Ok(())
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let args = args.resolved();
    args.validate()?;
    tokio::task::spawn_blocking(move || run_blocking(&args))
        .await
        .context("the bench thread failed")?
}

fn run_blocking(args: &BenchArgs) -> anyhow::Result<()> {
    let mut tmp = None;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("blockmover-bench")
                .tempdir()?;
            let path = t.path().to_owned();
            tmp = Some(t);
            path
        }
    };
    let report = match scenario::run(args, &dir) {
        Ok(report) => report,
        Err(e) => {
            if let Some(t) = tmp {
                // Keep the logs and status files of a failed run; drop the (large) volume images.
                let kept = t.keep();
                remove_images(&kept);
                eprintln!(
                    "bench: kept the logs and status files in {}",
                    kept.display()
                );
            }
            return Err(e);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::table(&report));
    }
    if let Some(svg) = &args.svg {
        chart::write_svg(&report, svg)?;
        eprintln!("bench: wrote the chart to {}", svg.display());
    }
    Ok(())
}

/// Removes the `*.img` files (volumes and targets) under `dir`, best effort.
fn remove_images(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_images(&path);
        } else if path.extension().is_some_and(|e| e == "img") {
            let _ = std::fs::remove_file(&path);
        }
    }
}
