//! A real TCP proxy on 127.0.0.1:0 that injects faults into forwarded streams (std threads, no mocks).
//!
//! Every accepted connection is forwarded to one target address by two pump threads, one per
//! direction. Offsets are stream offsets within one connection and one direction; the faults of a
//! direction apply to every connection. `Up` is client -> target (source -> destination), `Down`
//! is the way back. Faults:
//! - `flip_at(n)`: XOR byte `n` of the stream with [`FLIP_MASK`];
//! - `cut_at(n)`: forward exactly `n` bytes, then shut down and close both sockets of the
//!   connection (like a peer that vanished: later data from either end is answered with a reset);
//! - `stall_at(n)`: forward exactly `n` bytes, report [`Stalled`] and forward nothing more until
//!   [`Proxy::release`] (or until [`Proxy::close`] tears the connection down);
//! - `mark_at(n)`: forward exactly `n` bytes, report [`Marked`], and go on forwarding (a seeded trigger
//!   for something the test does next, such as `kill -9` of an agent while bytes still flow);
//! - `delay(d)`: sleep `d` before forwarding each chunk read (a slow link, not synchronisation).
//!
//! [`Proxy::fired`] counts the faults that took effect (a flip, cut, stall or mark whose offset the stream
//! reached), so a test can tell an injected fault from one planned past the end of the stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

/// The mask a flipped byte is XORed with.
pub const FLIP_MASK: u8 = 0x5a;

/// Largest chunk a pump reads and forwards at once.
const PUMP_BUF: usize = 16 * 1024;

/// Direction of a forwarded stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to target: source -> destination.
    Up,
    /// Target to client: destination -> source.
    Down,
}

/// Faults injected into one direction. The default injects none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    flip_at: Option<u64>,
    cut_at: Option<u64>,
    stall_at: Option<u64>,
    mark_at: Option<u64>,
    delay: Option<Duration>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }
    /// XOR the byte at stream offset `offset` with [`FLIP_MASK`].
    pub fn flip_at(self, offset: u64) -> Self {
        Self {
            flip_at: Some(offset),
            ..self
        }
    }
    /// Forward exactly `offset` bytes, then close both sockets of the connection.
    pub fn cut_at(self, offset: u64) -> Self {
        Self {
            cut_at: Some(offset),
            ..self
        }
    }
    /// Forward exactly `offset` bytes, report [`Stalled`], then hold until released or closed.
    pub fn stall_at(self, offset: u64) -> Self {
        Self {
            stall_at: Some(offset),
            ..self
        }
    }
    /// Forward exactly `offset` bytes, report [`Marked`], then keep forwarding.
    pub fn mark_at(self, offset: u64) -> Self {
        Self {
            mark_at: Some(offset),
            ..self
        }
    }
    /// Sleep `delay` before forwarding each chunk.
    pub fn delay(self, delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..self
        }
    }
}

/// Report that a direction reached its `stall_at` offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    /// The stalled direction.
    pub direction: Direction,
    /// Bytes forwarded in that direction of that connection when it stalled.
    pub offset: u64,
}

/// Report that a direction reached its `mark_at` offset; forwarding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    /// The marked direction.
    pub direction: Direction,
    /// Bytes forwarded in that direction of that connection when the mark was reached.
    pub offset: u64,
}

/// Shared state of the proxy: released/closed flags and the connections to tear down on close.
#[derive(Default)]
struct Gate {
    released: bool,
    closed: bool,
    connections: Vec<Weak<Connection>>,
}

/// The two sockets of one forwarded connection. Only the two pumps own it, so the sockets are
/// closed (not just shut down) once both pumps have ended; the kernel then answers anything a
/// peer still sends with a reset instead of letting its writes block on a full window.
struct Connection {
    client: TcpStream,
    server: TcpStream,
}

impl Connection {
    fn shutdown(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

struct Shared {
    gate: Mutex<Gate>,
    wake: Condvar,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    fired: AtomicU64,
}

impl Shared {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        // A pump that panicked cannot leave the gate inconsistent: take it anyway.
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn counter(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::Up => &self.up_bytes,
            Direction::Down => &self.down_bytes,
        }
    }
}

/// A running fault-injecting proxy; dropping it closes it.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stalled: Receiver<Stalled>,
    marked: Receiver<Marked>,
}

impl Proxy {
    /// Listen on 127.0.0.1:0 and forward every connection to `target` with `up` and `down` faults.
    pub fn start(target: SocketAddr, up: Faults, down: Faults) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            gate: Mutex::new(Gate::default()),
            wake: Condvar::new(),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        });
        let (stall_tx, stalled) = mpsc::channel();
        let (mark_tx, marked) = mpsc::channel();
        let accept_shared = Arc::clone(&shared);
        let reports = Reports {
            stalled: stall_tx,
            marked: mark_tx,
        };
        thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, target, up, down, accept_shared, reports))?;
        Ok(Proxy {
            addr,
            shared,
            stalled,
            marked,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes forwarded in `direction`, over all connections so far.
    pub fn bytes_forwarded(&self, direction: Direction) -> u64 {
        self.shared.counter(direction).load(Ordering::SeqCst)
    }

    /// Faults that took effect so far: flips applied, cuts made, stall and mark points reached.
    pub fn fired(&self) -> u64 {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// A mark reached since the last call, if any (does not wait).
    pub fn try_marked(&self) -> Option<Marked> {
        self.marked.try_recv().ok()
    }

    /// A stall point reached since the last call, if any (does not wait).
    pub fn try_stalled(&self) -> Option<Stalled> {
        self.stalled.try_recv().ok()
    }

    /// Block until a direction reaches its stall point; `timeout` is a safety net only.
    pub fn wait_stalled(&self, timeout: Duration) -> anyhow::Result<Stalled> {
        self.stalled.recv_timeout(timeout).map_err(|e| {
            anyhow::anyhow!("proxy did not reach its stall point within {timeout:?}: {e}")
        })
    }

    /// Block until a direction reaches its mark point; `timeout` is a safety net only.
    pub fn wait_marked(&self, timeout: Duration) -> anyhow::Result<Marked> {
        self.marked.recv_timeout(timeout).map_err(|e| {
            anyhow::anyhow!("proxy did not reach its mark point within {timeout:?}: {e}")
        })
    }

    /// Let stalled directions forward again (a stall point is reported and honoured once).
    pub fn release(&self) {
        self.shared.gate().released = true;
        self.shared.wake.notify_all();
    }

    /// Stop accepting and shut down every forwarded connection (both sockets, both ways).
    pub fn close(&self) {
        let mut gate = self.shared.gate();
        if gate.closed {
            return;
        }
        gate.closed = true;
        for connection in gate.connections.drain(..).filter_map(|c| c.upgrade()) {
            connection.shutdown();
        }
        drop(gate);
        self.shared.wake.notify_all();
        // Wake the accept loop so it sees `closed` and exits.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    up: Faults,
    down: Faults,
    shared: Arc<Shared>,
    reports: Reports,
) {
    for client in listener.incoming() {
        if shared.gate().closed {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let connection = Arc::new(Connection { client, server });
        shared.gate().connections.push(Arc::downgrade(&connection));
        for (direction, faults) in [(Direction::Up, up), (Direction::Down, down)] {
            let pump = Pump {
                direction,
                connection: Arc::clone(&connection),
                faults,
                shared: Arc::clone(&shared),
                reports: reports.clone(),
            };
            let spawned = thread::Builder::new()
                .name(format!("proxy-{direction:?}"))
                .spawn(move || pump.run());
            if spawned.is_err() {
                connection.shutdown();
            }
        }
    }
}

/// Where pumps report the stall and mark points they reach.
#[derive(Clone)]
struct Reports {
    stalled: Sender<Stalled>,
    marked: Sender<Marked>,
}

/// One direction of one connection.
struct Pump {
    direction: Direction,
    connection: Arc<Connection>,
    faults: Faults,
    shared: Arc<Shared>,
    reports: Reports,
}

impl Pump {
    /// The socket this pump reads from and the one it writes to.
    fn ends(&self) -> (&TcpStream, &TcpStream) {
        let c = &self.connection;
        match self.direction {
            Direction::Up => (&c.client, &c.server),
            Direction::Down => (&c.server, &c.client),
        }
    }

    fn run(self) {
        let (mut from, mut to) = self.ends();
        let mut buf = vec![0u8; PUMP_BUF];
        let mut offset = 0u64;
        let mut stall = self.faults.stall_at;
        let mut mark = self.faults.mark_at;
        loop {
            if self.faults.cut_at == Some(offset) {
                self.fire();
                self.connection.shutdown();
                return;
            }
            if mark == Some(offset) {
                mark = None;
                self.fire();
                let _ = self.reports.marked.send(Marked {
                    direction: self.direction,
                    offset,
                });
            }
            if stall == Some(offset) {
                stall = None;
                self.fire();
                if !self.hold(offset) {
                    self.connection.shutdown();
                    return;
                }
            }
            // Never read past the next cut, mark or stall point, so exactly that many bytes go through.
            let next_event = [self.faults.cut_at, stall, mark]
                .into_iter()
                .flatten()
                .filter(|&at| at > offset)
                .min();
            let want = next_event.map_or(PUMP_BUF as u64, |at| (at - offset).min(PUMP_BUF as u64));
            let n = match from.read(&mut buf[..want as usize]) {
                Ok(0) => {
                    // Orderly end of this direction: pass the half-close on.
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.connection.shutdown();
                    return;
                }
            };
            if let Some(at) = self.faults.flip_at {
                if (offset..offset + n as u64).contains(&at) {
                    buf[(at - offset) as usize] ^= FLIP_MASK;
                    self.fire();
                }
            }
            if let Some(delay) = self.faults.delay {
                thread::sleep(delay);
            }
            if to.write_all(&buf[..n]).is_err() {
                self.connection.shutdown();
                return;
            }
            offset += n as u64;
            self.shared
                .counter(self.direction)
                .fetch_add(n as u64, Ordering::SeqCst);
        }
    }

    fn fire(&self) {
        self.shared.fired.fetch_add(1, Ordering::SeqCst);
    }

    /// Report the stall and wait for release (true) or close (false).
    fn hold(&self, offset: u64) -> bool {
        let _ = self.reports.stalled.send(Stalled {
            direction: self.direction,
            offset,
        });
        let mut gate = self.shared.gate();
        while !gate.released && !gate.closed {
            gate = self
                .shared
                .wake
                .wait(gate)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        !gate.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD_LEN: usize = 100_000;
    const GUARD: Duration = Duration::from_secs(30);

    /// An echo server that reports, per connection, how many bytes it received.
    fn echo_server() -> io::Result<(SocketAddr, Receiver<u64>)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 4096];
                    let mut received = 0u64;
                    let mut echoing = true;
                    // Count what arrives even after the way back has failed.
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        received += n as u64;
                        echoing = echoing && stream.write_all(&buf[..n]).is_ok();
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                    let _ = tx.send(received);
                });
            }
        });
        Ok((addr, rx))
    }

    fn payload() -> Vec<u8> {
        (0..PAYLOAD_LEN).map(|i| (i % 251) as u8).collect()
    }

    /// Send `data` on a thread (so a cut cannot deadlock the test) and read until EOF or error.
    fn exchange(addr: SocketAddr, data: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(GUARD))?;
        let mut writer = stream.try_clone()?;
        let sender = thread::spawn(move || {
            let _ = writer.write_all(&data);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    anyhow::bail!("no EOF within {GUARD:?}")
                }
                Err(_) => break, // reset counts as the end of the stream
            }
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        Ok(received)
    }

    #[test]
    fn proxy_without_faults_forwards_everything_and_counts_bytes() -> anyhow::Result<()> {
        let (echo, received) = echo_server()?;
        let proxy = Proxy::start(
            echo,
            Faults::none(),
            Faults::none().delay(Duration::from_millis(1)),
        )?;
        assert_eq!(exchange(proxy.addr(), payload())?, payload());
        assert_eq!(received.recv_timeout(GUARD)?, PAYLOAD_LEN as u64);
        assert_eq!(proxy.bytes_forwarded(Direction::Up), PAYLOAD_LEN as u64);
        assert_eq!(proxy.bytes_forwarded(Direction::Down), PAYLOAD_LEN as u64);
        Ok(())
    }

    #[test]
    fn flip_at_changes_exactly_one_byte() -> anyhow::Result<()> {
        let (echo, _) = echo_server()?;
        let proxy = Proxy::start(echo, Faults::none().flip_at(54_321), Faults::none())?;
        let got = exchange(proxy.addr(), payload())?;
        let mut want = payload();
        want[54_321] ^= FLIP_MASK;
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn cut_at_forwards_exactly_that_many_bytes_then_closes() -> anyhow::Result<()> {
        let (echo, received) = echo_server()?;
        let up = Proxy::start(echo, Faults::none().cut_at(50_000), Faults::none())?;
        let got = exchange(up.addr(), payload())?;
        assert_eq!(
            received.recv_timeout(GUARD)?,
            50_000,
            "echo server got exactly the cut offset"
        );
        assert!(got.len() <= 50_000 && got[..] == payload()[..got.len()]);
        assert_eq!(up.bytes_forwarded(Direction::Up), 50_000);

        let down = Proxy::start(echo, Faults::none(), Faults::none().cut_at(30_000))?;
        let got = exchange(down.addr(), payload())?;
        assert_eq!(got, payload()[..30_000]);
        assert_eq!(down.bytes_forwarded(Direction::Down), 30_000);
        Ok(())
    }

    #[test]
    fn stall_at_holds_until_released_or_closed() -> anyhow::Result<()> {
        let (echo, _) = echo_server()?;
        let proxy = Proxy::start(echo, Faults::none().stall_at(40_000), Faults::none())?;
        let mut stream = TcpStream::connect(proxy.addr())?;
        stream.set_read_timeout(Some(GUARD))?;
        stream.write_all(&payload())?;
        let stalled = proxy.wait_stalled(GUARD)?;
        assert_eq!(
            stalled,
            Stalled {
                direction: Direction::Up,
                offset: 40_000
            }
        );
        assert_eq!(proxy.bytes_forwarded(Direction::Up), 40_000);
        let mut head = vec![0u8; 40_000];
        stream.read_exact(&mut head)?;
        assert_eq!(head, payload()[..40_000]);
        proxy.release();
        let mut tail = vec![0u8; PAYLOAD_LEN - 40_000];
        stream.read_exact(&mut tail)?;
        assert_eq!(tail, payload()[40_000..]);

        // A second connection stalls again; closing tears it down instead of releasing it.
        let stalls = Proxy::start(echo, Faults::none().stall_at(1_000), Faults::none())?;
        let mut stream = TcpStream::connect(stalls.addr())?;
        stream.set_read_timeout(Some(GUARD))?;
        stream.write_all(&payload()[..5_000])?;
        stalls.wait_stalled(GUARD)?;
        stalls.close();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest); // EOF or reset, but never a hang
        assert!(rest.len() <= 1_000);
        assert_eq!(stalls.bytes_forwarded(Direction::Up), 1_000);
        Ok(())
    }

    #[test]
    fn mark_at_reports_once_and_forwards_everything() -> anyhow::Result<()> {
        let (echo, received) = echo_server()?;
        let proxy = Proxy::start(echo, Faults::none().mark_at(12_345), Faults::none())?;
        assert_eq!(exchange(proxy.addr(), payload())?, payload());
        assert_eq!(received.recv_timeout(GUARD)?, PAYLOAD_LEN as u64);
        assert_eq!(
            proxy.wait_marked(GUARD)?,
            Marked {
                direction: Direction::Up,
                offset: 12_345
            }
        );
        assert!(proxy.try_marked().is_none(), "a mark is reported once");
        assert_eq!(proxy.fired(), 1);

        let beyond = Proxy::start(
            echo,
            Faults::none().flip_at(PAYLOAD_LEN as u64 + 1),
            Faults::none(),
        )?;
        assert_eq!(exchange(beyond.addr(), payload())?, payload());
        assert_eq!(
            beyond.fired(),
            0,
            "a fault past the end of the stream never fires"
        );
        Ok(())
    }
}
