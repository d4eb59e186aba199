//! The whole loopback pipeline in one process: a one-shot destination and a source over real TLS on 127.0.0.1,
//! for a full sync into an empty target, a 1% scattered change, and an unchanged volume. Throughput is the volume
//! size, so the figures read as scan rates; the page cache holds both files.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use blockmover::chunk::DEFAULT_CHUNK_SIZE;
use blockmover::destination::{self, DestinationConfig};
use blockmover::manifest::Store;
use blockmover::net::Timeouts;
use blockmover::sample::{self, SampleSpec};
use blockmover::source::{self, SourceConfig};
use blockmover::stats::Figures;
use blockmover::tls::Psk;

const SIZE: u64 = 64 << 20;

/// One sync of `volume` into `target`; returns the bytes the source sent.
async fn sync(volume: &Path, target: &Path, psk: &Psk) -> u64 {
    let dconfig = DestinationConfig {
        listen: "127.0.0.1:0".into(),
        target: target.to_owned(),
        psk: psk.clone(),
        status: None,
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
    let bound = destination::bind(&dconfig).await.expect("bind");
    let addr = bound.local_addr().expect("address");
    let dest = tokio::spawn(async move { destination::serve(&dconfig, bound).await });
    let sconfig = SourceConfig {
        connect: addr.to_string(),
        volume: volume.to_owned().into(),
        psk: psk.clone(),
        chunk_size: DEFAULT_CHUNK_SIZE,
        zstd_level: Some(1),
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
    source::run(&sconfig, figures.clone())
        .await
        .expect("source");
    dest.await.expect("destination task").expect("destination");
    figures.wire.sent.load(std::sync::atomic::Ordering::Relaxed)
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (volume, base, target) = (
        dir.path().join("volume.img"),
        dir.path().join("base.img"),
        dir.path().join("target.img"),
    );
    let psk = Psk::parse(&format!("bench:{}", "ab".repeat(32))).expect("key");
    sample::write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 1)).expect("sample volume");
    std::fs::copy(&volume, &base).expect("base copy");
    sample::scattered_change(&volume, SIZE, 0.01, 2).expect("change");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let empty_target = || {
        let f = std::fs::File::create(&target).expect("target");
        f.set_len(SIZE).expect("target size");
    };

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.bench_function("full_64MiB", |b| {
        b.iter_batched(
            empty_target,
            |()| runtime.block_on(sync(&volume, &target, &psk)),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("incremental_1pct_64MiB", |b| {
        b.iter_batched(
            || {
                std::fs::copy(&base, &target).expect("target from base");
            },
            |()| runtime.block_on(sync(&volume, &target, &psk)),
            BatchSize::PerIteration,
        )
    });
    runtime.block_on(sync(&volume, &target, &psk));
    g.bench_function("unchanged_64MiB", |b| {
        b.iter(|| runtime.block_on(sync(&volume, &target, &psk)))
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
