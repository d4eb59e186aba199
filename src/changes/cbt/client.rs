//! The gRPC calls to the SnapshotMetadata service (tonic over rustls), each stream resumed where it broke off.
//!
//! No `grpc-timeout` is sent: an answer may stream for minutes on a large volume, and the limits here are on
//! silence (connecting, the call's first answer, each next message), not on the length of an answer.
//!
//! Trusts the service's TLS certificate only when the CA of `--cbt-ca` signed it for the endpoint's name (or
//! `--cbt-server-name`). Every wait has a limit (connect, the call, each message); a stream that fails mid-way
//! with a transient status (the sidecar cuts streams after ten minutes) is asked again from `starting_offset` =
//! the end of the last range received, at most [`MAX_RESUMES`] times. Whatever else goes wrong is a reason
//! string, which the tracker turns into [`crate::error::Error::Tracker`].

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status, Streaming};

use super::pb;
use super::ranges::{Collector, Message};
use super::CbtConfig;

/// How many times one call's stream is resumed after breaking off.
pub const MAX_RESUMES: u32 = 8;

/// A connected client, for one sync.
pub struct Client {
    inner: pb::snapshot_metadata_client::SnapshotMetadataClient<Channel>,
    timeout: Duration,
    max_results: u32,
}

/// The extents of an answer, and how often its stream was resumed.
pub struct Answer {
    /// Sorted, disjoint byte extents `(offset, length)`.
    pub extents: Vec<(u64, u64)>,
    /// Ranges received.
    pub ranges: u64,
    /// Streams resumed.
    pub resumes: u32,
}

/// Why one stream ended without completing the answer.
enum Broken {
    /// A transient failure: ask again from where it stopped.
    Resumable(String),
    /// Anything else: give up.
    Final(String),
}

impl Client {
    /// Connects to the service of `config` over TLS.
    pub async fn connect(config: &CbtConfig) -> Result<Client, String> {
        let ca = std::fs::read(&config.ca)
            .map_err(|e| format!("cannot read CA file {}: {e}", config.ca.display()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from_shared(format!("https://{}", config.endpoint))
            .map_err(|e| format!("endpoint {}: {}", config.endpoint, chain(&e)))?
            .tls_config(tls)
            .map_err(|e| format!("TLS configuration: {}", chain(&e)))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        let channel = tokio::time::timeout(config.timeout, endpoint.connect())
            .await
            .map_err(|_| {
                format!(
                    "no connection to {} within {:?}",
                    config.endpoint, config.timeout
                )
            })?
            .map_err(|e| format!("cannot connect to {}: {}", config.endpoint, chain(&e)))?;
        Ok(Client {
            inner: pb::snapshot_metadata_client::SnapshotMetadataClient::new(channel),
            timeout: config.timeout,
            max_results: config.max_results,
        })
    }

    /// GetMetadataDelta: the ranges that changed from the snapshot whose CSI handle is `base_id` to the
    /// VolumeSnapshot `config.snapshot`.
    pub async fn delta(
        &self,
        config: &CbtConfig,
        token: &str,
        base_id: &str,
        volume_size: u64,
    ) -> Result<Answer, String> {
        let (timeout, max_results) = (self.timeout, self.max_results);
        let inner = &self.inner;
        collect(
            "GetMetadataDelta",
            volume_size,
            max_results,
            timeout,
            |start| {
                let request = tonic::Request::new(pb::GetMetadataDeltaRequest {
                    security_token: token.to_owned(),
                    namespace: config.namespace.clone(),
                    base_snapshot_id: base_id.to_owned(),
                    target_snapshot_name: config.snapshot.clone(),
                    starting_offset: start,
                    max_results: i32::try_from(max_results).unwrap_or(i32::MAX),
                });
                let mut client = inner.clone();
                async move {
                    let stream = client.get_metadata_delta(request).await?.into_inner();
                    Ok(Stream::Delta(stream))
                }
            },
        )
        .await
    }

    /// GetMetadataAllocated: the ranges of the VolumeSnapshot `config.snapshot` that hold data.
    pub async fn allocated(
        &self,
        config: &CbtConfig,
        token: &str,
        volume_size: u64,
    ) -> Result<Answer, String> {
        let (timeout, max_results) = (self.timeout, self.max_results);
        let inner = &self.inner;
        collect(
            "GetMetadataAllocated",
            volume_size,
            max_results,
            timeout,
            |start| {
                let request = tonic::Request::new(pb::GetMetadataAllocatedRequest {
                    security_token: token.to_owned(),
                    namespace: config.namespace.clone(),
                    snapshot_name: config.snapshot.clone(),
                    starting_offset: start,
                    max_results: i32::try_from(max_results).unwrap_or(i32::MAX),
                });
                let mut client = inner.clone();
                async move {
                    let stream = client.get_metadata_allocated(request).await?.into_inner();
                    Ok(Stream::Allocated(stream))
                }
            },
        )
        .await
    }
}

/// Either call's response stream.
enum Stream {
    Delta(Streaming<pb::GetMetadataDeltaResponse>),
    Allocated(Streaming<pb::GetMetadataAllocatedResponse>),
}

impl Stream {
    /// The next message as `(type, capacity, ranges)`, or None at the end of the stream.
    async fn next(&mut self) -> Result<Option<(i32, i64, Vec<(i64, i64)>)>, Status> {
        fn pairs(b: &[pb::BlockMetadata]) -> Vec<(i64, i64)> {
            b.iter().map(|m| (m.byte_offset, m.size_bytes)).collect()
        }
        Ok(match self {
            Stream::Delta(s) => s.message().await?.map(|m| {
                (
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    pairs(&m.block_metadata),
                )
            }),
            Stream::Allocated(s) => s.message().await?.map(|m| {
                (
                    m.block_metadata_type,
                    m.volume_capacity_bytes,
                    pairs(&m.block_metadata),
                )
            }),
        })
    }
}

/// Runs one call to the end of its answer, resuming its stream when it breaks off.
async fn collect<F, Fut>(
    method: &str,
    volume_size: u64,
    max_results: u32,
    timeout: Duration,
    mut open: F,
) -> Result<Answer, String>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<Stream, Status>>,
{
    let mut collector = Collector::new(volume_size, max_results);
    let mut resumes = 0;
    loop {
        let start = collector.resume_offset();
        match stream_once(&mut open, start, &mut collector, timeout).await {
            Ok(()) => {
                return Ok(Answer {
                    ranges: collector.ranges(),
                    extents: collector.finish(),
                    resumes,
                })
            }
            Err(Broken::Resumable(why)) if resumes < MAX_RESUMES => {
                resumes += 1;
                tracing::warn!(
                    "{method}: {why}; resuming at byte {} ({resumes} of at most {MAX_RESUMES})",
                    collector.resume_offset()
                );
            }
            Err(Broken::Resumable(why)) => {
                return Err(format!(
                    "{method}: {why}, after {MAX_RESUMES} resumed streams"
                ))
            }
            Err(Broken::Final(why)) => return Err(format!("{method}: {why}")),
        }
    }
}

/// One stream from `start` to its end (Ok) or to a failure.
async fn stream_once<F, Fut>(
    open: &mut F,
    start: u64,
    collector: &mut Collector,
    timeout: Duration,
) -> Result<(), Broken>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<Stream, Status>>,
{
    let start = i64::try_from(start).map_err(|_| Broken::Final(format!("offset {start}")))?;
    let mut stream = tokio::time::timeout(timeout, open(start))
        .await
        .map_err(|_| Broken::Final(format!("no answer within {timeout:?}")))?
        .map_err(broken)?;
    loop {
        let next = tokio::time::timeout(timeout, stream.next())
            .await
            .map_err(|_| Broken::Final(format!("no message within {timeout:?}")))?
            .map_err(broken)?;
        let Some((kind, capacity, ranges)) = next else {
            return Ok(());
        };
        collector
            .push(&Message {
                kind,
                capacity,
                ranges: &ranges,
            })
            .map_err(|why| Broken::Final(format!("refused: {why}")))?;
    }
}

/// A status that may be transient (a stream cut, a sidecar restarting) is resumed; the rest (authentication,
/// unknown snapshots, bad arguments) would fail again.
fn broken(status: Status) -> Broken {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Unknown
        | Code::Internal => Broken::Resumable(text),
        _ => Broken::Final(text),
    }
}

/// An error and its causes on one line (tonic's transport errors say little at the top).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
