//! A delaying TCP proxy on loopback for `--rtt-ms`: every byte is forwarded half the round-trip time after it
//! arrived, in each direction, without limiting throughput (bytes in flight queue up, as on a long link).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

/// A proxy accepting connections on its own loopback port and relaying them, delayed, to a target.
pub struct DelayProxy {
    addr: SocketAddr,
}

impl DelayProxy {
    /// Starts relaying connections to `target`, adding `rtt / 2` in each direction. Threads end with their
    /// connections; the accept thread ends with the process (a bench run is short).
    pub fn start(target: SocketAddr, rtt: Duration) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("cannot bind the delaying proxy")?;
        let addr = listener.local_addr()?;
        let one_way = rtt / 2;
        thread::Builder::new()
            .name("delay-accept".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    if let Ok(server) = TcpStream::connect(target) {
                        relay(client, server, one_way);
                    }
                }
            })?;
        Ok(Self { addr })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn relay(client: TcpStream, server: TcpStream, delay: Duration) {
    for (from, to) in [(&client, &server), (&server, &client)] {
        if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
            pump(from, to, delay);
        }
    }
}

/// One direction: a reader stamps what arrives, a writer sends it once its time has come.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let _ = to.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let _ = thread::Builder::new()
        .name("delay-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0
                    || tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                {
                    break;
                }
            }
        });
    let _ = thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || {
            for (due, bytes) in rx {
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_intact_and_not_before_the_delay() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0")?;
        let target = echo.local_addr()?;
        thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(40))?;
        let mut c = TcpStream::connect(proxy.addr())?;
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let writer = {
            let mut c = c.try_clone()?;
            let sent = sent.clone();
            thread::spawn(move || c.write_all(&sent))
        };
        let mut back = vec![0u8; sent.len()];
        c.read_exact(&mut back)?;
        // A full round trip through the proxy (there and back) cannot take less than the RTT.
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert!(back == sent, "the proxy altered the bytes");
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok(())
    }
}
