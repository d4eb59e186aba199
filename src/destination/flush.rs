//! Write-behind: makes the target durable in the background while the sync runs, so the final fsync (which success
//! waits for) has only the tail left. On a full sync the final fsync was about 40% of the sync's wall time.
//!
//! A background fsync that fails consumes the error: Linux reports a writeback error once per open file, so a
//! later fsync of the same file may succeed although data was lost. The flusher therefore keeps its error and
//! [`Flusher::finish`] returns it, and the sync fails.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::volume::Volume;

/// Bytes written that start a background fsync at once.
pub const FLUSH_EVERY: u64 = 64 << 20;
/// Bytes written that start their writeback at once, without waiting for it (see [`Volume::start_writeback`]):
/// an incremental sync writes a few MiB of scattered blocks across the whole scan, and the storage should work on
/// them while the scan goes on, so that the final fsync has only the last of them left.
pub const WRITEBACK_EVERY: u64 = 1 << 20;

/// What the flush thread is asked to do.
enum Request {
    Writeback,
    Fsync,
}

/// Starts an fsync of the target on its own thread each time [`FLUSH_EVERY`] more bytes were written, and the
/// writeback of what was written each [`WRITEBACK_EVERY`] (a request is skipped while the thread is still busy
/// with one: the next one covers both). Dropped without [`Flusher::finish`] (a failed session), it does not wait:
/// the thread ends after its current request.
pub struct Flusher {
    request: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<Result<()>>>,
    pending: u64,
    unstarted: u64,
}

impl Flusher {
    /// A flusher for `target`.
    pub fn new(target: Arc<Volume>) -> Result<Self> {
        let (tx, rx) = sync_channel::<Request>(1);
        let thread = std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || {
                for request in rx {
                    match request {
                        Request::Writeback => target.start_writeback()?,
                        Request::Fsync => target.sync()?,
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::Config(format!("cannot start the flush thread: {e}")))?;
        Ok(Flusher {
            request: Some(tx),
            thread: Some(thread),
            pending: 0,
            unstarted: 0,
        })
    }

    /// Notes `bytes` written, and asks for a background fsync or writeback when enough are pending.
    pub fn wrote(&mut self, bytes: u64) {
        self.pending += bytes;
        self.unstarted += bytes;
        let request = if self.pending >= FLUSH_EVERY {
            Request::Fsync
        } else if self.unstarted >= WRITEBACK_EVERY {
            Request::Writeback
        } else {
            return;
        };
        let fsync = matches!(request, Request::Fsync);
        if let Some(tx) = &self.request {
            match tx.try_send(request) {
                Ok(()) => {
                    self.unstarted = 0;
                    if fsync {
                        self.pending = 0;
                    }
                }
                Err(TrySendError::Full(_)) => {}
                // The thread ended on an error; finish() reports it.
                Err(TrySendError::Disconnected(_)) => self.request = None,
            }
        }
    }

    /// Waits for the background fsyncs and returns the first error any of them met.
    pub fn finish(mut self) -> Result<()> {
        self.request = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Config("the flush thread panicked".into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_fsyncs_run_and_finish_reports_success() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("t.img");
        std::fs::File::create(&p)?.set_len(4 << 20)?;
        let mut target = Volume::open_target(&p)?;
        target.allow_writes_below(4 << 20)?;
        let target = Arc::new(target);
        let mut f = Flusher::new(target.clone())?;
        for i in 0..4u64 {
            target.write_all_at(&[1u8; 1 << 20], i << 20)?;
            // Writebacks (1 MiB) and fsyncs (half of FLUSH_EVERY, twice) alike.
            f.wrote(if i % 2 == 0 {
                WRITEBACK_EVERY
            } else {
                FLUSH_EVERY / 2
            });
        }
        f.finish()?;
        assert_eq!(std::fs::read(&p)?, vec![1u8; 4 << 20]);
        Ok(())
    }
}
