//! How many reads the source keeps in flight (`source --read-depth N`): the scan and the NEED servicer run their
//! parallel reads on one pool of N threads, built once per sync, each thread with one read (and its buffer) at a
//! time: four chunks in a scan (`scan::RUN_CHUNKS`), one in a NEED's answer. On the NBD source every thread's read
//! is a request on the shared connection, so N is the depth on the wire.
//!
//! Trusted: nothing from the peer; N comes from the command line (bounded by [`MAX_READ_DEPTH`]).

use std::sync::Arc;

use rayon::ThreadPool;

use crate::error::{Error, Result};
use crate::volume::Kind;

/// The largest `--read-depth`: 256 threads x one 64 KiB chunk buffer is still only 16 MiB.
pub const MAX_READ_DEPTH: usize = 256;
/// The default depth for a block device or an NBD export: storage behind a queue (Ceph RBD, iSCSI, cloud disks)
/// gives its throughput only with many reads in flight.
pub const QUEUE_DEPTH: usize = 16;

/// The default depth for a volume of `kind`: one thread per core for a regular file (read from the page cache,
/// more threads would only time-share the hashing), [`QUEUE_DEPTH`] for a block device or an NBD export.
///
/// A delta by change list reads the scattered blocks of its listed chunks, a few bytes of hashing each: on a
/// snapshot that is not in the page cache their latency, not the hashing, is the sync. On a file its scan hands
/// each round's reads to the kernel at once (`posix_fadvise(WILLNEED)`, see `scan::scan_selected`), which keeps the
/// storage's queue full with one thread per core. (2 GiB allocated file, 1 % changed, evicted, four alternated runs
/// each: 0.16-0.18 s at depth 2, 0.16-0.20 s at 16; at 16 without the prefetch 0.19-0.25 s, at 2 without it 0.28
/// and 0.31 s in the bench.)
pub fn default_read_depth(kind: Kind) -> usize {
    match kind {
        Kind::File => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Kind::BlockDevice => QUEUE_DEPTH,
    }
}

/// The pool of `depth` reader threads for one sync.
pub(super) fn read_pool(depth: usize) -> Result<Arc<ThreadPool>> {
    if !(1..=MAX_READ_DEPTH).contains(&depth) {
        return Err(Error::Config(format!(
            "read depth {depth} is outside 1..={MAX_READ_DEPTH}"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(depth)
        .thread_name(|i| format!("read-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("cannot start {depth} reader threads: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_has_the_depth_asked_for_and_depths_out_of_range_are_refused() -> anyhow::Result<()> {
        assert_eq!(read_pool(1)?.current_num_threads(), 1);
        assert_eq!(read_pool(16)?.current_num_threads(), 16);
        assert!(read_pool(0).is_err());
        assert!(read_pool(MAX_READ_DEPTH + 1).is_err());
        assert_eq!(default_read_depth(Kind::BlockDevice), QUEUE_DEPTH);
        assert!(default_read_depth(Kind::File) >= 1);
        Ok(())
    }
}
