//! The entries of a changes file, read in place: the chunk (u64, big-endian) and its digest, 40 bytes each, in
//! increasing chunk order. Kept as the file's bytes, not decoded into a second copy, so that holding a manifest's
//! changes costs 40 bytes a change.

use std::sync::Arc;

use super::format::ENTRY_LEN;
use crate::chunk::Digest;

/// The validated entries of a changes file (empty for a base alone).
#[derive(Clone, Default)]
pub(super) struct Entries {
    bytes: Option<Arc<[u8]>>,
    /// Where the first entry is in `bytes`.
    at: usize,
    count: usize,
}

impl Entries {
    /// `count` entries at `at` in `bytes`, which the caller checked are in order and inside the volume.
    pub(super) fn new(bytes: Arc<[u8]>, at: usize, count: usize) -> Self {
        assert!(at + count * ENTRY_LEN as usize <= bytes.len());
        Entries {
            bytes: Some(bytes),
            at,
            count,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Entry `i`: its chunk and digest.
    pub(super) fn get(&self, i: usize) -> (u64, Digest) {
        let bytes = self.bytes.as_deref().expect("an entry of an empty list");
        let e = &bytes[self.at + i * ENTRY_LEN as usize..][..ENTRY_LEN as usize];
        (
            u64::from_be_bytes(e[..8].try_into().expect("8 bytes")),
            Digest(e[8..].try_into().expect("32 bytes")),
        )
    }

    /// The index of the first entry whose chunk is `chunk` or after.
    pub(super) fn partition_point(&self, chunk: u64) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid).0 < chunk {
                true => lo = mid + 1,
                false => hi = mid,
            }
        }
        lo
    }

    /// The entries from index `from` on, in chunk order.
    pub(super) fn iter_from(&self, from: usize) -> impl Iterator<Item = (u64, Digest)> + '_ {
        (from..self.count).map(|i| self.get(i))
    }
}

/// The entries of `old` with `new` applied, in chunk order (`new` wins where both hold a chunk): a changes file's
/// entries after a delta, produced without a merged copy of both.
pub(super) fn merged<'a>(
    old: &'a Entries,
    new: &'a [(u64, Digest)],
) -> impl Iterator<Item = (u64, Digest)> + 'a {
    let (mut a, mut b) = (old.iter_from(0).peekable(), new.iter().copied().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x.0 < y.0 => a.next(),
        (Some(x), Some(y)) if x.0 == y.0 => {
            a.next();
            b.next()
        }
        (_, Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(chunks: &[u64]) -> Entries {
        let mut bytes = vec![7u8; 3];
        for &c in chunks {
            bytes.extend_from_slice(&c.to_be_bytes());
            bytes.extend_from_slice(&[c as u8; 32]);
        }
        Entries::new(bytes.into(), 3, chunks.len())
    }

    #[test]
    fn entries_are_read_in_place_and_searched_by_chunk() {
        let e = entries(&[2, 5, 9]);
        assert_eq!(e.len(), 3);
        assert_eq!(e.get(1), (5, Digest([5; 32])));
        let points: Vec<usize> = (0..11).map(|c| e.partition_point(c)).collect();
        assert_eq!(points, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(Entries::default().partition_point(4), 0);
        assert_eq!(e.iter_from(2).collect::<Vec<_>>(), [(9, Digest([9; 32]))]);
    }

    #[test]
    fn merged_keeps_both_in_order_and_the_new_digest_of_a_chunk_in_both() {
        let old = entries(&[1, 4, 6]);
        let new = [
            (0, Digest([100; 32])),
            (4, Digest([104; 32])),
            (8, Digest([108; 32])),
        ];
        let m: Vec<(u64, u8)> = merged(&old, &new).map(|(c, d)| (c, d.0[0])).collect();
        assert_eq!(m, [(0, 100), (1, 1), (4, 104), (6, 6), (8, 108)]);
        assert_eq!(merged(&Entries::default(), &[]).count(), 0);
        assert_eq!(merged(&old, &[]).count(), 3);
    }
}
