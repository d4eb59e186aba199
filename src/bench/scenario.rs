//! The syncs of one bench run, in order: for each volume size a full sync by every tool, then for each change rate
//! the change and an incremental sync by every tool. Every tool's incremental starts from the same state (its own
//! target after the previous sync, equal to the volume before the change), and every target is checked against
//! the volume (BLAKE3 of the whole volume) after every sync.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};

use blockmover::sample::{self, SampleSpec};

use super::agents::Agents;
use super::cache;
use super::hashrate::{self, HashRate};
use super::report::{bytes, trim_float, Report, SyncKind, SyncRow};
use super::rsync::{self, Flavour, RsyncSetup};
use super::storage;
use super::BenchArgs;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Runs every sync the flags ask for, with work files in `dir`.
pub fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Report> {
    let load = load_average();
    eprintln!("bench: measuring the raw all-core BLAKE3 rate");
    let raw = hashrate::measure();
    let mut bench = Bench {
        args,
        agents: Agents::new(dir)?,
        setups: Vec::new(),
        rows: Vec::new(),
        raw: raw.clone(),
        delayed: None,
        cached: Vec::new(),
    };
    let mut skipped = Vec::new();
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

    let rates: Vec<f64> = if args.sweep {
        args.rates.clone()
    } else {
        vec![args.change_percent]
    };
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
                    change_text(args, &rates)
                } else {
                    "none: the volume is not written (--modify-volume writes the change into it); the second \
                     sync is an unchanged one"
                        .to_owned()
                },
            )
        }
        _ => {
            let sizes: Vec<u64> = if args.sweep {
                args.sizes.clone()
            } else {
                vec![args.size_mib]
            };
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
                change_text(args, &rates),
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
    let mut notes = vec![
        "duration is wall time until the target is durable: blockmover's source exits only after the destination \
         fsynced the target and confirmed the volume digest; each rsync run is timed together with an fsync of its \
         target file. Daemons (blockmover destination, rsync daemon, stunnel) are started before the clock."
            .to_owned(),
        "wire: blockmover counts TCP payload bytes including TLS at its sockets; rsync reports its own protocol \
         bytes (`sent`/`received`), so stunnel's TLS overhead is not in volsync-rsync-tls's figures."
            .to_owned(),
        "scan rate = volume / duration; max RPO = interval + duration; hashed = bytes both agents hash per second \
         (2 x volume / duration) over the raw all-core BLAKE3 rate above (all-zero chunks are recognised without \
         hashing, so sparse volumes can exceed 100%)."
            .to_owned(),
        if args.cold {
            "volumes and targets were written back and dropped from the page cache (fsync, posix_fadvise \
             DONTNEED) before each timed sync; every target is compared with the volume (BLAKE3) after every sync."
                .to_owned()
        } else {
            "volumes and targets are in the page cache (written just before); every target is compared with the \
             volume (BLAKE3) after every sync."
                .to_owned()
        },
    ];
    if args.allocated {
        notes.push(
            "allocated: every hole of the volume and of each target was filled with written zeros before each \
             timed sync, as on a block PVC (no hole for a reader to skip); blockmover's own zeroing punches holes \
             in a file target, which the next sync's preparation fills again."
                .to_owned(),
        );
    }
    if args.cold {
        let most = bench
            .cached
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        notes.push(match most {
            Some(share) => format!(
                "cold: after eviction, at most {:.1}% of a volume's or target's pages were still cached when the \
                 clock started ({} files measured with fincore)",
                share * 100.0,
                bench.cached.len()
            ),
            None => "cold: how much stayed cached could not be measured (fincore missing)".to_owned(),
        });
    }
    if let Some(ms) = args.rtt_ms {
        notes.push(format!(
            "{DELAYED}: the same incremental sync as the blockmover row above it, from a copy of the same target, \
             with the source connected through a proxy that delays every byte by {} ms each way ({ms} ms round \
             trip).",
            ms as f64 / 2.0
        ));
    }
    if let Some(load) = load.filter(|l| *l >= 0.5) {
        notes.push(format!(
            "the 1-minute load average was {load:.2} when the bench started: other processes were using the \
             cores, so durations are longer and noisier than on an idle machine"
        ));
    }
    for setup in &bench.setups {
        if let Some(tls) = setup.negotiated_tls() {
            notes.push(format!(
                "{}: stunnel negotiated {tls}",
                setup.flavour().name()
            ));
        }
    }
    if !bench.setups.is_empty() {
        notes.push(
            "rsync RSS src is the rsync client (the sender); RSS dst sums the rsync processes serving the \
             connection (generator and receiver), stunnel not counted."
                .to_owned(),
        );
    }
    let storage = match &args.target {
        Some(t) if is_block_device(t)? => None,
        Some(t) => Some(t.parent().unwrap_or(Path::new(".")).to_owned()),
        None => Some(dir.to_owned()),
    };
    let largest = match &args.volume {
        Some(v) => device_or_file_size(v)?,
        None if args.sweep => args.sizes.iter().max().copied().unwrap_or(args.size_mib) * MIB,
        None => args.size_mib * MIB,
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
        syncs: bench.rows,
        skipped,
        notes,
    })
}

/// `1% of 4 KiB blocks: scattered 4 KiB writes`, with the clustered share when there is one.
fn change_text(args: &BenchArgs, rates: &[f64]) -> String {
    let rates = rates
        .iter()
        .map(|r| format!("{}%", trim_float(*r)))
        .collect::<Vec<_>>()
        .join(", ");
    let how = if args.clustered_share <= 0.0 {
        "scattered 4 KiB writes".to_owned()
    } else {
        format!(
            "{:.0}% scattered 4 KiB writes, {:.0}% in runs of {} blocks",
            (1.0 - args.clustered_share) * 100.0,
            args.clustered_share * 100.0,
            args.run_blocks
        )
    };
    format!("{rates} of 4 KiB blocks, {how}")
}

/// The state of one bench run.
struct Bench<'a> {
    args: &'a BenchArgs,
    agents: Agents,
    setups: Vec<RsyncSetup>,
    rows: Vec<SyncRow>,
    raw: HashRate,
    /// The round-trip time added to the blockmover sync under way, if any.
    delayed: Option<Duration>,
    /// With `--cold`: the share of each evicted file still in the page cache when the clock started.
    cached: Vec<f64>,
}

/// The tool name of blockmover's syncs through the delaying proxy (`--rtt-ms`).
pub const DELAYED: &str = "blockmover+rtt";

/// Copies a target aside (sparse files stay sparse only where the copy can; this is outside the timed part).
fn keep_copy(target: &Path) -> anyhow::Result<std::path::PathBuf> {
    let copy = target.with_extension("before.img");
    std::fs::copy(target, &copy)
        .with_context(|| format!("cannot copy {} aside", target.display()))?;
    durable(&copy)?;
    Ok(copy)
}

/// fsyncs a file written outside the timed part, so that its writeback does not land in a timed sync: the target's
/// final fsync would otherwise flush the whole restored copy, and a volume just generated or changed would be
/// written back while the first tool syncs it. Read-only, so a given snapshot device works too.
fn durable(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", path.display()))
}

impl Bench<'_> {
    /// Sets the files of the next timed sync as `--allocated` and `--cold` ask (outside the clock). A target that
    /// does not exist yet (rsync's, before its first sync) is skipped.
    fn prepare(&mut self, files: &[&Path]) -> anyhow::Result<()> {
        for file in files.iter().filter(|f| f.exists()) {
            if self.args.allocated {
                cache::fill_holes(file)?;
            }
            if self.args.cold {
                cache::evict(file)?;
                if let Some(share) = cache::resident_share(file) {
                    self.cached.push(share);
                }
            }
        }
        Ok(())
    }

    /// The full (or first) sync by every tool, then per rate a change and an incremental sync by every tool.
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
        let mut digest = sample::file_digest(volume, size)
            .with_context(|| format!("cannot read {}", volume.display()))?;
        self.blockmover(volume, target, size, first, None, &digest)?;
        for i in 0..self.setups.len() {
            self.setups[i].reset(volume)?;
            self.rsync(i, volume, size, SyncKind::Full, None, &digest)?;
        }
        for (i, &rate) in rates.iter().enumerate() {
            let changed = if write_changes {
                eprintln!("bench: changing {}% of the volume", trim_float(rate));
                let changed = apply_change(self.args, volume, size, rate, i as u64)?;
                durable(volume)?;
                if !self.setups.is_empty() {
                    stamp_mtime(volume)?;
                }
                changed
            } else {
                0
            };
            let rate = if write_changes { rate } else { 0.0 };
            digest = sample::file_digest(volume, size)?;
            let change = Some((rate, changed));
            let before = match self.args.rtt_ms {
                Some(_) => Some(keep_copy(target)?),
                None => None,
            };
            self.blockmover(volume, target, size, SyncKind::Incremental, change, &digest)?;
            if let (Some(before), Some(ms)) = (before, self.args.rtt_ms) {
                std::fs::copy(&before, target).context("cannot restore the target")?;
                durable(target)?;
                std::fs::remove_file(&before)?;
                self.delayed = Some(Duration::from_millis(ms));
                let r =
                    self.blockmover(volume, target, size, SyncKind::Incremental, change, &digest);
                self.delayed = None;
                r?;
            }
            for s in 0..self.setups.len() {
                self.rsync(s, volume, size, SyncKind::Incremental, change, &digest)?;
            }
        }
        Ok(())
    }

    fn blockmover(
        &mut self,
        volume: &Path,
        target: &Path,
        size: u64,
        kind: SyncKind,
        change: Option<(f64, u64)>,
        digest: &blake3::Hash,
    ) -> anyhow::Result<()> {
        eprintln!(
            "bench: {} sync of {} with blockmover",
            kind.name(),
            bytes(size)
        );
        self.prepare(&[volume, target])?;
        let s = self.agents.sync(volume, target, self.delayed)?;
        verify("blockmover", kind, target, size, digest)?;
        let secs = s.duration.as_secs_f64().max(1e-9);
        let wire = |key: &str| {
            s.src(key)
                .with_context(|| format!("the source status has no {key}"))
        };
        self.rows.push(SyncRow {
            tool: if self.delayed.is_some() {
                DELAYED
            } else {
                "blockmover"
            },
            kind,
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
            hashed_share_of_raw: Some(2.0 * size as f64 / secs / self.raw.bytes_per_sec),
            verified: true,
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
        self.prepare(&[volume, &their_target])?;
        let setup = &mut self.setups[setup];
        let tool = setup.flavour().name();
        eprintln!("bench: {} sync of {} with {tool}", kind.name(), bytes(size));
        let s = setup.sync(volume)?;
        verify(tool, kind, &setup.target(volume), size, digest)?;
        let secs = s.duration.as_secs_f64().max(1e-9);
        self.rows.push(SyncRow {
            tool,
            kind,
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
        });
        Ok(())
    }
}

/// Fails loudly unless the first `size` bytes of `target` hash like the volume.
fn verify(
    tool: &str,
    kind: SyncKind,
    target: &Path,
    size: u64,
    digest: &blake3::Hash,
) -> anyhow::Result<()> {
    let got = sample::file_digest(target, size)
        .with_context(|| format!("cannot read {}", target.display()))?;
    if got != *digest {
        bail!(
            "after the {} sync by {tool}, {} differs from the volume (BLAKE3 {} != {})",
            kind.name(),
            target.display(),
            got.to_hex(),
            digest.to_hex()
        );
    }
    Ok(())
}

/// Writes the change for rate `percent` (the `index`-th change of the run) into the volume; returns the number
/// of distinct 4 KiB blocks written.
fn apply_change(
    args: &BenchArgs,
    volume: &Path,
    size: u64,
    percent: f64,
    index: u64,
) -> anyhow::Result<u64> {
    let rate = percent / 100.0;
    let clustered = rate * args.clustered_share;
    let scattered = rate - clustered;
    let mut blocks = Vec::new();
    if scattered > 0.0 {
        let seed = args.seed.wrapping_add(1 + index);
        blocks.extend(sample::scattered_change(volume, size, scattered, seed)?.blocks);
    }
    if clustered > 0.0 {
        let seed = args.seed.wrapping_add(1001 + index);
        blocks.extend(
            sample::clustered_change(volume, size, clustered, args.run_blocks, seed)?.blocks,
        );
    }
    blocks.sort_unstable();
    blocks.dedup();
    debug_assert!(blocks.last().is_none_or(|b| *b < size.div_ceil(BLOCK)));
    Ok(blocks.len() as u64)
}

/// Sets a regular file's mtime one second ahead of now, so that it differs in whole seconds from every file
/// written before: rsync's quick check skips a file whose size and mtime (to the second) equal the target's, and
/// so misses a change made within the same second as the previous sync.
fn stamp_mtime(volume: &Path) -> anyhow::Result<()> {
    if is_block_device(volume)? {
        return Ok(());
    }
    let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(volume)
        .and_then(|f| f.set_modified(ahead))
        .with_context(|| format!("cannot set the mtime of {}", volume.display()))
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn is_block_device(path: &Path) -> anyhow::Result<bool> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(meta.file_type().is_block_device())
}

/// The size of a regular file or block device.
fn device_or_file_size(path: &Path) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(file.seek(std::io::SeekFrom::End(0))?)
}

/// Makes a regular-file target (existing or not) an all-zero sparse file of `size` bytes, for a full sync; leaves
/// a block device as it is (its first sync is then a "first" one) after checking that it is large enough.
fn prepare_target(target: &Path, size: u64) -> anyhow::Result<SyncKind> {
    if target.exists() && is_block_device(target)? {
        let capacity = device_or_file_size(target)?;
        ensure!(
            capacity >= size,
            "target {} holds {} bytes, the volume {size}",
            target.display(),
            capacity
        );
        return Ok(SyncKind::First);
    }
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    file.set_len(size)?;
    Ok(SyncKind::Full)
}
