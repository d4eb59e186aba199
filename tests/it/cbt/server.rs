//! A SnapshotMetadata server written for these tests, speaking the real gRPC protocol, because a CSI sidecar
//! cannot run here.
//!
//! It is a tonic server over TLS (a test CA and a server certificate for `localhost` and 127.0.0.1 made with
//! rcgen) generated from the same `proto/snapshot_metadata.proto` as the agent's client, but with messages of its
//! own: the agent and this server share only the wire. Snapshots are files: GetMetadataDelta compares the base
//! snapshot's file with the target's block by block and sends the blocks that differ; GetMetadataAllocated sends
//! the blocks of a snapshot that hold a non-zero byte. It checks `security_token` (a wrong one is
//! UNAUTHENTICATED), honours `starting_offset` and `max_results`, logs every call, and can be told
//! ([`Behaviour`]) to send FIXED_LENGTH or VARIABLE_LENGTH ranges, to cut the first streams after some messages
//! (the client must resume), to send a bad range, or to leave a changed range out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_stream::Stream;
use tonic::transport::{Identity, Server as TonicServer, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::pb;
use pb::snapshot_metadata_server::{SnapshotMetadata, SnapshotMetadataServer};
use pb::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};

/// Ranges per message when the request's `max_results` is 0.
const DEFAULT_PAGE: usize = 64;

/// A bad range to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// The first range again after the second.
    NotIncreasing,
    /// A range that ends past the end of the volume.
    PastEnd,
}

/// How the server answers.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Send each block as a range (FIXED_LENGTH), or runs of blocks as one range (VARIABLE_LENGTH).
    pub fixed: bool,
    /// The block size of the comparison.
    pub block: u64,
    /// End the stream with UNAVAILABLE after this many messages ...
    pub cut_after: usize,
    /// ... for this many streams (then serve them whole).
    pub cuts: usize,
    /// Send a bad range in every answer.
    pub bad: Option<Bad>,
    /// Leave the last range out of every answer (a lie no check can see).
    pub lie: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            fixed: true,
            block: 4096,
            cut_after: 0,
            cuts: 0,
            bad: None,
            lie: false,
        }
    }
}

/// One call the server answered (or refused).
#[derive(Clone, Debug)]
pub struct Call {
    /// `GetMetadataDelta` or `GetMetadataAllocated`.
    pub method: &'static str,
    /// The request's `starting_offset`.
    pub starting_offset: i64,
    /// The request's `max_results`.
    pub max_results: i32,
    /// The snapshots named: `base_snapshot_id -> target_snapshot_name`, or `snapshot_name`.
    pub snapshots: String,
    /// Messages sent.
    pub messages: usize,
    /// Whether the token was right.
    pub authenticated: bool,
}

#[derive(Default)]
struct State {
    token: String,
    /// VolumeSnapshot name -> file.
    names: HashMap<String, PathBuf>,
    /// CSI snapshot handle -> file.
    ids: HashMap<String, PathBuf>,
    behaviour: Behaviour,
    calls: Vec<Call>,
}

#[derive(Clone)]
struct Service(Arc<Mutex<State>>);

type Answer<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The running server.
pub struct MetadataServer {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// The PEM file of the CA that signed its certificate.
    pub ca: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetadataServer {
    /// Starts a server on 127.0.0.1 that accepts `token`; writes its CA to `dir/cbt-ca.pem`.
    pub fn start(dir: &Path, token: &str) -> Result<MetadataServer> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "blockmover test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "snapshot-metadata");
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let ca = dir.join("cbt-ca.pem");
        std::fs::write(&ca, ca_cert.pem())?;

        let state = Arc::new(Mutex::new(State {
            token: token.to_owned(),
            ..State::default()
        }));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service(state.clone());
        let identity = Identity::from_pem(cert.pem(), key.serialize_pem());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let started = async {
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    let server = TonicServer::builder()
                        .tls_config(ServerTlsConfig::new().identity(identity))?;
                    anyhow::Ok((listener, server))
                };
                let (listener, mut server) = match started.await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let served = server
                    .add_service(SnapshotMetadataServer::new(service))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
                if let Err(e) = served {
                    eprintln!("test SnapshotMetadata server: {e}");
                }
            });
        });
        ready_rx
            .recv()
            .context("the test server's thread ended")??;
        Ok(MetadataServer {
            addr,
            ca,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serves the file `path` as the VolumeSnapshot `name` whose CSI handle is `id`.
    pub fn snapshot(&self, name: &str, id: &str, path: &Path) {
        let mut s = self.state.lock().expect("state");
        s.names.insert(name.to_owned(), path.to_owned());
        s.ids.insert(id.to_owned(), path.to_owned());
    }

    /// Answers as `behaviour` says from now on.
    pub fn behave(&self, behaviour: Behaviour) {
        self.state.lock().expect("state").behaviour = behaviour;
    }

    /// The calls answered so far (and forgets them).
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state.lock().expect("state").calls)
    }

    /// Stops serving and closes the listening socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The ranges `(offset, length)` of the blocks of `size` bytes where `differs(block)` holds, as fixed blocks or
/// merged runs.
fn ranges(size: u64, block: u64, fixed: bool, differs: impl Fn(u64) -> bool) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = block.min(size - offset);
        if differs(offset) {
            match out.last_mut() {
                Some(last) if !fixed && (last.0 + last.1) as u64 == offset => last.1 += len as i64,
                _ => out.push((offset as i64, len as i64)),
            }
        }
        offset += len;
    }
    out
}

fn read(path: &Path) -> Result<Vec<u8>, Status> {
    std::fs::read(path).map_err(|e| Status::internal(format!("{}: {e}", path.display())))
}

impl Service {
    /// Checks the token, computes the ranges and pages them; logs the call.
    fn answer(
        &self,
        method: &'static str,
        token: &str,
        snapshots: String,
        starting_offset: i64,
        max_results: i32,
        compute: impl FnOnce(&State) -> Result<(u64, Vec<(i64, i64)>), Status>,
    ) -> Result<Paged, Status> {
        let mut state = self.0.lock().map_err(|_| Status::internal("state"))?;
        let authenticated = token == state.token;
        let mut call = Call {
            method,
            starting_offset,
            max_results,
            snapshots,
            messages: 0,
            authenticated,
        };
        if !authenticated {
            state.calls.push(call);
            return Err(Status::unauthenticated("the security token is not valid"));
        }
        let computed = compute(&state);
        let (size, mut ranges) = match computed {
            Ok(c) => c,
            Err(e) => {
                state.calls.push(call);
                return Err(e);
            }
        };
        let b = state.behaviour.clone();
        if b.lie {
            ranges.pop();
        }
        match b.bad {
            Some(Bad::NotIncreasing) if ranges.len() >= 2 => ranges.insert(2, ranges[0]),
            Some(Bad::NotIncreasing) => ranges.extend([(0, b.block as i64), (0, b.block as i64)]),
            Some(Bad::PastEnd) => ranges.push((size as i64, b.block as i64)),
            None => {}
        }
        ranges.retain(|(o, l)| o + l > starting_offset);
        let page = if max_results > 0 {
            max_results as usize
        } else {
            DEFAULT_PAGE
        };
        let mut pages: Vec<Vec<(i64, i64)>> = ranges.chunks(page).map(<[_]>::to_vec).collect();
        if pages.is_empty() {
            pages.push(Vec::new());
        }
        let cut = if state.behaviour.cuts > 0 && pages.len() > b.cut_after {
            state.behaviour.cuts -= 1;
            pages.truncate(b.cut_after);
            Some(b.cut_after)
        } else {
            None
        };
        call.messages = pages.len();
        state.calls.push(call);
        let kind = if b.fixed {
            BlockMetadataType::FixedLength
        } else {
            BlockMetadataType::VariableLength
        };
        Ok(Paged {
            kind: kind as i32,
            capacity: size as i64,
            pages,
            cut,
        })
    }
}

/// An answer in messages.
struct Paged {
    kind: i32,
    capacity: i64,
    /// The ranges of each message.
    pages: Vec<Vec<(i64, i64)>>,
    /// Whether the stream ends with UNAVAILABLE after them (how many messages).
    cut: Option<usize>,
}

fn stream<T: Send + 'static>(
    pages: Vec<Vec<(i64, i64)>>,
    cut: Option<usize>,
    make: impl Fn(Vec<BlockMetadata>) -> T,
) -> Answer<T> {
    let mut items: Vec<Result<T, Status>> = pages
        .into_iter()
        .map(|p| {
            Ok(make(
                p.into_iter()
                    .map(|(byte_offset, size_bytes)| BlockMetadata {
                        byte_offset,
                        size_bytes,
                    })
                    .collect(),
            ))
        })
        .collect();
    if let Some(n) = cut {
        items.push(Err(Status::unavailable(format!(
            "stream cut by the test server after {n} messages"
        ))));
    }
    Box::pin(tokio_stream::iter(items))
}

fn snapshot_file<'a>(map: &'a HashMap<String, PathBuf>, key: &str) -> Result<&'a PathBuf, Status> {
    map.get(key)
        .ok_or_else(|| Status::not_found(format!("no snapshot {key:?}")))
}

#[tonic::async_trait]
impl SnapshotMetadata for Service {
    type GetMetadataAllocatedStream = Answer<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Answer<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        let Paged {
            kind,
            capacity,
            pages,
            cut,
        } = self.answer(
            "GetMetadataAllocated",
            &r.security_token,
            format!("{}/{}", r.namespace, r.snapshot_name),
            r.starting_offset,
            r.max_results,
            |s| {
                let data = read(snapshot_file(&s.names, &r.snapshot_name)?)?;
                let (size, b) = (data.len() as u64, s.behaviour.block);
                let block = |o: u64| &data[o as usize..(o + b).min(size) as usize];
                Ok((
                    size,
                    ranges(size, b, s.behaviour.fixed, |o| {
                        block(o).iter().any(|&x| x != 0)
                    }),
                ))
            },
        )?;
        Ok(Response::new(stream(pages, cut, |block_metadata| {
            GetMetadataAllocatedResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata,
            }
        })))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        let Paged {
            kind,
            capacity,
            pages,
            cut,
        } = self.answer(
            "GetMetadataDelta",
            &r.security_token,
            format!(
                "{} -> {}/{}",
                r.base_snapshot_id, r.namespace, r.target_snapshot_name
            ),
            r.starting_offset,
            r.max_results,
            |s| {
                let base = read(snapshot_file(&s.ids, &r.base_snapshot_id)?)?;
                let target = read(snapshot_file(&s.names, &r.target_snapshot_name)?)?;
                if base.len() != target.len() {
                    return Err(Status::failed_precondition("the snapshots differ in size"));
                }
                let (size, b) = (target.len() as u64, s.behaviour.block);
                let span = |o: u64| o as usize..(o + b).min(size) as usize;
                Ok((
                    size,
                    ranges(size, b, s.behaviour.fixed, |o| {
                        base[span(o)] != target[span(o)]
                    }),
                ))
            },
        )?;
        Ok(Response::new(stream(pages, cut, |block_metadata| {
            GetMetadataDeltaResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata,
            }
        })))
    }
}
