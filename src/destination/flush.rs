//! Write-behind: makes the target durable in the background while the sync runs, so the final fsync (which success
//! waits for) has only the tail left. On a full sync the final fsync was about 40% of the sync's wall time.
//!
//! A background fsync that fails consumes the error: Linux reports a writeback error once per open file, so a
//! later fsync of the same file may succeed although data was lost. The flusher therefore keeps its error and
//! [`Flusher::finish`] returns it, and the sync fails.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::volume::Volume;

/// Bytes written that start a background fsync at once.
pub const FLUSH_EVERY: u64 = 64 << 20;
/// Fewer bytes (at least [`FLUSH_SOME`]) start one after [`FLUSH_AFTER`]: an incremental sync writes a few MiB
/// of scattered blocks across the whole scan, and their writeback should overlap the scan too.
pub const FLUSH_SOME: u64 = 1 << 20;
/// See [`FLUSH_SOME`].
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// Starts an fsync of the target on its own thread each time [`FLUSH_EVERY`] more bytes were written, or
/// [`FLUSH_SOME`] within [`FLUSH_AFTER`] (skipped while one is still running: the next one covers both). Dropped
/// without [`Flusher::finish`] (a failed session), it does not wait: the thread ends after its current fsync.
pub struct Flusher {
    request: Option<SyncSender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
    pending: u64,
    since: Instant,
}

impl Flusher {
    /// A flusher for `target`.
    pub fn new(target: Arc<Volume>) -> Result<Self> {
        let (tx, rx) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || {
                for () in rx {
                    target.sync()?;
                }
                Ok(())
            })
            .map_err(|e| Error::Config(format!("cannot start the flush thread: {e}")))?;
        Ok(Flusher {
            request: Some(tx),
            thread: Some(thread),
            pending: 0,
            since: Instant::now(),
        })
    }

    /// Notes `bytes` written, and asks for a background fsync when enough are pending.
    pub fn wrote(&mut self, bytes: u64) {
        self.pending += bytes;
        let due = self.pending >= FLUSH_EVERY
            || (self.pending >= FLUSH_SOME && self.since.elapsed() >= FLUSH_AFTER);
        if !due {
            return;
        }
        if let Some(tx) = &self.request {
            match tx.try_send(()) {
                Ok(()) => {
                    self.pending = 0;
                    self.since = Instant::now();
                }
                Err(TrySendError::Full(())) => {}
                // The thread ended on an error; finish() reports it.
                Err(TrySendError::Disconnected(())) => self.request = None,
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
            f.wrote(FLUSH_EVERY / 2);
        }
        f.finish()?;
        assert_eq!(std::fs::read(&p)?, vec![1u8; 4 << 20]);
        Ok(())
    }
}
