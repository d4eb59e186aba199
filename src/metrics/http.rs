//! A minimal HTTP/1.x server for `GET /metrics`, on tokio alone.
//!
//! Why not hyper: one read-only endpoint scraped every few seconds needs no keep-alive, chunking or routing.
//! What keeps it robust: the request head is read under a timeout and a size limit, at most
//! [`MAX_CONNECTIONS`] are served at once (others wait in the accept queue), every response closes the connection,
//! and nothing a client sends can end the server or touch a sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Metrics;
use crate::error::{Error, Result};

/// The largest request head read.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request head, and to take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The content type of the Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` for the metrics endpoint.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::net("metrics listen", e))
}

/// Serves `metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like pass; back off a little instead of spinning.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(tcp, &metrics).await {
                tracing::debug!(%peer, "metrics: {e}");
            }
            drop(permit);
        });
    }
}

/// Reads one request and answers it.
async fn answer(mut tcp: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let head = tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let (status, body, head_only) = route(head.as_deref(), metrics);
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        if status.starts_with("200") {
            CONTENT_TYPE
        } else {
            "text/plain; charset=utf-8"
        },
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if !head_only {
        response.push_str(&body);
    }
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response"))?
}

/// The status line, body and whether to leave the body out (HEAD) for a request head (`None`: malformed).
fn route(head: Option<&str>, metrics: &Metrics) -> (&'static str, String, bool) {
    let Some(line) = head.and_then(|h| h.lines().next()) else {
        return ("400 Bad Request", "bad request\n".to_owned(), false);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "bad request\n".to_owned(), false);
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", "bad request\n".to_owned(), false);
    }
    let path = target.split('?').next().unwrap_or(target);
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", metrics.render(), head_only),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "not found: try /metrics\n".to_owned(),
            head_only,
        ),
        _ => (
            "405 Method Not Allowed",
            "method not allowed\n".to_owned(),
            false,
        ),
    }
}

/// Reads until the blank line ending the request head; `None` when it is too long, not UTF-8, or cut short.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n")) {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Binds `addr`, serves the metrics in a background task and returns the bound address (for a `:0` port).
pub async fn spawn(
    addr: &str,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = bind(addr).await?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::net("metrics listen", e))?;
    Ok((local, tokio::spawn(serve(listener, metrics))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Labels;
    use crate::status::Role;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(
            Labels {
                name: "n".to_owned(),
                namespace: "ns".to_owned(),
                role: Role::Destination,
            },
            None,
            crate::schedule::system_clock(),
            None,
        ))
    }

    async fn request(addr: SocketAddr, raw: &[u8]) -> anyhow::Result<String> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(raw).await?;
        let mut out = String::new();
        tcp.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn get_metrics_answers_and_other_requests_are_refused_without_ending_the_server(
    ) -> anyhow::Result<()> {
        let (addr, task) = spawn("127.0.0.1:0", metrics()).await?;
        let ok = request(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("volsync_volume_out_of_sync{"), "{ok}");
        let head = request(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").await?;
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("volsync_"),
            "{head}"
        );
        let nf = request(addr, b"GET / HTTP/1.1\r\n\r\n").await?;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = request(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await?;
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
        let garbage = request(addr, b"\x16\x03\x01garbage\r\n\r\n").await?;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let huge = vec![b'a'; MAX_HEAD * 2];
        let long = request(addr, &huge).await?;
        assert!(long.starts_with("HTTP/1.1 400"), "{long}");
        // A client that connects and leaves.
        drop(TcpStream::connect(addr).await?);
        let again = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await?;
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
        task.abort();
        Ok(())
    }
}
