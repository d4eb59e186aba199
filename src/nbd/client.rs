//! One NBD connection shared by many threads (`qemu-nbd` serves one client at a time by default).
//!
//! Requests go out under a sender lock; a reader thread reads every reply and hands it to the caller waiting on
//! its cookie, so the scan's workers each have a request in flight (the pipeline depth is the number of callers).
//! Reads longer than the server's maximum block size are split. Every wait is bounded by [`Options::timeout`]:
//! a caller that waits longer shuts the connection down (a frozen server fails every request then, not each after
//! its own timeout), and a server that goes away fails every waiting and later request with a retryable
//! [`Error::Nbd`]. `NBD_CMD_DISC` is sent when the client is dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::handshake::{self, Export};
use super::reply::{self, Chunk, Extent, Header};
use super::stream::Stream;
use super::uri::{Address, Transport};
use crate::error::{Error, Result};

const REQUEST_MAGIC: u32 = 0x2560_9513;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
/// `ESHUTDOWN`: the server is going away; a retry may succeed.
const ESHUTDOWN: u32 = 108;

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Limit on connecting and on the whole handshake.
    pub connect_timeout: Duration,
    /// Limit on every wait for a reply (and on sending a request).
    pub timeout: Duration,
    /// Metadata contexts to ask for (e.g. [`super::BASE_ALLOCATION`], `qemu:dirty-bitmap:NAME`).
    pub contexts: Vec<String>,
}

/// What the reader thread hands to a waiting caller.
#[derive(Debug)]
enum Event {
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Hole {
        offset: u64,
        length: u32,
    },
    Status {
        context: u32,
        extents: Vec<Extent>,
    },
    Error {
        code: u32,
        message: String,
    },
    Done,
    /// The connection is gone: why, and whether a retry may help.
    Gone(String, bool),
}

/// A caller waiting on a cookie.
struct Waiter {
    tx: Sender<Event>,
    /// For a read: its offset and length (a simple reply's data is as long as the request).
    read: Option<(u64, u32)>,
}

#[derive(Default)]
struct State {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is gone, once it is, and whether a retry may help (not after a protocol violation).
    gone: Option<(String, bool)>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection gone and fails every waiting caller.
    fn fail_all(&self, reason: String, retryable: bool) {
        let mut st = self.lock();
        let (reason, retryable) = st.gone.get_or_insert((reason, retryable)).clone();
        for (_, w) in st.waiters.drain() {
            let _ = w.tx.send(Event::Gone(reason.clone(), retryable));
        }
    }
}

/// An open NBD export (see the module doc).
pub struct Client {
    address: Address,
    export: Export,
    writer: Mutex<Stream>,
    /// A handle for shutting the socket down from any thread.
    control: Stream,
    shared: Arc<Shared>,
    cookies: AtomicU64,
    timeout: Duration,
    bytes_read: AtomicU64,
    reads: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address.uri())
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `address`, negotiates, and starts the reader thread.
    pub fn connect(address: &Address, options: &Options) -> Result<Client> {
        let err = |reason: String, retryable: bool| Error::Nbd {
            export: address.to_string(),
            reason,
            retryable,
        };
        let mut stream =
            match &address.transport {
                Transport::Unix(path) => UnixStream::connect(path)
                    .map(Stream::Unix)
                    .map_err(|e| err(format!("cannot connect to {}: {e}", path.display()), true))?,
                Transport::Tcp { host, port } => {
                    let addrs = (host.as_str(), *port)
                        .to_socket_addrs()
                        .map_err(|e| err(format!("cannot resolve {host}: {e}"), true))?;
                    let mut last = io::Error::other("no address");
                    let mut found = None;
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, options.connect_timeout) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                found = Some(s);
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    Stream::Tcp(found.ok_or_else(|| {
                        err(format!("cannot connect to {host}:{port}: {last}"), true)
                    })?)
                }
            };
        let setup = |e: io::Error| err(format!("socket setup: {e}"), true);
        stream
            .set_timeouts(Some(options.connect_timeout), Some(options.connect_timeout))
            .map_err(setup)?;
        let export = handshake::negotiate(&mut stream, &address.export, &options.contexts)
            .map_err(|f| err(f.reason, f.retryable))?;
        if !export.read_only() {
            tracing::warn!(
                "nbd export {address} is writable: sync from a read-only point-in-time export (qemu-nbd -r, a backup job's export)"
            );
        }
        // The reader waits as long as it must (callers time out and shut the socket down); sends are bounded.
        stream
            .set_timeouts(None, Some(options.timeout))
            .map_err(setup)?;
        let (reader, control) = (
            stream.try_clone().map_err(setup)?,
            stream.try_clone().map_err(setup)?,
        );
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                let reason = read_replies(reader, &thread_shared);
                let (reason, retryable) = reason;
                thread_shared.fail_all(reason, retryable);
            })
            .map_err(|e| err(format!("cannot start the reader thread: {e}"), false))?;
        tracing::info!(
            size = export.size,
            max_block = export.max_block,
            structured = export.structured,
            contexts = ?export.contexts,
            "nbd export {address} opened"
        );
        Ok(Client {
            address: address.clone(),
            export,
            writer: Mutex::new(stream),
            control,
            shared,
            cookies: AtomicU64::new(1),
            timeout: options.timeout,
            bytes_read: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// What the handshake established.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The address it was opened from.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Bytes read from the export so far (data and holes the server reported in read replies).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn error(&self, reason: String, retryable: bool) -> Error {
        Error::Nbd {
            export: self.address.to_string(),
            reason,
            retryable,
        }
    }

    /// Shuts the connection down: every waiting and later request fails with `reason`.
    fn kill(&self, reason: String, retryable: bool) {
        self.shared.fail_all(reason, retryable);
        self.control.shutdown();
    }

    /// Sends one request; the receiver gets its reply's events.
    fn request(&self, cmd: u16, offset: u64, length: u32) -> Result<Receiver<Event>> {
        let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut st = self.shared.lock();
            if let Some((reason, retryable)) = &st.gone {
                return Err(self.error(reason.clone(), *retryable));
            }
            let read = (cmd == CMD_READ).then_some((offset, length));
            st.waiters.insert(cookie, Waiter { tx, read });
        }
        let mut msg = [0u8; 28];
        msg[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[6..8].copy_from_slice(&cmd.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&length.to_be_bytes());
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&msg)
        };
        if let Err(e) = sent {
            let reason = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "the server took no request for {}s (frozen?)",
                    self.timeout.as_secs_f64()
                ),
                _ => format!("the connection failed: {e}"),
            };
            self.kill(reason.clone(), true);
            return Err(self.error(reason, true));
        }
        Ok(rx)
    }

    /// The next event of a reply, before the request's `deadline` (its start plus the timeout: a server that
    /// trickles chunks cannot stretch one request past it).
    fn next(
        &self,
        rx: &Receiver<Event>,
        deadline: Instant,
        what: &dyn Fn() -> String,
    ) -> Result<Event> {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Gone(reason, retryable)) => Err(self.error(reason, retryable)),
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => {
                let reason = format!(
                    "no reply to {} within {}s (the server is frozen or overloaded)",
                    what(),
                    self.timeout.as_secs_f64()
                );
                self.kill(reason.clone(), true);
                Err(self.error(reason, true))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let gone = self.shared.lock().gone.clone();
                let (reason, retryable) =
                    gone.unwrap_or_else(|| ("the connection is closed".into(), true));
                Err(self.error(reason, retryable))
            }
        }
    }

    /// A reply that breaks the protocol: the connection cannot be trusted any more.
    fn violation(&self, reason: String) -> Error {
        self.kill(format!("the server broke the protocol: {reason}"), false);
        self.error(format!("the server broke the protocol: {reason}"), false)
    }

    /// Where `n` bytes a reply puts at export offset `o` go in the buffer of a read of `len` bytes at `offset`:
    /// inside the request and overlapping nothing filled before, or the server broke the protocol.
    fn place(
        &self,
        filled: &mut BTreeMap<u64, u64>,
        offset: u64,
        len: u32,
        o: u64,
        n: u64,
    ) -> Result<usize> {
        let end = offset + u64::from(len);
        let Some(at) = o.checked_sub(offset).filter(|a| a + n <= u64::from(len)) else {
            return Err(self.violation(format!(
                "read reply at offset {o} ({n} bytes) outside the request [{offset}, {end})"
            )));
        };
        let before = filled
            .range(..=at)
            .next_back()
            .is_some_and(|(_, e)| *e > at);
        let after = filled.range(at..).next().is_some_and(|(s, _)| *s < at + n);
        if before || after {
            return Err(self.violation(format!(
                "read reply chunks overlap at offset {o} ({n} bytes)"
            )));
        }
        filled.insert(at, at + n);
        Ok(at as usize)
    }

    /// Fills `buf` from export offset `offset`, in requests of at most the server's maximum block size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.export.size);
        if end.is_none() {
            return Err(self.error(
                format!(
                    "read of {} bytes at offset {offset} is past the export's {} bytes",
                    buf.len(),
                    self.export.size
                ),
                false,
            ));
        }
        let max = self.export.max_block as usize;
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            self.read_piece(piece, offset + (i * max) as u64)?;
        }
        Ok(())
    }

    fn read_piece(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u32;
        let rx = self.request(CMD_READ, offset, len)?;
        let what = || format!("a read of {len} bytes at offset {offset}");
        let deadline = Instant::now() + self.timeout;
        // The ranges filled so far (start -> end, relative): chunks of one reply must not overlap, or a byte
        // counted twice would leave another unfilled (holding whatever the buffer held before).
        let mut filled = BTreeMap::new();
        let (mut covered, mut failure) = (0u64, None);
        loop {
            match self.next(&rx, deadline, &what)? {
                Event::Data { offset: o, data } => {
                    let at = self.place(&mut filled, offset, len, o, data.len() as u64)?;
                    buf[at..at + data.len()].copy_from_slice(&data);
                    covered += data.len() as u64;
                }
                Event::Hole { offset: o, length } => {
                    let at = self.place(&mut filled, offset, len, o, u64::from(length))?;
                    buf[at..at + length as usize].fill(0);
                    covered += u64::from(length);
                }
                Event::Error { code, message } => failure = Some((code, message)),
                Event::Status { .. } => {
                    return Err(self.violation("block status in a read reply".into()))
                }
                Event::Done => break,
                Event::Gone(reason, retryable) => return Err(self.error(reason, retryable)),
            }
        }
        if let Some((code, message)) = failure {
            return Err(self.error(
                format!(
                    "read of {len} bytes at offset {offset} failed: {} ({code}) {message}",
                    reply::errno_name(code)
                )
                .trim_end()
                .to_owned(),
                code == ESHUTDOWN,
            ));
        }
        if covered != u64::from(len) {
            return Err(self.violation(format!(
                "a read of {len} bytes at offset {offset} was answered with {covered} bytes"
            )));
        }
        self.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `NBD_CMD_BLOCK_STATUS` of `[offset, offset + length)`: the descriptors of metadata context `context`,
    /// clamped to the end of the export (they cover at least one byte; the rest of the range is asked again).
    pub fn block_status(&self, context: u32, offset: u64, length: u32) -> Result<Vec<Extent>> {
        if !self.export.structured {
            return Err(self.error(
                "block status needs structured replies, which the server lacks".into(),
                false,
            ));
        }
        let rx = self.request(CMD_BLOCK_STATUS, offset, length)?;
        let what = || format!("a block status of {length} bytes at offset {offset}");
        let deadline = Instant::now() + self.timeout;
        let (mut found, mut failure) = (None, None);
        loop {
            match self.next(&rx, deadline, &what)? {
                Event::Status {
                    context: c,
                    extents,
                } if c == context => found = Some(extents),
                Event::Status { context: c, .. }
                    if self.export.contexts.iter().any(|(id, _)| *id == c) => {}
                Event::Status { context: c, .. } => {
                    return Err(self.violation(format!(
                        "block status for context {c}, which was never selected"
                    )))
                }
                Event::Error { code, message } => failure = Some((code, message)),
                Event::Data { .. } | Event::Hole { .. } => {
                    return Err(self.violation("read data in a block status reply".into()))
                }
                Event::Done => break,
                Event::Gone(reason, retryable) => return Err(self.error(reason, retryable)),
            }
        }
        if let Some((code, message)) = failure {
            return Err(self.error(
                format!(
                    "block status at offset {offset} failed: {} ({code}) {message}",
                    reply::errno_name(code)
                )
                .trim_end()
                .to_owned(),
                code == ESHUTDOWN,
            ));
        }
        found.ok_or_else(|| {
            self.violation(format!(
                "no block status for context {context} at offset {offset}"
            ))
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        tracing::info!(
            "nbd export {}: {} bytes read in {} reads; disconnecting",
            self.address,
            self.bytes_read(),
            self.reads.load(Ordering::Relaxed)
        );
        let mut msg = [0u8; 28];
        msg[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let gone = self.shared.lock().gone.is_some();
        if !gone {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.write_all(&msg);
        }
        self.shared.fail_all("the client disconnected".into(), true);
        self.control.shutdown();
    }
}

/// The reader thread: reads replies until the connection ends, handing each to its waiter; returns why it ended.
/// Why the reader ended: a connection that failed (retryable) or a server that broke the protocol (not).
enum Ended {
    Io(String),
    Violation(String),
}

fn read_replies(mut s: Stream, shared: &Shared) -> (String, bool) {
    match read_loop(&mut s, shared) {
        Ok(never) => match never {},
        Err(Ended::Io(reason)) => (reason, true),
        Err(Ended::Violation(reason)) => {
            (format!("the server broke the protocol: {reason}"), false)
        }
    }
}

fn read_loop(
    s: &mut Stream,
    shared: &Shared,
) -> std::result::Result<std::convert::Infallible, Ended> {
    let io = |e: io::Error| {
        Ended::Io(match e.kind() {
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
            _ => format!("the connection failed: {e}"),
        })
    };
    let violation = |e: reply::ReplyError| Ended::Violation(e.0);
    loop {
        let mut head = [0u8; reply::STRUCTURED_HEADER];
        s.read_exact(&mut head[..4]).map_err(io)?;
        let len = reply::header_len(&head[..4]).map_err(violation)?;
        s.read_exact(&mut head[4..len]).map_err(io)?;
        match reply::parse_header(&head[..len]).map_err(violation)? {
            Header::Simple { error, cookie } => {
                let waiter = shared.lock().waiters.remove(&cookie);
                let Some(waiter) = waiter else {
                    return Err(Ended::Violation(format!(
                        "a reply to unknown cookie {cookie}"
                    )));
                };
                if error != 0 {
                    let _ = waiter.tx.send(Event::Error {
                        code: error,
                        message: String::new(),
                    });
                } else if let Some((offset, length)) = waiter.read {
                    // Our own request's length: at most the maximum block size.
                    let mut data = vec![0u8; length as usize];
                    s.read_exact(&mut data).map_err(io)?;
                    let _ = waiter.tx.send(Event::Data { offset, data });
                }
                let _ = waiter.tx.send(Event::Done);
            }
            Header::Structured {
                flags,
                kind,
                cookie,
                length,
            } => {
                // Bounded by parse_header (MAX_PAYLOAD).
                let mut payload = vec![0u8; length as usize];
                s.read_exact(&mut payload).map_err(io)?;
                let event = match reply::parse_chunk(kind, flags, &payload).map_err(violation)? {
                    Chunk::None => None,
                    Chunk::Data { offset, .. } => {
                        payload.drain(..8);
                        Some(Event::Data {
                            offset,
                            data: payload,
                        })
                    }
                    Chunk::Hole { offset, length } => Some(Event::Hole { offset, length }),
                    Chunk::BlockStatus { context, extents } => {
                        Some(Event::Status { context, extents })
                    }
                    Chunk::Error {
                        code,
                        message,
                        offset,
                    } => Some(Event::Error {
                        code,
                        message: match offset {
                            Some(o) => format!("at offset {o}: {message}"),
                            None => message,
                        },
                    }),
                };
                let done = flags & reply::FLAG_DONE != 0;
                let mut st = shared.lock();
                let tx = if done {
                    st.waiters.remove(&cookie).map(|w| w.tx)
                } else {
                    st.waiters.get(&cookie).map(|w| w.tx.clone())
                };
                drop(st);
                let Some(tx) = tx else {
                    return Err(Ended::Violation(format!(
                        "a reply to unknown cookie {cookie}"
                    )));
                };
                if let Some(event) = event {
                    let _ = tx.send(event);
                }
                if done {
                    let _ = tx.send(Event::Done);
                }
            }
        }
    }
}
