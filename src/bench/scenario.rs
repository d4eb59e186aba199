//! The syncs of one bench run, in order: for each volume size a full sync by every tool, then for each change rate
//! the change and an incremental sync by every tool (blockmover: stateless, and with `--delta` with manifests and
//! with manifests and a change list). Every incremental starts from the same state (its own target after the
//! previous sync, equal to the volume before the change), and every target is checked against the volume (BLAKE3
//! of the whole volume) after every sync.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};

use blockmover::sample::{self, SampleSpec};

use super::agents::{Agents, SyncOptions};
use super::cache;
use super::change::{self, Rollback};
use super::files::{
    device_or_file_size, durable, is_block_device, load_average, prepare_target, stamp_mtime,
    verify,
};
use super::hashrate::{self, HashRate};
use super::notes;
use super::repeat;
use super::report::{
    bytes, trim_float, Report, SyncKind, SyncRow, BLOCKMOVER, CHANGELIST, DELAYED, MANIFEST,
    REFLINK,
};
use super::rsync::{self, Flavour, RsyncSetup};
use super::storage;
use super::BenchArgs;

const MIB: u64 = 1 << 20;

/// Runs every sync the flags ask for, with work files in `dir`.
pub fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Report> {
    let load = load_average();
    eprintln!("bench: measuring the raw all-core BLAKE3 rate");
    let raw = hashrate::measure();
    let mut bench = Bench {
        args,
        agents: Agents::new(dir)?
            .with_bwlimit(args.bwlimit)
            .with_source_args(&args.source_arg)
            .with_destination_args(&args.destination_arg),
        setups: Vec::new(),
        rows: Vec::new(),
        raw: raw.clone(),
        dir: dir.to_owned(),
        cached: Vec::new(),
        floors: Vec::new(),
    };
    let mut skipped = Vec::new();
    let mut cold_scans = Vec::new();
    let mut cold_references = Vec::new();
    let device_volume = match &args.volume {
        Some(v) => is_block_device(v)?,
        None => false,
    };
    let mut flavours: Vec<Flavour> = Vec::new();
    for flavour in &args.compare {
        if !flavours.contains(flavour) {
            flavours.push(*flavour);
        }
    }
    for flavour in flavours {
        let started = if device_volume {
            Err(
                "the volume is a block device, and rsync copies a device node, not its contents"
                    .to_owned(),
            )
        } else {
            rsync::programs(flavour)
        };
        match started {
            Err(why) => {
                let line = format!("--compare {}: {why}", flavour.name());
                eprintln!("bench: skipped {line}");
                skipped.push(line);
            }
            Ok((rsync, stunnel)) => bench.setups.push(RsyncSetup::start(
                flavour,
                &rsync,
                stunnel.as_deref(),
                bench.agents.psk(),
                dir,
            )?),
        }
    }

    let rates = args.rate_list().to_vec();
    let (volume_text, change_text) = match (&args.volume, &args.target) {
        (Some(volume), Some(target)) => {
            let size = device_or_file_size(volume)?;
            ensure!(size > 0, "{} is empty", volume.display());
            let kind = prepare_target(target, size)?;
            bench.size_run(volume, target, size, kind, &rates, args.modify_volume)?;
            (
                format!(
                    "{} ({}) into {}",
                    volume.display(),
                    bytes(size),
                    target.display()
                ),
                if args.modify_volume {
                    change::describe(args, &rates)
                } else {
                    "none: the volume is not written (--modify-volume writes the change into it); the second \
                     sync is an unchanged one"
                        .to_owned()
                },
            )
        }
        _ => {
            let sizes = args.size_list().to_vec();
            let volume = dir.join("volume.img");
            let target = dir.join("target.img");
            for &mib in &sizes {
                let spec = SampleSpec {
                    size: mib * MIB,
                    zero_share: args.zero_share,
                    text_share: args.text_share,
                    random_share: args.random_share,
                    seed: args.seed,
                };
                eprintln!("bench: writing a {} sample volume", bytes(spec.size));
                sample::write_sample_volume(&volume, &spec)
                    .context("cannot write the sample volume")?;
                prepare_target(&target, spec.size)?;
                bench.size_run(&volume, &target, spec.size, SyncKind::Full, &rates, true)?;
            }
            if args.cold {
                for (side, file) in [("source volume", &volume), ("destination target", &target)] {
                    eprintln!(
                        "bench: measuring the cold scan of the {side} against dd iflag=direct"
                    );
                    cold_scans.push(super::coldscan::measure(side, file)?);
                }
                eprintln!("bench: reading the volume and the target at once with O_DIRECT");
                if let Some(reference) = super::coldscan::both_at_once(&volume, &target)? {
                    cold_references.push(reference);
                }
            }
            let sum = args.zero_share + args.text_share + args.random_share;
            let share = |s: f64| format!("{:.0}%", s / sum * 100.0);
            (
                format!(
                    "{} sample volume{} (zeros {}, text {}, random {}; seed {})",
                    sizes
                        .iter()
                        .map(|s| bytes(s * MIB))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if sizes.len() > 1 { "s" } else { "" },
                    share(args.zero_share),
                    share(args.text_share),
                    share(args.random_share),
                    args.seed
                ),
                change::describe(args, &rates),
            )
        }
    };

    let volume_text = match (args.allocated, args.cold) {
        (false, false) => volume_text,
        (a, c) => format!(
            "{volume_text}; {}",
            [(a, "fully allocated"), (c, "cold (out of the page cache)")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, what)| *what)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let notes = notes::notes(args, &bench.cached, load, &bench.setups);
    let storage = match &args.target {
        Some(t) if is_block_device(t)? => None,
        Some(t) => Some(t.parent().unwrap_or(Path::new(".")).to_owned()),
        None => Some(dir.to_owned()),
    };
    let largest = match &args.volume {
        Some(v) => device_or_file_size(v)?,
        None => args.size_list().iter().max().copied().unwrap_or(1) * MIB,
    };
    // Last, so that its writes (and the discard of its file) do not land in a timed sync.
    let storage = match storage {
        Some(d) => {
            eprintln!("bench: measuring the target storage's write rate (fsynced)");
            Some(
                storage::measure(&d, largest)
                    .with_context(|| format!("cannot measure the write rate in {}", d.display()))?,
            )
        }
        None => None,
    };
    Ok(Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        blake3_raw: raw,
        storage,
        volume: volume_text,
        change: change_text,
        interval_secs: args.interval,
        rtt_ms: args.rtt_ms,
        bwlimit: args.bwlimit,
        syncs: bench.rows,
        cold_scans,
        cold_references,
        change_floors: bench.floors,
        skipped,
        notes,
    })
}

/// The state of one bench run.
struct Bench<'a> {
    args: &'a BenchArgs,
    agents: Agents,
    setups: Vec<RsyncSetup>,
    rows: Vec<SyncRow>,
    raw: HashRate,
    /// Work files: state directories, change lists, what a rollback keeps.
    dir: PathBuf,
    /// With `--cold`: the share of each evicted file still in the page cache when the clock started.
    cached: Vec<f64>,
    /// With `--delta --cold`: the storage's floor under each change's delta by change list.
    floors: Vec<super::floor::ChangeFloor>,
}

/// One blockmover sync as the bench runs it: its row's tool name, how the agents run, the kind they must report.
struct Run {
    tool: &'static str,
    how: SyncOptions,
    /// The `syncKind` the source must report (a delta that fell back to a full comparison is not a delta row).
    expect: &'static str,
}

impl Bench<'_> {
    /// Sets the files of the next timed sync as `--allocated` and `--cold` ask (outside the clock): filled, then
    /// evicted (`--cold`) or read whole into the page cache (otherwise), recording how much of each is cached. A
    /// target that does not exist yet (rsync's, before its first sync) is skipped. `keep_mtime`: files whose mtime
    /// is put back after their holes were filled (blockmover's target with a manifest: filling holes writes no
    /// data, and a block device has no mtime to go stale on).
    fn prepare(&mut self, files: &[&Path], keep_mtime: bool) -> anyhow::Result<()> {
        for file in files.iter().filter(|f| f.exists()) {
            if self.args.allocated {
                let before = std::fs::metadata(file)?.modified()?;
                if cache::fill_holes(file)? > 0 && keep_mtime && !is_block_device(file)? {
                    std::fs::File::options()
                        .write(true)
                        .open(file)
                        .and_then(|f| f.set_modified(before))
                        .with_context(|| format!("cannot set the mtime of {}", file.display()))?;
                }
            }
            if self.args.cold {
                cache::evict(file)?;
            } else {
                cache::warm(file)?;
            }
            if let Some(share) = cache::resident_share(file) {
                self.cached.push(share);
            }
        }
        Ok(())
    }

    /// With `--delta`: empty state directories for the source and the destination, for a new volume.
    fn fresh_state(&self) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        if !self.args.delta {
            return Ok(None);
        }
        let (src, dst) = (
            self.dir.join("state-source"),
            self.dir.join("state-destination"),
        );
        for d in [&src, &dst] {
            match std::fs::remove_dir_all(d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot clear {}", d.display()))
                }
                _ => {}
            }
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        Ok(Some((src, dst)))
    }

    /// The full (or first) sync by every tool, then per rate a change and the incremental syncs by every tool.
    fn size_run(
        &mut self,
        volume: &Path,
        target: &Path,
        size: u64,
        first: SyncKind,
        rates: &[f64],
        write_changes: bool,
    ) -> anyhow::Result<()> {
        durable(volume)?;
        let state = self.fresh_state()?;
        let mut digest = sample::file_digest(volume, size)
            .with_context(|| format!("cannot read {}", volume.display()))?;
        let full = Run {
            tool: BLOCKMOVER,
            how: SyncOptions {
                state: state.clone(),
                // The reflink row's first base clone is kept by this sync.
                reflink: self.args.reflink,
                ..SyncOptions::default()
            },
            expect: "full",
        };
        self.blockmover(volume, target, size, first, None, &digest, &full)?;
        for i in 0..self.setups.len() {
            self.setups[i].reset(volume)?;
            self.rsync(i, volume, size, SyncKind::Full, None, &digest)?;
        }
        for (i, &rate) in rates.iter().enumerate() {
            let blocks = if write_changes {
                eprintln!("bench: changing {}% of the volume", trim_float(rate));
                let blocks = change::apply(self.args, volume, size, rate, i as u64)?;
                durable(volume)?;
                if !self.setups.is_empty() {
                    stamp_mtime(volume)?;
                }
                blocks
            } else {
                Vec::new()
            };
            let rate = if write_changes { rate } else { 0.0 };
            digest = sample::file_digest(volume, size)?;
            let change = Some((rate, blocks.len() as u64));
            let extents = change::extents(&blocks, size);
            let runs = self.incrementals(&extents, state.as_ref())?;
            let rounds = self.args.repeat.max(1);
            let rollback = if runs.len() > 1 || rounds > 1 {
                let states: Vec<&Path> = state
                    .iter()
                    .flat_map(|(s, d)| [s.as_path(), d.as_path()])
                    .collect();
                let aside = self.dir.join("rollback");
                Some(Rollback::take(target, extents.clone(), &states, &aside)?)
            } else {
                None
            };
            // Each rsync target too, when it syncs the change more than once.
            let rsync_rollbacks = (0..self.setups.len() * usize::from(rounds > 1))
                .map(|s| {
                    let aside = self.dir.join(format!("rollback-rsync-{s}"));
                    Rollback::take(&self.setups[s].target(volume), extents.clone(), &[], &aside)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let first_row = self.rows.len();
            for round in 0..rounds {
                // The last run of the last round leaves the target and the state dirs as the next change needs.
                for (n, run) in runs.iter().enumerate() {
                    if let (Some(rollback), true) = (&rollback, round > 0 || n > 0) {
                        rollback.restore()?;
                    }
                    let kind = SyncKind::Incremental;
                    self.blockmover(volume, target, size, kind, change, &digest, run)?;
                }
                for s in 0..self.setups.len() {
                    if let (Some(rollback), true) = (rsync_rollbacks.get(s), round > 0) {
                        rollback.restore()?;
                    }
                    self.rsync(s, volume, size, SyncKind::Incremental, change, &digest)?;
                }
            }
            let rows = self.rows.split_off(first_row);
            self.rows.extend(repeat::merge(rows, rounds as usize));
            for rollback in rollback.into_iter().chain(rsync_rollbacks) {
                rollback.discard()?;
            }
            // After the last run, which left the change on the target: writing it again changes no data.
            if self.args.cold && state.is_some() && !extents.is_empty() {
                eprintln!("bench: measuring the storage's floor under the change list");
                let of = (size, rate);
                self.floors
                    .push(super::floor::measure(volume, target, of, &extents)?);
            }
        }
        Ok(())
    }

    /// The blockmover syncs of one change, in order: stateless, through the delaying proxy (`--rtt-ms`), with
    /// manifests and with manifests and the change list (`--delta`, which writes the change list `extents`), and
    /// with the change list from reflink clones (`--reflink`). The last one runs with the state directories, so
    /// that they describe the target it leaves.
    fn incrementals(
        &self,
        extents: &[(u64, u64)],
        state: Option<&(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Vec<Run>> {
        let mut runs = vec![Run {
            tool: BLOCKMOVER,
            how: SyncOptions::default(),
            expect: "full",
        }];
        if let Some(ms) = self.args.rtt_ms {
            runs.push(Run {
                tool: DELAYED,
                how: SyncOptions {
                    rtt: Some(Duration::from_millis(ms)),
                    ..SyncOptions::default()
                },
                expect: "full",
            });
        }
        if let Some(state) = state {
            let list = self.dir.join("changed-extents.json");
            change::write_extents(&list, extents)?;
            runs.push(Run {
                tool: MANIFEST,
                how: SyncOptions {
                    state: Some(state.clone()),
                    ..SyncOptions::default()
                },
                expect: "delta-manifest",
            });
            runs.push(Run {
                tool: CHANGELIST,
                how: SyncOptions {
                    state: Some(state.clone()),
                    changed_extents: Some(list),
                    ..SyncOptions::default()
                },
                expect: "delta-changelist",
            });
            if self.args.reflink {
                // Last: the clone it keeps (beside the volume, outside the rolled-back state) pairs with the
                // manifests it leaves, as the next change's reflink row needs.
                runs.push(Run {
                    tool: REFLINK,
                    how: SyncOptions {
                        state: Some(state.clone()),
                        reflink: true,
                        ..SyncOptions::default()
                    },
                    expect: "delta-changelist",
                });
            }
        }
        Ok(runs)
    }

    #[allow(clippy::too_many_arguments)]
    fn blockmover(
        &mut self,
        volume: &Path,
        target: &Path,
        size: u64,
        kind: SyncKind,
        change: Option<(f64, u64)>,
        digest: &blake3::Hash,
        run: &Run,
    ) -> anyhow::Result<()> {
        eprintln!(
            "bench: {} sync of {} with {}",
            kind.name(),
            bytes(size),
            run.tool
        );
        self.prepare(&[volume], false)?;
        self.prepare(&[target], self.args.delta)?;
        let s = self.agents.sync(volume, target, &run.how)?;
        verify(run.tool, kind, target, size, digest)?;
        let got = s.source.get("syncKind").map(String::as_str);
        if got != Some(run.expect) {
            bail!(
                "the {} sync by {} was {} ({}), not {}",
                kind.name(),
                run.tool,
                got.unwrap_or("of no kind"),
                s.source
                    .get("fullReason")
                    .map_or("no reason given", |r| r.as_str()),
                run.expect
            );
        }
        let secs = s.duration.as_secs_f64().max(1e-9);
        let wire = |key: &str| {
            s.src(key)
                .with_context(|| format!("the source status has no {key}"))
        };
        let delta = run.expect != "full";
        self.rows.push(SyncRow {
            tool: run.tool,
            kind,
            sync_kind: got.map(str::to_owned),
            volume_bytes: size,
            change_percent: change.map(|c| c.0),
            changed_blocks: change.map(|c| c.1),
            duration_secs: secs,
            scan_bytes_per_sec: size as f64 / secs,
            wire_sent: wire("wireBytesSent")?,
            wire_received: wire("wireBytesReceived")?,
            chunks_sent: s.src("chunksSent"),
            blocks_sent: s.src("blocksSent"),
            data_bytes: s.src("dataBytes"),
            compressed_bytes: s.src("compressedBytes"),
            bytes_read_source: s.src("bytesRead"),
            bytes_read_destination: s.dst("bytesRead"),
            rss_source: s.rss_source,
            rss_destination: s.rss_destination,
            cpu_source_secs: s.cpu_source,
            cpu_destination_secs: s.cpu_destination,
            max_rpo_secs: self.args.interval + secs,
            hashed_share_of_raw: (!delta)
                .then(|| 2.0 * size as f64 / secs / self.raw.bytes_per_sec),
            verified: true,
            wire_send_rate: s.src("wireSendRate"),
            zstd_levels: s.src("zstdLevel").zip(s.src("zstdLevelMax")),
            repeat_secs: Vec::new(),
        });
        Ok(())
    }

    fn rsync(
        &mut self,
        setup: usize,
        volume: &Path,
        size: u64,
        kind: SyncKind,
        change: Option<(f64, u64)>,
        digest: &blake3::Hash,
    ) -> anyhow::Result<()> {
        let their_target = self.setups[setup].target(volume);
        self.prepare(&[volume, &their_target], false)?;
        let setup = &mut self.setups[setup];
        let tool = setup.flavour().name();
        eprintln!("bench: {} sync of {} with {tool}", kind.name(), bytes(size));
        let s = setup.sync(volume)?;
        verify(tool, kind, &setup.target(volume), size, digest)?;
        let secs = s.duration.as_secs_f64().max(1e-9);
        self.rows.push(SyncRow {
            tool,
            kind,
            sync_kind: None,
            volume_bytes: size,
            change_percent: change.map(|c| c.0),
            changed_blocks: change.map(|c| c.1),
            duration_secs: secs,
            scan_bytes_per_sec: size as f64 / secs,
            wire_sent: s.sent,
            wire_received: s.received,
            chunks_sent: None,
            blocks_sent: None,
            data_bytes: None,
            compressed_bytes: None,
            bytes_read_source: None,
            bytes_read_destination: None,
            rss_source: s.rss_client,
            rss_destination: s.rss_server,
            cpu_source_secs: s.cpu_client,
            cpu_destination_secs: s.cpu_server,
            max_rpo_secs: self.args.interval + secs,
            hashed_share_of_raw: None,
            verified: true,
            wire_send_rate: None,
            zstd_levels: None,
            repeat_secs: Vec::new(),
        });
        Ok(())
    }
}
