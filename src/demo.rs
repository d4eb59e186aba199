//! `blockmover demo`: a sample sparse volume synced over loopback TLS, changed by 1% in scattered 4 KiB writes,
//! and synced again; prints durations, bytes on the wire and the destination's status. Needs no cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use blockmover::destination::{self, DestinationConfig};
use blockmover::manifest::Store;
use blockmover::net::Timeouts;
use blockmover::sample::{self, SampleSpec};
use blockmover::source::{self, SourceConfig};
use blockmover::stats::{get, Figures};
use blockmover::tls::Psk;

use crate::cli::DemoArgs;

const MIB: u64 = 1 << 20;

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    ensure!(
        (0.0..=100.0).contains(&args.change_percent),
        "--change-percent must be between 0 and 100"
    );
    let tmp;
    let dir: PathBuf = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let size = args.size_mib * MIB;
    let volume = dir.join("volume.img");
    let target = dir.join("target.img");
    println!(
        "blockmover demo: {} MiB sample volume (1/3 zeros, 1/3 text, 1/3 random) in {}",
        args.size_mib,
        dir.display()
    );
    let spec = SampleSpec::mixed(size, args.seed);
    sample::write_sample_volume(&volume, &spec).context("cannot write the sample volume")?;
    std::fs::File::create(&target)?.set_len(size)?;
    let psk_text = Psk::generate();
    let psk = Psk::parse(&psk_text).map_err(anyhow::Error::msg)?;

    println!();
    println!(
        "{:<12} {:>9} {:>14} {:>12} {:>9} {:>11} {:>7} {:>13}  target == volume",
        "sync",
        "duration",
        "wire src->dst",
        "dst->src",
        "chunks",
        "4K blocks",
        "zero",
        "data bytes"
    );
    let full = sync_once(&dir, &volume, &target, &psk).await?;
    full.print("full", &volume, &target, size)?;

    let change =
        sample::scattered_change(&volume, size, args.change_percent / 100.0, args.seed + 1)?;
    let incr = sync_once(&dir, &volume, &target, &psk).await?;
    incr.print("incremental", &volume, &target, size)?;

    println!();
    println!(
        "change: {} scattered 4 KiB blocks ({:.2}% of the volume, {} bytes); incremental sent {} bytes on the wire \
         ({:.1}% of the changed bytes)",
        change.blocks.len(),
        args.change_percent,
        change.blocks.len() as u64 * 4096,
        incr.wire_sent,
        incr.wire_sent as f64 * 100.0 / (change.blocks.len().max(1) as u64 * 4096) as f64,
    );
    println!(
        "full sync {:.2}s, incremental {:.2}s: max RPO = interval + sync duration",
        full.duration.as_secs_f64(),
        incr.duration.as_secs_f64()
    );
    let status = std::fs::read_to_string(dir.join("dst-status.json"))?;
    println!("\ndestination status (dst-status.json, VolSync .status shape):\n{status}");
    Ok(())
}

struct Outcome {
    duration: Duration,
    wire_sent: u64,
    wire_received: u64,
    figures: Arc<Figures>,
}

impl Outcome {
    fn print(&self, name: &str, volume: &Path, target: &Path, size: u64) -> anyhow::Result<()> {
        let same = sample::file_digest(volume, size)? == sample::file_digest(target, size)?;
        let f = &self.figures;
        println!(
            "{:<12} {:>8.2}s {:>14} {:>12} {:>9} {:>11} {:>7} {:>13}  {}",
            name,
            self.duration.as_secs_f64(),
            self.wire_sent,
            self.wire_received,
            get(&f.chunks_sent),
            get(&f.blocks_sent),
            get(&f.zero_chunks),
            get(&f.data_bytes),
            if same { "yes" } else { "NO" }
        );
        ensure!(
            same,
            "the target differs from the volume after the {name} sync"
        );
        Ok(())
    }
}

/// One sync: a one-shot destination and a source, in this process, over loopback TLS.
async fn sync_once(dir: &Path, volume: &Path, target: &Path, psk: &Psk) -> anyhow::Result<Outcome> {
    let dconfig = DestinationConfig {
        listen: "127.0.0.1:0".into(),
        target: target.to_owned(),
        psk: psk.clone(),
        status: Some(dir.join("dst-status.json")),
        serve: false,
        timeouts: Timeouts::default(),
        window: destination::WINDOW,
        schedule: None,
        metrics: None,
        read_back: false,
        direct_reads: false,
        state: Arc::new(Store::none()),
        verify: Default::default(),
    };
    let bound = destination::bind(&dconfig).await?;
    let addr = bound.local_addr()?;
    let dest = tokio::spawn(async move { destination::serve(&dconfig, bound).await });
    let sconfig = SourceConfig {
        connect: addr.to_string(),
        volume: volume.to_owned().into(),
        psk: psk.clone(),
        chunk_size: blockmover::chunk::DEFAULT_CHUNK_SIZE,
        zstd_level: None,
        compression: Default::default(),
        timeouts: Timeouts::default(),
        identity: "default/demo".into(),
        state: Arc::new(Store::none()),
        tracker: None,
        verify: Default::default(),
        snapshot: Default::default(),
        bwlimit: None,
        read_depth: None,
        direct_reads: false,
    };
    let figures = Arc::new(Figures::default());
    let start = Instant::now();
    let sent = source::sync(&sconfig, Some(dir.join("src-status.json")), figures.clone()).await;
    let duration = start.elapsed();
    let received = dest.await.context("destination task")?;
    sent.context("source")?;
    received.context("destination")?;
    Ok(Outcome {
        duration,
        wire_sent: get(&figures.wire.sent),
        wire_received: get(&figures.wire.received),
        figures,
    })
}
