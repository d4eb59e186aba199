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
    /// The scan's block digests of announced chunks, until a NEED takes them or an ACK settles the chunk: at most
    /// [`KEPT_BYTES`] of them (a chunk announced past that is read again and hashed to answer its NEED).
    blocks: Mutex<Kept>,
    /// The announced chunks that were pushed (BLOCKS), until an ACK settles them: a NEED for one answers a push
    /// the destination could not verify.
    pushed: Mutex<std::collections::BTreeSet<u64>>,
    moved: Condvar,
    stop: AtomicBool,
}

/// Block digests kept for announced chunks, and their size in bytes.
#[derive(Default)]
struct Kept {
    map: std::collections::BTreeMap<u64, Box<[Digest]>>,
    bytes: usize,
}

/// The most block digests kept for announced chunks: 16 MiB, the blocks of 32768 chunks of 64 KiB, four default
/// windows.
pub const KEPT_BYTES: usize = 16 << 20;

impl Credit {
    /// Credit for a session whose destination allows `window` unsettled chunks. The buffer is sized once for the
    /// most the window lets the scan announce, so the scan's thread never reallocates what the reader's drains.
    pub fn new(window: u64) -> Self {
        let most = window + crate::scan::SEGMENT_CHUNKS;
        Credit {
            open: Mutex::new(VecDeque::with_capacity(most as usize)),
            blocks: Mutex::new(Kept::default()),
            pushed: Mutex::default(),
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

    /// Keeps the scan's block digests of announced chunks (`(chunk, digests)`), within [`KEPT_BYTES`].
    pub fn keep_blocks(&self, chunks: impl IntoIterator<Item = (u64, Box<[Digest]>)>) {
        if let Ok(mut kept) = self.blocks.lock() {
            let Kept { map, bytes } = &mut *kept;
            for (chunk, digests) in chunks {
                let size = digests.len() * 32;
                if *bytes + size > KEPT_BYTES {
                    break;
                }
                *bytes += size;
                map.insert(chunk, digests);
            }
        }
    }

    /// The scan's block digests of `chunk`, if they were kept; they are kept no longer.
    pub fn take_blocks(&self, chunk: u64) -> Option<Box<[Digest]>> {
        let mut kept = self.blocks.lock().ok()?;
        let Kept { map, bytes } = &mut *kept;
        let digests = map.remove(&chunk)?;
        *bytes -= digests.len() * 32;
        Some(digests)
    }

    /// Records that announced chunk `chunk` was pushed.
    pub fn pushed(&self, chunk: u64) {
        if let Ok(mut pushed) = self.pushed.lock() {
            pushed.insert(chunk);
        }
    }

    /// Whether `chunk` was pushed and is not settled yet.
    pub fn was_pushed(&self, chunk: u64) -> bool {
        self.pushed.lock().is_ok_and(|p| p.contains(&chunk))
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
        if let Ok(mut kept) = self.blocks.lock() {
            let Kept { map, bytes } = &mut *kept;
            let rest = map.split_off(&through);
            *bytes -= map.values().map(|d| d.len() * 32).sum::<usize>();
            *map = rest;
        }
        if let Ok(mut pushed) = self.pushed.lock() {
            let rest = pushed.split_off(&through);
            *pushed = rest;
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

    #[test]
    fn block_digests_are_kept_within_the_budget_until_taken_or_settled() {
        let c = Credit::new(64);
        let blocks = |n: usize| vec![Digest::of(b"b"); n].into_boxed_slice();
        c.keep_blocks([(3, blocks(16)), (7, blocks(16)), (9, blocks(2))]);
        assert_eq!(c.take_blocks(7).map(|d| d.len()), Some(16));
        assert_eq!(c.take_blocks(7), None, "taken once");
        c.ack(5);
        assert_eq!(c.take_blocks(3), None, "settled by the ACK");
        assert_eq!(c.take_blocks(9).map(|d| d.len()), Some(2));
        assert_eq!(c.blocks.lock().map(|k| k.bytes).ok(), Some(0));
        // Past the budget, nothing more is kept.
        let per = KEPT_BYTES / 32 / 64;
        c.keep_blocks((0..per as u64 + 2).map(|i| (100 + i, blocks(64))));
        let kept = c.blocks.lock().map(|k| (k.map.len(), k.bytes)).ok();
        assert_eq!(kept, Some((per, KEPT_BYTES)));
    }
}
