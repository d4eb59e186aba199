//! Bounded, seeded fuzzing of the wire decoder under stable `cargo test`: arbitrary bytes, mutated valid frames,
//! round trips, the authentication exchange and DATA payloads (zstd bombs included) go through the same checks
//! the cargo-fuzz targets run (`fuzz/checks.rs`), and every call is measured by a counting allocator: no single
//! allocation may exceed the frame bound, whatever length a header claims.
//!
//! A separate test binary because it installs its own global allocator. `BLOCKMOVER_FUZZ_CASES=N` runs N cases per
//! property (default a few seconds' worth), `BLOCKMOVER_FUZZ_SEED=S` another seed; a failure prints both and the
//! input, and case `i` of seed `S` is reproducible on its own.
#![allow(unsafe_code)] // the counting allocator, and only it: see `Peak`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blockmover::chunk::{Digest, MAX_CHUNK_SIZE};
use blockmover::codec::{
    decode_frame, parse_frame, AbortCode, DataFrame, Encoding, Fallback, Message, Offer, SyncKind,
    HEADER_LEN, MAX_ABORT_MESSAGE, MAX_DIGESTS_PER_FRAME, MAX_PAYLOAD,
};
use blockmover::tls::{Psk, Side};

/// Forwards to the system allocator, noting the largest single request made by this thread while tracking is on.
/// Sound: every method passes its arguments unchanged to `System`, which upholds `GlobalAlloc`'s contract; the
/// bookkeeping touches only const-initialised thread-locals without destructors, which never allocate.
struct Peak;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Peak = Peak;

/// Runs `f`, returning the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(Cell::get)
}

/// The most one frame may make the decoders reserve: its header and the largest payload.
const FRAME_BOUND: usize = HEADER_LEN + MAX_PAYLOAD;
/// The framed reader: one frame, or a 64 KiB read-ahead beside less than a frame header.
const READER_BOUND: usize = FRAME_BOUND;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `case` for each case number with its own seeded generator; on a failure, says how to reproduce it.
fn run_cases(property: &str, default_cases: u64, mut case: impl FnMut(&mut ChaCha8Rng)) {
    let seed = env_u64("BLOCKMOVER_FUZZ_SEED", 0xb10c_5eed);
    let cases = env_u64("BLOCKMOVER_FUZZ_CASES", default_cases);
    for i in 0..cases {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng)));
        if let Err(panic) = r {
            eprintln!("{property}: case {i} failed (BLOCKMOVER_FUZZ_SEED={seed}, {cases} cases)");
            std::panic::resume_unwind(panic);
        }
    }
    println!("{property}: {cases} cases passed (BLOCKMOVER_FUZZ_SEED={seed})");
}

fn bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn random_bytes(rng: &mut ChaCha8Rng, len: std::ops::Range<usize>) -> Vec<u8> {
    let len = rng.random_range(len);
    bytes(rng, len)
}

fn digest(rng: &mut ChaCha8Rng) -> Digest {
    Digest(rng.random())
}

/// Mostly small, sometimes up to `max`.
fn count(rng: &mut ChaCha8Rng, small: usize, max: usize) -> usize {
    if rng.random_ratio(1, 50) {
        rng.random_range(1..=max)
    } else {
        rng.random_range(1..=small.min(max))
    }
}

fn sync_kind(rng: &mut ChaCha8Rng) -> SyncKind {
    [SyncKind::Full, SyncKind::Manifest, SyncKind::ChangeList][rng.random_range(0..3)]
}

/// Any valid message, with fields anywhere in their ranges.
fn message(rng: &mut ChaCha8Rng) -> Message {
    match rng.random_range(0..10) {
        0 => Message::Auth {
            proof: rng.random(),
        },
        1 => Message::Hello {
            volume_size: rng.random(),
            chunk_size: rng.random(),
            block_size: rng.random(),
            source: (0..rng.random_range(0..=40u8))
                .map(|_| char::from(rng.random_range(b'a'..=b'z')))
                .collect(),
            offer: Offer {
                kind: sync_kind(rng),
                reason: Fallback::from_code(rng.random()),
                base: digest(rng),
            },
        },
        2 => Message::Ready {
            target_size: rng.random(),
            window: rng.random(),
            kind: sync_kind(rng),
            reason: Fallback::from_code(rng.random()),
        },
        3 => Message::Digests {
            first: rng.random(),
            digests: (0..count(rng, 64, MAX_DIGESTS_PER_FRAME))
                .map(|_| digest(rng))
                .collect(),
        },
        4 => Message::Need {
            chunk: rng.random(),
            blocks: rng
                .random_bool(0.7)
                .then(|| (0..count(rng, 64, 64)).map(|_| digest(rng)).collect()),
        },
        5 => Message::Ack {
            through: rng.random(),
        },
        6 => {
            let len = if rng.random_ratio(1, 200) {
                MAX_PAYLOAD - 29
            } else {
                rng.random_range(0..=8192)
            };
            Message::Data(DataFrame {
                chunk: rng.random(),
                send_mask: rng.random(),
                zero_mask: rng.random(),
                encoding: if rng.random() {
                    Encoding::Raw
                } else {
                    Encoding::Zstd
                },
                raw_len: rng.random(),
                payload: Bytes::from(bytes(rng, len)),
            })
        }
        7 | 8 => {
            let (chunk_count, volume_size, digest) = (rng.random(), rng.random(), digest(rng));
            if rng.random() {
                Message::End {
                    chunk_count,
                    volume_size,
                    digest,
                }
            } else {
                Message::Commit {
                    chunk_count,
                    volume_size,
                    digest,
                }
            }
        }
        _ => {
            let codes = [
                AbortCode::Protocol,
                AbortCode::Version,
                AbortCode::TargetTooSmall,
                AbortCode::Io,
                AbortCode::Digest,
                AbortCode::Auth,
                AbortCode::Cancelled,
                AbortCode::Config,
                AbortCode::Unknown(0),
                AbortCode::Unknown(rng.random_range(9..=u16::MAX)),
            ];
            let mut message: String = (0..rng.random_range(0..400))
                .map(|_| {
                    if rng.random_ratio(1, 10) {
                        'é'
                    } else {
                        char::from(rng.random_range(0x20u8..0x7f))
                    }
                })
                .collect();
            while message.len() > MAX_ABORT_MESSAGE {
                message.pop();
            }
            Message::Abort {
                code: codes[rng.random_range(0..codes.len())],
                message,
            }
        }
    }
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    buf.to_vec()
}

/// One to four mutations of the kinds that break decoders: bit flips, bytes set, truncation, extension, a new
/// length or type or version in the header, inserted or deleted runs, another frame spliced in.
fn mutate(rng: &mut ChaCha8Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 => v.truncate(rng.random_range(0..=len)),
            3 => {
                let extra = random_bytes(rng, 1..64);
                v.extend(extra);
            }
            4 if len >= HEADER_LEN => {
                let claim: u32 = match rng.random_range(0..4) {
                    0 => rng.random(),
                    1 => (MAX_PAYLOAD as u32)
                        .wrapping_add(rng.random_range(0..3))
                        .wrapping_sub(1),
                    _ => (len - HEADER_LEN) as u32 ^ rng.random_range(0..64),
                };
                v[4..8].copy_from_slice(&claim.to_be_bytes());
            }
            5 if len >= HEADER_LEN => v[3] = rng.random(),
            6 if len >= HEADER_LEN => v[2] = rng.random(),
            7 => {
                let at = rng.random_range(0..=len);
                let run = random_bytes(rng, 1..16);
                v.splice(at..at, run);
            }
            8 if len > 0 => {
                let at = rng.random_range(0..len);
                let end = (at + rng.random_range(1..16)).min(len);
                v.drain(at..end);
            }
            _ => {
                let other = encode(&message(rng));
                let at = rng.random_range(0..=len);
                v.splice(at..at, other);
            }
        }
    }
    v
}

/// Checks one input against the frame and stream properties, and measures the decoders alone (not the checks'
/// own copies and re-encodings) against the allocation bounds.
fn decode_within_bounds(input: &[u8]) {
    checks::frame(input);
    let mut piece = vec![(input.len() % 64) as u8];
    piece.extend_from_slice(input);
    checks::stream(&piece);

    let mut buf = BytesMut::from(input);
    let largest = largest_allocation(|| {
        let _ = decode_frame(input);
        let _ = parse_frame(&mut buf);
    });
    assert!(
        largest <= FRAME_BOUND,
        "decoding allocated {largest} bytes at once"
    );
    let largest = largest_allocation(|| {
        let _ = checks::read_all(input, usize::from(piece[0]) + 1);
    });
    assert!(
        largest <= READER_BOUND,
        "the reader allocated {largest} bytes at once"
    );
}

#[test]
fn arbitrary_bytes_never_panic_and_stay_within_the_frame_bound() {
    run_cases("arbitrary bytes", 20_000, |rng| {
        let mut input = Vec::new();
        if rng.random() {
            // A plausible header, so the fuzzing reaches the payload decoders.
            let ty = [
                0x01,
                0x02,
                0x03,
                0x10,
                0x11,
                0x12,
                0x13,
                0x20,
                0x21,
                0x7f,
                rng.random(),
            ];
            input.extend_from_slice(b"BM\x01");
            input.push(ty[rng.random_range(0..ty.len())]);
            let body = rng.random_range(0..600u32);
            let claim = if rng.random_ratio(1, 4) {
                rng.random()
            } else {
                body
            };
            input.extend_from_slice(&claim.to_be_bytes());
            input.extend(bytes(rng, body as usize));
        } else {
            input = random_bytes(rng, 0..600);
        }
        decode_within_bounds(&input);
    });
}

#[test]
fn mutated_valid_frames_never_panic_and_stay_within_the_frame_bound() {
    run_cases("mutated frames", 20_000, |rng| {
        let input = {
            let valid = encode(&message(rng));
            mutate(rng, valid)
        };
        decode_within_bounds(&input);
    });
}

#[test]
fn valid_messages_round_trip_through_every_decoder() {
    run_cases("round trips", 5_000, |rng| {
        let msgs: Vec<Message> = (0..rng.random_range(1..=8)).map(|_| message(rng)).collect();
        let piece = rng.random_range(1..=70_000);
        checks::roundtrip(&msgs, piece);
    });
}

#[test]
fn claimed_lengths_reserve_nothing_until_checked_and_complete() {
    // A header claiming the largest payload, followed by 100 bytes: the slice decoder waits without reserving.
    let mut frame = vec![b'B', b'M', blockmover::codec::VERSION, 0x13];
    frame.extend_from_slice(&(MAX_PAYLOAD as u32).to_be_bytes());
    frame.extend_from_slice(&[0; 100]);
    let mut result = None;
    let largest = largest_allocation(|| result = Some(decode_frame(&frame).map(|m| m.is_none())));
    assert!(matches!(result, Some(Ok(true))), "{result:?}");
    assert!(
        largest < 4096,
        "an incomplete frame allocated {largest} bytes"
    );
    // Past the bound: refused from the header alone, by every decoder.
    for claim in [MAX_PAYLOAD as u32 + 1, u32::MAX] {
        frame[4..8].copy_from_slice(&claim.to_be_bytes());
        let mut buf = BytesMut::from(&frame[..]);
        let largest = largest_allocation(|| {
            assert!(decode_frame(&frame).is_err());
            assert!(parse_frame(&mut buf).is_err());
            assert!(checks::read_all(&frame, 8)
                .pop()
                .is_some_and(|r| r.is_err()));
        });
        assert!(
            largest <= 64 * 1024,
            "a {claim}-byte claim allocated {largest}"
        );
    }
}

#[test]
fn authentication_accepts_only_the_right_proof() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let psk = Psk::parse(checks::KEY).expect("key");
    let exporter: [u8; 32] = blake3::hash(b"fuzz session").into();
    run_cases("authentication", 3_000, |rng| {
        // Key-file text: sometimes shaped like a key, sometimes not.
        let mut text = Vec::new();
        if rng.random() {
            text.extend_from_slice(b"volsync:");
            let hex = b"0123456789abcdefABCDEFxyz :\n";
            let n = rng.random_range(0..140);
            text.extend((0..n).map(|_| hex[rng.random_range(0..hex.len())]));
        } else {
            text = random_bytes(rng, 0..80);
        }
        text.truncate(255);
        let peer = match rng.random_range(0..4) {
            0 => random_bytes(rng, 0..100),
            1 => encode(&Message::Auth {
                proof: rng.random(),
            }),
            2 => {
                let side = if rng.random() {
                    Side::Source
                } else {
                    Side::Destination
                };
                let honest = encode(&Message::Auth {
                    proof: psk.proof(side, &exporter),
                });
                if rng.random() {
                    honest
                } else {
                    mutate(rng, honest)
                }
            }
            _ => {
                let valid = encode(&message(rng));
                mutate(rng, valid)
            }
        };
        let mut input = vec![text.len() as u8];
        input.extend(text);
        input.extend(peer);
        checks::handshake(&rt, &input);
    });
}

/// zstd frames of 1, 4 and 16 MiB of zeros, each a few KiB: made once, they are slow to compress.
fn bombs() -> &'static [Vec<u8>] {
    static BOMBS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    BOMBS.get_or_init(|| {
        [1usize, 4, 16]
            .iter()
            .map(|mib| zstd::bulk::compress(&vec![0u8; mib << 20], 3).expect("compress"))
            .collect()
    })
}

#[test]
fn data_payloads_decode_to_raw_len_or_are_refused_and_bombs_are_capped() {
    run_cases("data payloads", 3_000, |rng| {
        let chunk_len = if rng.random_ratio(1, 4) {
            rng.random_range(1..=MAX_CHUNK_SIZE as usize)
        } else {
            4096 << rng.random_range(0..=6)
        };
        let blocks = chunk_len.div_ceil(4096);
        let valid = if blocks == 64 {
            u64::MAX
        } else {
            (1u64 << blocks) - 1
        };
        let send_mask = match rng.random_range(0..3) {
            0 => rng.random(),
            _ => rng.random::<u64>() & valid,
        };
        let zero_mask = rng.random::<u64>() & valid & !send_mask;
        let sent: usize = (0..blocks as u32)
            .filter(|b| send_mask & (1 << b) != 0)
            .map(|b| blockmover::chunk::block_range(chunk_len, b).len())
            .sum();
        let (encoding, raw_len, payload) = match rng.random_range(0..4) {
            // Honest zstd of compressible blocks.
            0 => {
                let raw = vec![rng.random::<u8>(); sent];
                let z = zstd::bulk::compress(&raw, 1).expect("compress");
                (Encoding::Zstd, sent as u32, z)
            }
            // A bomb: a tiny zstd frame of many MiB of zeros, claiming one chunk's worth.
            1 => {
                let bombs = bombs();
                let z = bombs[rng.random_range(0..bombs.len())].clone();
                (Encoding::Zstd, sent as u32, z)
            }
            2 => (Encoding::Raw, sent as u32, bytes(rng, sent)),
            _ => {
                let enc = if rng.random() {
                    Encoding::Raw
                } else {
                    Encoding::Zstd
                };
                let n = rng.random_range(0..=chunk_len + 64);
                (
                    enc,
                    rng.random_range(0..=chunk_len as u32 + 64),
                    bytes(rng, n),
                )
            }
        };
        let d = DataFrame {
            chunk: 0,
            send_mask,
            zero_mask,
            encoding,
            raw_len,
            payload: Bytes::from(payload),
        };
        let largest = largest_allocation(|| checks::data_frame(&d, chunk_len));
        let bound = MAX_CHUNK_SIZE as usize + d.payload.len();
        assert!(
            largest <= bound,
            "a DATA payload allocated {largest} bytes at once"
        );
    });
}

#[test]
fn fuzz_target_entry_points_accept_any_bytes() {
    // The raw-bytes entry points the cargo-fuzz targets call, on random inputs (the structured cases above cover
    // the properties; this keeps the targets' own input handling compiled and exercised on stable).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    run_cases("fuzz entry points", 2_000, |rng| {
        let input = random_bytes(rng, 0..300);
        checks::frame(&input);
        checks::stream(&input);
        checks::handshake(&rt, &input);
        checks::data_payload(&input);
        checks::nbd_reply(&input);
        checks::lane_parts(&input);
    });
}

#[test]
fn lane_parts_decode_in_order_to_raw_len_and_a_mutated_part_is_refused_or_exact() {
    run_cases("lane parts", 300, |rng| {
        let mut encoder = blockmover::zstream::Encoder::new(rng.random_range(1..=6)).expect("lane");
        let mut decoder = blockmover::zstream::Decoder::new().expect("lane");
        let parts = rng.random_range(1..8);
        for i in 0..parts {
            let len = rng.random_range(1..=65536);
            let raw: Vec<u8> = if rng.random() {
                bytes(rng, len)
            } else {
                (0..len)
                    .map(|k| b"the volume of blocks "[(k * 3 + i) % 21])
                    .collect()
            };
            let mut part = encoder.compress(&raw).expect("compress");
            let mutate = rng.random_ratio(1, 3);
            if mutate && !part.is_empty() {
                let at = rng.random_range(0..part.len());
                part[at] ^= 1 << rng.random_range(0..8);
            }
            match decoder.decompress(&part, raw.len()) {
                // A flipped bit may still decode (zstd has no checksum here; BLAKE3 of the rebuilt chunk is the
                // check): to exactly raw_len bytes, never more.
                Ok(out) => {
                    assert_eq!(out.len(), raw.len());
                    if !mutate {
                        assert_eq!(out, raw, "an intact part decodes to its data");
                    }
                }
                Err(e) => {
                    assert!(mutate, "an intact part of lane was refused: {e}");
                    assert!(!e.contains('\n'), "{e}");
                }
            }
            if mutate {
                // The session ends at the chunk that does not verify: no later part is decoded.
                break;
            }
        }
    });
}

/// A valid NBD reply of any kind (simple or structured, every chunk type), for mutation.
fn nbd_reply(rng: &mut ChaCha8Rng) -> Vec<u8> {
    use blockmover::nbd::reply;
    if rng.random_ratio(1, 6) {
        let mut v = reply::SIMPLE_MAGIC.to_be_bytes().to_vec();
        v.extend(rng.random::<u32>().to_be_bytes());
        v.extend(rng.random::<u64>().to_be_bytes());
        return v;
    }
    let (kind, payload): (u16, Vec<u8>) = match rng.random_range(0..6) {
        0 => (reply::TYPE_NONE, vec![]),
        1 => {
            let mut p = rng.random::<u64>().to_be_bytes().to_vec();
            p.extend(random_bytes(rng, 1..200));
            (reply::TYPE_OFFSET_DATA, p)
        }
        2 => {
            let mut p = rng.random::<u64>().to_be_bytes().to_vec();
            p.extend(rng.random_range(1..u32::MAX).to_be_bytes());
            (reply::TYPE_OFFSET_HOLE, p)
        }
        3 => {
            let mut p = rng.random::<u32>().to_be_bytes().to_vec();
            for _ in 0..count(rng, 8, 100) {
                p.extend(rng.random_range(1..u32::MAX).to_be_bytes());
                p.extend(rng.random::<u32>().to_be_bytes());
            }
            (reply::TYPE_BLOCK_STATUS, p)
        }
        k => {
            let message = random_bytes(rng, 0..100);
            let mut p = rng.random_range(1..200u32).to_be_bytes().to_vec();
            p.extend((message.len() as u16).to_be_bytes());
            p.extend(message);
            if k == 5 {
                p.extend(rng.random::<u64>().to_be_bytes());
                (reply::TYPE_ERROR_OFFSET, p)
            } else {
                (reply::TYPE_ERROR, p)
            }
        }
    };
    let mut v = reply::STRUCTURED_MAGIC.to_be_bytes().to_vec();
    v.extend(reply::FLAG_DONE.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(rng.random::<u64>().to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

#[test]
fn nbd_replies_parse_or_fail_in_one_line_and_allocate_only_for_bytes_they_hold() {
    run_cases("nbd replies", 20_000, |rng| {
        let valid = nbd_reply(rng);
        let input = match rng.random_range(0..4) {
            0 => random_bytes(rng, 0..300),
            1 => valid.clone(),
            2 => mutate(rng, valid.clone()),
            _ => {
                // A header that claims any length, with whatever follows.
                let mut v = valid.clone();
                if v.len() >= 20 && v[..4] == blockmover::nbd::reply::STRUCTURED_MAGIC.to_be_bytes()
                {
                    v[16..20].copy_from_slice(&rng.random::<u32>().to_be_bytes());
                }
                v
            }
        };
        if input == valid {
            assert!(
                matches!(blockmover::nbd::reply::decode(&input), Ok(Some(_))),
                "a valid reply did not parse: {input:?}"
            );
        }
        let largest = largest_allocation(|| checks::nbd_reply(&input));
        assert!(
            largest <= checks::nbd_reply_bound(&input),
            "parsing {} bytes allocated {largest} bytes at once",
            input.len()
        );
    });
}
