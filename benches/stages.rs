//! Per-stage throughput: chunk hashing, zero detection, block diffing input, zstd, and frame encode/decode.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{RngCore, SeedableRng};

use blockmover::chunk::{block_digests, chunk_digest_of_blocks, hash_chunk, is_zero, Digest};
use blockmover::codec::{parse_frame, DataFrame, Encoding, Message};

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn text(len: usize) -> Vec<u8> {
    let words = [
        "volume ",
        "block ",
        "replica ",
        "snapshot ",
        "the ",
        "of ",
        "chunk ",
        "digest ",
    ];
    words
        .iter()
        .cycle()
        .flat_map(|w| w.bytes())
        .take(len)
        .collect()
}

fn hashing(c: &mut Criterion) {
    let data = random(4 << 20, 1);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for chunk in [4096usize, 65536, 1 << 20] {
        g.bench_with_input(
            BenchmarkId::new("blake3_chunks", chunk),
            &chunk,
            |b, &chunk| b.iter(|| data.chunks(chunk).map(Digest::of).count()),
        );
    }
    g.bench_function("block_digests_64k", |b| {
        b.iter(|| data.chunks(65536).map(block_digests).count())
    });
    let zeros = vec![0u8; 4 << 20];
    g.bench_function("hash_chunk_64k", |b| {
        b.iter(|| data.chunks(65536).map(hash_chunk).count())
    });
    g.bench_function("is_zero", |b| b.iter(|| is_zero(&zeros)));
    g.finish();
    // A delta by change list merges each changed chunk's 16 block digests into its chunk digest (twice on each side:
    // the base's entry, proven against the manifest, and the new chunk).
    let blocks: Vec<Vec<Digest>> = data.chunks(65536).map(block_digests).collect();
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(blocks.len() as u64));
    g.bench_function("chunk_digest_of_16_blocks", |b| {
        b.iter(|| {
            blocks
                .iter()
                .filter_map(|d| chunk_digest_of_blocks(d, 65536))
                .count()
        })
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd");
    for (name, data) in [("text", text(1 << 20)), ("random", random(1 << 20, 2))] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        for level in [1, 3] {
            g.bench_function(format!("{name}_level{level}"), |b| {
                b.iter(|| zstd::bulk::compress(&data, level).map(|v| v.len()))
            });
        }
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let payload = bytes::Bytes::from(random(65536, 3));
    let msg = Message::Data(DataFrame {
        chunk: 7,
        send_mask: u64::from(u16::MAX),
        zero_mask: 0,
        encoding: Encoding::Raw,
        raw_len: 65536,
        payload,
    });
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(65536 * 16));
    g.bench_function("data_frame_roundtrip", |b| {
        b.iter(|| {
            let mut buf = BytesMut::new();
            for _ in 0..16 {
                msg.encode(&mut buf);
            }
            let mut n = 0;
            while let Ok(Some(_)) = parse_frame(&mut buf) {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, hashing, compression, codec);
criterion_main!(benches);
