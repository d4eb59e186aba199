//! An NBD client for reading a point-in-time export and its block-status metadata contexts (QEMU backup pull mode,
//! qemu-storage-daemon, qemu-nbd, KubeVirt incremental backup), written from the NBD protocol document
//! (`doc/proto.md` of the NBD project) and its URI scheme (`doc/uri.md`).
//!
//! - [`uri`]: `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT`.
//! - [`handshake`]: fixed newstyle negotiation: structured replies, metadata contexts, `NBD_OPT_GO`.
//! - [`reply`]: the transmission-phase reply parser, pure (bytes in, reply or error out), fuzzed.
//! - [`client`]: one connection shared by many threads: a sender lock, and a reader thread that hands replies to
//!   the caller waiting on their cookie, so reads from the scan's workers are pipelined.
//!
//! What it trusts: nothing that a server sends is used before it is bounded (every length is checked against a
//! limit before anything is allocated for it), every wait has a timeout, and a server that goes away fails every
//! waiting and later request with a retryable error. What the bytes and the metadata *mean* is the server's word:
//! an export is taken to be the point-in-time image it says it is.

pub mod client;
pub mod handshake;
pub mod reply;
mod stream;
pub mod uri;

pub use client::{Client, Options};
pub use uri::{Address, Transport};

/// The metadata context of allocation status (`NBD_STATE_HOLE` = bit 0, `NBD_STATE_ZERO` = bit 1).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty-bitmap metadata contexts (bit 0 = dirty).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `NBD_STATE_HOLE` in `base:allocation`: the range is unallocated (reads as zeros).
pub const STATE_HOLE: u32 = 1;
/// `NBD_STATE_ZERO` in `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// Bit 0 in `qemu:dirty-bitmap:NAME`: the range was written while the bitmap was recording.
pub const STATE_DIRTY: u32 = 1;

#[cfg(test)]
mod tests;
