//! One sync of an authenticated source into the target: READY, the target's scan, the worker that verifies and
//! writes, and the status that records it.
//!
//! The status says Successful only after the worker returned the volume digest (everything compared, verified,
//! written, fsynced, and with `--read-back` read back); then COMMIT tells the source. Every failure is logged once
//! here, recorded Failed in the status, and told to the source in an ABORT when the link still works.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::Instrument;

use super::accept::{Arrival, Hello, Session};
use super::{apply, inbox, DestinationConfig, INBOX};
use crate::chunk::{Digest, Geometry, BLOCK_SIZE};
use crate::codec::{FrameReader, FrameWriter, Message, SyncKind};
use crate::error::{Error, Result};
use crate::net::{
    finish_writer, linger_close, ready_now, spawn_writer, tell_peer, within, ABORT_GRACE,
};
use crate::progress::Progress;
use crate::stats::Figures;
use crate::status::{Role, StatusFile};
use crate::volume::Volume;

/// What a session shares with the serve loop.
pub struct Shared {
    /// The target, opened (exclusively) at start-up; each session works on a duplicate of this handle.
    pub target: Arc<Volume>,
    /// Held by the session worker, the only writer of the target: a session waits for it before writing, so a
    /// superseded session can never write behind its successor's back.
    pub writing: Arc<tokio::sync::Mutex<()>>,
    /// The address the destination listens on (for `rsyncTLS.address`).
    pub local: String,
    /// When a full comparison is due.
    pub policy: Arc<crate::delta::Policy>,
}

/// Aborts a task when dropped: a failed session must not leave its writer blocked on a dead peer, which would
/// keep the worker (and with it the target) blocked on a full outbox.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one session and records it: SyncInProgress, then Successful or Failed. `superseded` turns true when the
/// same source connected again: the session then ends, telling its (stale) peer why.
pub async fn run(
    config: &DestinationConfig,
    shared: &Shared,
    arrival: Arrival,
    superseded: watch::Receiver<bool>,
) -> Result<Digest> {
    let span = tracing::info_span!("session", peer = %arrival.peer, source = %arrival.hello.source);
    let started = arrival.started;
    let result = async {
        tracing::info!("source connected");
        let result = recorded(config, shared, arrival, superseded).await;
        if let Err(e) = &result {
            tracing::error!("sync failed: {e}");
        }
        result
    }
    .instrument(span)
    .await;
    if let Some(m) = &config.metrics {
        m.finished(result.is_ok(), started.elapsed());
    }
    result
}

async fn recorded(
    config: &DestinationConfig,
    shared: &Shared,
    arrival: Arrival,
    superseded: watch::Receiver<bool>,
) -> Result<Digest> {
    let Arrival {
        figures,
        started,
        hello,
        session: (reader, mut writer),
        ..
    } = arrival;
    if let Some(m) = &config.metrics {
        m.started(figures.clone());
    }
    // Its in-progress state is written by the session, while it decides the sync's kind.
    let status = StatusFile::load(config.status.clone(), Role::Destination).map(|mut s| {
        s.set_rsync_tls_address(shared.local.clone());
        s.set_schedule(config.schedule.clone());
        s
    });
    let mut status = match status {
        Ok(s) => s,
        Err(e) => {
            // The source must learn why (not see a reset connection), and so must whoever reads the logs.
            return Err(refused(&mut writer, Error::from(e)).await);
        }
    };
    let result = session(
        config,
        shared,
        hello,
        (reader, writer),
        figures.clone(),
        &mut status,
        started,
        superseded,
    )
    .await;
    // A status that could not be written (its in-progress state, or Successful) is not written again to say so.
    match &result {
        Ok(_) | Err(Error::Status(_)) => {}
        Err(e) => {
            let logs = format!("{}error: {e}\n", figures.summary(started.elapsed()));
            if let Err(s) =
                status.fail(chrono::Utc::now(), &e.to_string(), figures.external(), logs)
            {
                tracing::error!("cannot record the failure: {s}");
            }
        }
    }
    result
}

/// `e`, after telling the source in an ABORT (best effort, for at most [`ABORT_GRACE`]): a session refused before
/// its worker starts.
async fn refused<W: tokio::io::AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, e: Error) -> Error {
    let abort = Message::Abort {
        code: e.abort_code(),
        message: e.to_string(),
    };
    let _ = within("send", ABORT_GRACE, writer.send(&abort)).await;
    e
}

/// Resolves when the serve loop says a new connection of the same source supersedes this session.
async fn superseded_by_retry(mut rx: watch::Receiver<bool>) -> Error {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            // The serve loop is gone: nothing will supersede this session.
            std::future::pending::<()>().await;
        }
    }
    Error::Superseded
}

#[allow(clippy::too_many_arguments)]
async fn session(
    config: &DestinationConfig,
    shared: &Shared,
    hello: Hello,
    (mut reader, mut writer): Session,
    figures: Arc<Figures>,
    status: &mut StatusFile,
    started: Instant,
    superseded: watch::Receiver<bool>,
) -> Result<Digest> {
    let t = config.timeouts;
    let superseded = superseded_by_retry(superseded);
    tokio::pin!(superseded);
    let opened = open_target(shared, &hello);
    // A superseded session's worker may still be finishing a batch: wait until it cannot write any more.
    let writing = within("wait for the previous session", t.handshake, async {
        Ok(shared.writing.clone().lock_owned().await)
    })
    .await;
    let opened = opened.and_then(|o| writing.map(|w| (o, w)));
    let ((target, geometry), writing) = match opened {
        Ok(o) => o,
        Err(e) => return Err(refused(&mut writer, e).await),
    };
    figures.set_geometry(&geometry);
    let target = Arc::new(target);
    // Validating a manifest reads it whole (32 bytes per chunk): not on the runtime's threads.
    let basis = {
        let (state, policy, offer, t) = (
            config.state.clone(),
            shared.policy.clone(),
            hello.offer,
            target.clone(),
        );
        let deciding = tokio::task::spawn_blocking(move || {
            super::basis::decide(&state, &policy, &offer, &t, geometry)
        });
        // Meanwhile the status says a sync is in progress, durably before READY, so before any write to the
        // target: a crash in the middle of the sync cannot leave it saying Successful.
        let begun = status.begin(chrono::Utc::now());
        let basis = deciding
            .await
            .map_err(|e| Error::Protocol(format!("deciding the sync's kind failed: {e}")));
        match begun.map_err(Error::from).and(basis) {
            Ok(basis) => basis,
            Err(e) => return Err(refused(&mut writer, e).await),
        }
    };
    let kind = basis.kind;
    figures.set_kind(kind, basis.reason);
    tracing::info!(
        target = %config.target.display(),
        volume_size = geometry.volume_size(),
        chunk_size = geometry.chunk_size(),
        kind = %kind,
        "sync started"
    );
    if kind == SyncKind::Full {
        tracing::info!("full comparison: {}", basis.reason);
    }
    let ready = Message::Ready {
        target_size: target.size(),
        window: config.window,
        kind,
        reason: basis.reason,
    };
    within("hello", t.handshake, writer.send(&ready)).await?;
    let _progress = Progress::start("destination", figures.clone());

    // The destination's block digests (with a state directory): written as its target's chunks are hashed and
    // written, read instead of the target in a delta (see `manifest::BlockFile`).
    let blocks = crate::manifest::BlockFile::in_store(&config.state, Role::Destination, geometry);
    // A delta does not hash the target: the manifest says what it holds.
    let local = (!kind.is_delta()).then(|| {
        spawn_target_scan(
            target.clone(),
            geometry,
            figures.bytes_read.clone(),
            blocks.clone(),
        )
    });
    let (outbox, writer_task) = spawn_writer(writer, 256, t.idle);
    let _abort_writer = AbortOnDrop(writer_task.abort_handle());
    let (inbox_tx, mut inbox_rx) = inbox::channel(INBOX);
    let worker = {
        let apply = apply::Apply::new(
            target,
            geometry,
            local,
            outbox.clone(),
            figures.clone(),
            apply::Options {
                window: config.window,
                read_back: config.read_back,
                blocks,
            },
            basis,
        );
        tokio::task::spawn_blocking(move || {
            let _writing = writing;
            apply.run(&mut inbox_rx)
        })
    };
    let result = tokio::select! {
        r = pump(&mut reader, inbox_tx, worker, t.idle) => r,
        e = &mut superseded => Err(e),
    };
    let digest = match result {
        Ok(d) => d,
        Err(e) => {
            if tell_peer(&e) {
                let abort = Message::Abort {
                    code: e.abort_code(),
                    message: e.to_string(),
                };
                // A peer that stopped reading must not hold the session: the ABORT is best effort.
                let _ = tokio::time::timeout(ABORT_GRACE, outbox.send(abort)).await;
            }
            drop(outbox);
            if let Ok(w) = finish_writer(writer_task, ABORT_GRACE).await {
                if tell_peer(&e) {
                    linger_close(&mut reader, w).await;
                }
            }
            return Err(e);
        }
    };
    // Durable and verified: record success first, then tell the source.
    figures.set_volume_digest(digest);
    shared.policy.served(kind);
    let elapsed = started.elapsed();
    let summary = figures.summary(elapsed);
    for line in summary.lines() {
        tracing::info!("{line}");
    }
    status.succeed(chrono::Utc::now(), figures.external(), summary)?;
    let commit = Message::Commit {
        chunk_count: geometry.chunk_count(),
        volume_size: geometry.volume_size(),
        digest,
    };
    if matches!(
        tokio::time::timeout(t.handshake, outbox.send(commit)).await,
        Ok(Ok(()))
    ) {
        drop(outbox);
        if let Ok(mut w) = finish_writer(writer_task, t.handshake).await {
            if let Err(e) = within("close", t.handshake, w.shutdown()).await {
                tracing::warn!("the sync is durable, but closing the connection failed: {e}");
            }
        }
    }
    tracing::info!(digest = %digest, "sync completed in {:.2}s", elapsed.as_secs_f64());
    Ok(digest)
}

/// This session's handle on the target, writable below the volume's size once the geometry is checked.
fn open_target(shared: &Shared, hello: &Hello) -> Result<(Volume, Geometry)> {
    if hello.block_size != BLOCK_SIZE {
        return Err(Error::Config(format!(
            "the source uses {}-byte blocks; this protocol uses {BLOCK_SIZE}",
            hello.block_size
        )));
    }
    let geometry = Geometry::new(hello.volume_size, hello.chunk_size).map_err(Error::Config)?;
    let mut target = shared.target.try_clone()?;
    target.allow_writes_below(hello.volume_size)?;
    Ok((target, geometry))
}

/// Reads the source's frames into the worker's inbox until the worker finishes or something fails. Each wait for a
/// frame is followed by the frames already read off the socket (a TLS read brings several small ones), handed to
/// the worker together (see `inbox`).
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    inbox: inbox::Sender,
    mut worker: tokio::task::JoinHandle<Result<Digest>>,
    idle: Duration,
) -> Result<Digest> {
    let joined = |r: std::result::Result<Result<Digest>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| Err(Error::Protocol(format!("session worker failed: {e}"))))
    };
    let accepted = |m: Result<Message>| match m {
        Ok(Message::Abort { code, message }) => Err(Error::PeerAbort { code, message }),
        Ok(
            msg @ (Message::Digests { .. }
            | Message::Data(_)
            | Message::Blocks { .. }
            | Message::End { .. }),
        ) => Ok(msg),
        Ok(other) => Err(Error::Protocol(format!(
            "unexpected {} from the source",
            other.name()
        ))),
        Err(e) => Err(e),
    };
    loop {
        tokio::select! {
            r = &mut worker => return joined(r),
            m = within("idle read", idle, reader.expect("sync")) => {
                let mut batch = Vec::with_capacity(inbox::BATCH);
                let mut failed = None;
                let mut next = Some(m);
                while let Some(m) = next.take() {
                    match accepted(m) {
                        Ok(msg) => batch.push(msg),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    if batch.len() < inbox::BATCH {
                        // Cancel-safe: a frame read in part stays in the reader for the next wait.
                        next = ready_now(reader.expect("sync"));
                    }
                }
                // The frames before a failure are the worker's still: its own error may be the cause.
                if !batch.is_empty() && inbox.send(batch).await.is_err() {
                    return joined(worker.await);
                }
                if let Some(e) = failed {
                    drop(inbox);
                    // The worker's own error, if it has one, is the cause; otherwise ours. A worker stuck
                    // sending to a peer that stopped reading is not waited for past the grace period.
                    return match tokio::time::timeout(ABORT_GRACE, worker).await {
                        Ok(Ok(Err(w))) if !matches!(w, Error::PeerClosed(_)) => Err(w),
                        _ => Err(e),
                    };
                }
            }
        }
    }
}

/// Hashes the target's first `volume_size` bytes on a blocking thread, feeding the worker segment by segment; with
/// `blocks`, also computes the chunks' block digests in the same pass and keeps them there.
fn spawn_target_scan(
    target: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
    blocks: Option<Arc<crate::manifest::BlockFile>>,
) -> apply::LocalDigests {
    let (tx, rx) = std::sync::mpsc::sync_channel(crate::scan::READ_AHEAD + 2);
    tokio::task::spawn_blocking(move || {
        let keep = blocks.is_some();
        let r = crate::scan::scan_keeping_blocks(
            None,
            target,
            geometry,
            bytes_read,
            keep,
            |first, s, digests| {
                if let Some(file) = &blocks {
                    file.write_run(first, digests.flat(), digests.stride());
                }
                tx.send(Ok((first, s)))
                    .map_err(|_| Error::Cancelled("session end"))
            },
        );
        if let Err(e) = r {
            let _ = tx.send(Err(e));
        }
    });
    rx
}
