//! The source's window: how many announced chunks the destination has not settled yet, and their digests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::chunk::Digest;

/// The chunks announced and not yet acknowledged as settled, with the digests announced for them (at most a
/// window of them: 2.5 MiB at the largest window). The window counts announced chunks, not chunk indices: a delta
/// session announces only the chunks that differ from the base, and the chunks it skips cost no credit. A chunk
/// whose DATA the destination rejects is unsettled, so the source can tell whether its volume changed since the
/// scan.
pub struct Credit {
    open: Mutex<VecDeque<(u64, Digest)>>,
    moved: Condvar,
    stop: AtomicBool,
}

impl Credit {
    /// Credit for a session whose destination allows `window` unsettled chunks. The buffer is sized once for the
    /// most the window lets the scan announce, so the scan's thread never reallocates what the reader's drains.
    pub fn new(window: u64) -> Self {
        let most = window + crate::scan::SEGMENT_CHUNKS;
        Credit {
            open: Mutex::new(VecDeque::with_capacity(most as usize)),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// Records the chunks the scan announces next (in increasing order).
    pub fn announce(&self, chunks: &[(u64, Digest)]) {
        if let Ok(mut open) = self.open.lock() {
            open.extend(chunks.iter().copied());
        }
    }

    /// The unsettled chunks among `answered` (a bit per chunk), with the digests the scan announced for them.
    pub fn unsettled(&self, answered: &[u64]) -> Vec<(u64, Digest)> {
        let Ok(open) = self.open.lock() else {
            return Vec::new();
        };
        let is_set = |c: u64| {
            answered
                .get((c / 64) as usize)
                .is_some_and(|w| w & (1 << (c % 64)) != 0)
        };
        open.iter().filter(|(c, _)| is_set(*c)).copied().collect()
    }

    /// Whether `chunk` was announced and is not settled yet.
    pub fn is_open(&self, chunk: u64) -> bool {
        self.open
            .lock()
            .is_ok_and(|o| o.binary_search_by_key(&chunk, |(c, _)| *c).is_ok())
    }

    /// Waits until announcing `more` chunks keeps within `window`; false when the session stopped.
    pub fn wait(&self, more: u64, window: u64) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        while open.len() as u64 + more > window {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            open = match self.moved.wait_timeout(open, Duration::from_millis(100)) {
                Ok((o, _)) => o,
                Err(_) => return false,
            };
        }
        !self.stop.load(Ordering::Relaxed)
    }

    /// Every chunk below `through` is settled.
    pub fn ack(&self, through: u64) {
        if let Ok(mut open) = self.open.lock() {
            while open.front().is_some_and(|(c, _)| *c < through) {
                open.pop_front();
            }
        }
        self.moved.notify_all();
    }

    /// Ends every wait: the session is over.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_chunks_cost_no_credit_and_an_ack_frees_what_it_covers() {
        let c = Credit::new(4);
        let d = Digest::of(b"d");
        assert!(c.wait(4, 4));
        c.announce(&[(0, d), (1000, d), (5000, d), (9000, d)]);
        c.stop.store(false, Ordering::Relaxed);
        // Full window: a fifth chunk must wait; an ACK through 1001 frees two, whatever the indices skipped.
        c.ack(1001);
        assert!(c.wait(2, 4));
        assert_eq!(c.unsettled(&[0; 200]), Vec::new());
        let mut answered = vec![0u64; 200];
        answered[5000 / 64] |= 1 << (5000 % 64);
        assert_eq!(c.unsettled(&answered), vec![(5000, d)]);
        c.stop();
        assert!(!c.wait(3, 4), "a stopped session does not wait");
    }
}
