//! `/metrics` scraped over real HTTP/1.1 on loopback and parsed by an independent parser (`prometheus_parse`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use prometheus_parse::{Scrape, Value as Metric};

/// Safety net for one scrape's response.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /metrics` on `addr`: fails unless the answer is `200 OK`; returns the response head (status line and
/// headers) and the parsed body.
pub fn scrape_with_head(addr: SocketAddr) -> Result<(String, Scrape)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    tcp.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {response:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Ok((head.to_owned(), parse(body)?))
}

/// `GET /metrics` on `addr`, parsed; fails unless the answer is `200 OK`.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    Ok(scrape_with_head(addr)?.1)
}

/// A text exposition, parsed.
fn parse(body: &str) -> Result<Scrape> {
    Ok(Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?)
}

/// The value of the first sample named exactly `name` (carrying `label=value` if given), or None when the scrape
/// has none; summaries and histograms give their number of quantiles or buckets.
pub fn metric(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match &x.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            Metric::Summary(q) => q.len() as f64,
            Metric::Histogram(h) => h.len() as f64,
        })
}

/// `blockmover_rejected_connections_total{reason}` of the agent serving metrics at `addr` (0 when absent).
pub fn rejected(addr: SocketAddr, reason: &str) -> Result<f64> {
    let s = scrape(addr)?;
    let name = "blockmover_rejected_connections_total";
    Ok(metric(&s, name, Some(("reason", reason))).unwrap_or(0.0))
}

#[test]
fn metric_reads_a_labelled_gauge_and_not_a_longer_name() -> Result<()> {
    let body = "# HELP x\nblockmover_progress_scanned_bytes_extra{a=\"b\"} 9\n\
                blockmover_progress_scanned_bytes{obj_name=\"v\"} 4096\n";
    let s = parse(body)?;
    assert_eq!(
        metric(&s, "blockmover_progress_scanned_bytes", None),
        Some(4096.0)
    );
    assert_eq!(metric(&s, "blockmover_progress_total_bytes", None), None);
    Ok(())
}
