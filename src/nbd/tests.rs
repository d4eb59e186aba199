//! The client against a test server written here that speaks the real NBD protocol (fixed newstyle handshake and
//! transmission, over a real Unix socket), for what qemu-nbd cannot be made to do: answer out of order, advertise
//! a small maximum block size, refuse structured replies, claim huge lengths, fall silent, hang up, fail a read.
//! The same client against the real qemu-nbd is tested in `tests/it/nbd/`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::reply::{
    FLAG_DONE, SIMPLE_MAGIC, STRUCTURED_MAGIC, TYPE_ERROR, TYPE_NONE, TYPE_OFFSET_DATA,
    TYPE_OFFSET_HOLE,
};
use super::{Address, Client, Options};
use crate::error::Error;

const SIZE: u64 = 1 << 20;

/// How the test server behaves.
#[derive(Clone, Copy, Default)]
struct Script {
    /// Refuse NBD_OPT_STRUCTURED_REPLY (answer simple replies).
    no_structured: bool,
    /// The maximum block size advertised (0: no NBD_INFO_BLOCK_SIZE).
    max_block: u32,
    /// Claim this length in the NBD_OPT_STRUCTURED_REPLY answer.
    huge_option_reply: bool,
    /// What to do with reads.
    reads: Reads,
}

#[derive(Clone, Copy, Default, PartialEq)]
enum Reads {
    /// Answer, two at a time in reverse order when two are waiting, each in two chunks (second half first).
    #[default]
    Answer,
    /// Read requests, never answer.
    Silent,
    /// Hang up after the handshake.
    HangUp,
    /// Claim a 4 GiB structured payload.
    Huge,
    /// Answer the first read with an EIO error chunk, the rest normally.
    FailFirst,
    /// Answer with the first half twice: as many bytes as asked, the second half never sent.
    Overlap,
    /// Answer with one-byte holes, one every 50 ms.
    Trickle,
}

/// What the server saw: every request `(type, offset, length)`.
type Seen = Arc<Mutex<Vec<(u16, u64, u32)>>>;

fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8], claimed: Option<u32>) {
    let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    m.extend(option.to_be_bytes());
    m.extend(kind.to_be_bytes());
    m.extend(claimed.unwrap_or(data.len() as u32).to_be_bytes());
    m.extend(data);
    let _ = s.write_all(&m);
}

fn handshake(s: &mut UnixStream, script: Script) -> Option<bool> {
    s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes()).ok()?;
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes()).ok()?;
    s.write_all(&3u16.to_be_bytes()).ok()?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).ok()?;
    let mut structured = false;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).ok()?;
        let (option, len) = (u32_at(&head[8..]), u32_at(&head[12..]));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).ok()?;
        match option {
            8 if script.huge_option_reply => {
                option_reply(s, 8, 1, &[], Some(1 << 30));
                return None;
            }
            8 if script.no_structured => option_reply(s, 8, (1 << 31) + 1, &[], None),
            8 => {
                structured = true;
                option_reply(s, 8, 1, &[], None);
            }
            10 => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend(b"base:allocation");
                option_reply(s, 10, 4, &ctx, None);
                option_reply(s, 10, 1, &[], None);
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend(SIZE.to_be_bytes());
                info.extend(3u16.to_be_bytes()); // HAS_FLAGS | READ_ONLY
                option_reply(s, 7, 3, &info, None);
                if script.max_block > 0 {
                    let mut b = 3u16.to_be_bytes().to_vec();
                    for v in [1u32, 4096, script.max_block] {
                        b.extend(v.to_be_bytes());
                    }
                    option_reply(s, 7, 3, &b, None);
                }
                option_reply(s, 7, 1, &[], None);
                return Some(structured);
            }
            _ => option_reply(s, option, (1 << 31) + 1, &[], None),
        }
    }
}

fn structured(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

fn answer(s: &mut UnixStream, structured_replies: bool, (cookie, offset, length): (u64, u64, u32)) {
    let data: Vec<u8> = (offset..offset + u64::from(length)).map(byte_at).collect();
    let mut out = Vec::new();
    if !structured_replies {
        out.extend(SIMPLE_MAGIC.to_be_bytes());
        out.extend(0u32.to_be_bytes());
        out.extend(cookie.to_be_bytes());
        out.extend(&data);
    } else {
        // The second half first, then the first; a zero range as a hole; DONE in a NONE chunk.
        let half = data.len() / 2;
        for (at, part) in [(half, &data[half..]), (0, &data[..half])] {
            if part.is_empty() {
                continue;
            }
            let mut p = (offset + at as u64).to_be_bytes().to_vec();
            if part.iter().all(|b| *b == 0) {
                p.extend((part.len() as u32).to_be_bytes());
                out.extend(structured(cookie, 0, TYPE_OFFSET_HOLE, &p));
            } else {
                p.extend(part);
                out.extend(structured(cookie, 0, TYPE_OFFSET_DATA, &p));
            }
        }
        out.extend(structured(cookie, FLAG_DONE, TYPE_NONE, &[]));
    }
    let _ = s.write_all(&out);
}

/// Serves one connection on `listener` after `script`; returns what it saw when the client disconnects.
fn serve(listener: UnixListener, script: Script, seen: Seen) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let Some(structured_replies) = handshake(&mut s, script) else {
            return;
        };
        if script.reads == Reads::HangUp {
            return;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(30)));
        let mut waiting: Vec<(u64, u64, u32)> = Vec::new();
        let mut failed_one = false;
        loop {
            let mut req = [0u8; 28];
            match s.read_exact(&mut req) {
                Ok(()) => {
                    let kind = u16::from_be_bytes([req[6], req[7]]);
                    let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
                    let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
                    let length = u32_at(&req[24..]);
                    seen.lock().map(|mut v| v.push((kind, offset, length))).ok();
                    if kind == 2 {
                        return; // NBD_CMD_DISC
                    }
                    match script.reads {
                        Reads::Silent => continue,
                        Reads::Huge => {
                            let mut h = structured(cookie, 0, TYPE_OFFSET_DATA, &[]);
                            h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                            let _ = s.write_all(&h);
                            continue;
                        }
                        Reads::Overlap => {
                            let half = length / 2;
                            for _ in 0..2 {
                                let mut p = offset.to_be_bytes().to_vec();
                                p.extend(half.to_be_bytes());
                                let _ = s.write_all(&structured(cookie, 0, TYPE_OFFSET_HOLE, &p));
                            }
                            let _ = s.write_all(&structured(cookie, FLAG_DONE, TYPE_NONE, &[]));
                            continue;
                        }
                        Reads::Trickle => {
                            for i in 0..u64::from(length) {
                                let mut p = (offset + i).to_be_bytes().to_vec();
                                p.extend(1u32.to_be_bytes());
                                if s.write_all(&structured(cookie, 0, TYPE_OFFSET_HOLE, &p))
                                    .is_err()
                                {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            continue;
                        }
                        Reads::FailFirst if !failed_one => {
                            failed_one = true;
                            let mut p = 5u32.to_be_bytes().to_vec();
                            p.extend(7u16.to_be_bytes());
                            p.extend(b"bad sec");
                            let _ = s.write_all(&structured(cookie, FLAG_DONE, TYPE_ERROR, &p));
                            continue;
                        }
                        _ => waiting.push((cookie, offset, length)),
                    }
                    if waiting.len() >= 2 {
                        while let Some(r) = waiting.pop() {
                            answer(&mut s, structured_replies, r);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    while let Some(r) = waiting.pop() {
                        answer(&mut s, structured_replies, r);
                    }
                }
                Err(_) => return,
            }
        }
    })
}

struct Server {
    _dir: tempfile::TempDir,
    address: Address,
    seen: Seen,
    thread: Option<JoinHandle<()>>,
}

fn server(script: Script) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock)?;
    let seen: Seen = Arc::default();
    let thread = serve(listener, script, seen.clone());
    let address = Address::parse(&format!("nbd+unix:///x?socket={}", sock.display()))
        .map_err(anyhow::Error::msg)?;
    Ok(Server {
        _dir: dir,
        address,
        seen,
        thread: Some(thread),
    })
}

fn options(timeout_ms: u64) -> Options {
    Options {
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_millis(timeout_ms),
        contexts: vec!["base:allocation".into()],
    }
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(byte_at).collect()
}

#[test]
fn reads_from_many_threads_are_pipelined_split_and_answered_out_of_order() -> anyhow::Result<()> {
    let mut srv = server(Script {
        max_block: 65536,
        ..Script::default()
    })?;
    let client = Arc::new(Client::connect(&srv.address, &options(5000))?);
    assert_eq!(client.size(), SIZE);
    assert_eq!(client.export().context("base:allocation"), Some(1));
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || -> crate::error::Result<bool> {
                let offset = i * 200_000 + 7;
                let mut buf = vec![0xEEu8; 200_000];
                c.read_at(&mut buf, offset)?;
                Ok(buf == expected(offset, buf.len()))
            })
        })
        .collect();
    for t in threads {
        assert!(
            t.join().map_err(|_| anyhow::anyhow!("reader panicked"))??,
            "bytes differ"
        );
    }
    assert_eq!(client.bytes_read(), 800_000);
    drop(client);
    if let Some(t) = srv.thread.take() {
        let _ = t.join();
    }
    let seen = srv
        .seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let reads: Vec<_> = seen.iter().filter(|r| r.0 == 0).collect();
    assert_eq!(
        reads.len(),
        16,
        "each 200000-byte read split in 4 requests of at most 64 KiB: {seen:?}"
    );
    assert!(reads.iter().all(|r| r.2 <= 65536));
    assert_eq!(seen.last().map(|r| r.0), Some(2), "NBD_CMD_DISC on drop");
    Ok(())
}

#[test]
fn a_server_without_structured_replies_is_read_through_simple_replies() -> anyhow::Result<()> {
    let srv = server(Script {
        no_structured: true,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(5000))?;
    assert!(!client.export().structured);
    assert!(
        client.export().contexts.is_empty(),
        "no metadata contexts without structured replies"
    );
    let mut buf = vec![0u8; 70_000];
    client.read_at(&mut buf, 1000)?;
    assert_eq!(buf, expected(1000, buf.len()));
    let e = client
        .block_status(1, 0, 4096)
        .expect_err("no block status");
    assert!(e.to_string().contains("structured replies"), "{e}");
    let e = client
        .read_at(&mut buf, SIZE - 10)
        .expect_err("past the end");
    assert!(e.to_string().contains("past the export"), "{e}");
    Ok(())
}

#[test]
fn claimed_lengths_are_refused_before_anything_is_allocated() -> anyhow::Result<()> {
    let srv = server(Script {
        huge_option_reply: true,
        ..Script::default()
    })?;
    let e = Client::connect(&srv.address, &options(5000)).expect_err("1 GiB option reply");
    assert!(e.to_string().contains("more than the 65536 allowed"), "{e}");
    assert!(!e.is_retryable());

    let srv = server(Script {
        reads: Reads::Huge,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(5000))?;
    let mut buf = vec![0u8; 4096];
    let e = client.read_at(&mut buf, 0).expect_err("4 GiB reply");
    assert!(
        e.to_string().contains("broke the protocol") && e.to_string().contains("more than"),
        "{e}"
    );
    assert!(!e.is_retryable(), "a protocol violation is permanent: {e}");
    let e = client
        .read_at(&mut buf, 0)
        .expect_err("the connection is gone");
    assert!(
        e.to_string().contains("broke the protocol") && !e.is_retryable(),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_silent_server_fails_the_waiting_and_every_later_read_within_the_timeout() -> anyhow::Result<()>
{
    let srv = server(Script {
        reads: Reads::Silent,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(300))?;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let e = client.read_at(&mut buf, 0).expect_err("no reply");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(e.is_retryable(), "{e}");
    assert!(
        matches!(&e, Error::Nbd { reason, .. } if reason.contains("frozen")),
        "{e}"
    );
    let start = Instant::now();
    let again = client.read_at(&mut buf, 0).expect_err("gone");
    assert!(again.is_retryable());
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "a later read fails at once"
    );
    Ok(())
}

#[test]
fn a_server_that_hangs_up_fails_reads_retryably() -> anyhow::Result<()> {
    let srv = server(Script {
        reads: Reads::HangUp,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(5000))?;
    let mut buf = vec![0u8; 4096];
    let e = client.read_at(&mut buf, 0).expect_err("hung up");
    assert!(e.is_retryable(), "{e}");
    assert!(!e.to_string().contains('\n'));
    Ok(())
}

#[test]
fn an_error_reply_fails_that_read_and_the_connection_goes_on() -> anyhow::Result<()> {
    let srv = server(Script {
        reads: Reads::FailFirst,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(5000))?;
    let mut buf = vec![0u8; 4096];
    let e = client.read_at(&mut buf, 8192).expect_err("EIO");
    assert!(
        e.to_string().contains("EIO") && e.to_string().contains("bad sec"),
        "{e}"
    );
    assert!(!e.is_retryable());
    client.read_at(&mut buf, 8192)?;
    assert_eq!(buf, expected(8192, 4096));
    Ok(())
}

#[test]
fn overlapping_chunks_that_add_up_are_a_protocol_violation_not_a_read() -> anyhow::Result<()> {
    let srv = server(Script {
        reads: Reads::Overlap,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(5000))?;
    let mut buf = vec![0xEEu8; 8192];
    let e = client
        .read_at(&mut buf, 0)
        .expect_err("the second half was never sent");
    assert!(e.to_string().contains("overlap"), "{e}");
    assert!(!e.is_retryable());
    Ok(())
}

#[test]
fn a_server_trickling_chunks_cannot_stretch_a_read_past_the_timeout() -> anyhow::Result<()> {
    let srv = server(Script {
        reads: Reads::Trickle,
        ..Script::default()
    })?;
    let client = Client::connect(&srv.address, &options(300))?;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let e = client
        .read_at(&mut buf, 0)
        .expect_err("4096 chunks at 50 ms each");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        e.is_retryable() && e.to_string().contains("no reply"),
        "{e}"
    );
    Ok(())
}
