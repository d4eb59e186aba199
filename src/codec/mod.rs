//! Frames and messages of the wire protocol, and the framed reader and writer over a byte stream.
//!
//! The specification, with byte tables, is `proto/PROTOCOL.md`; this module implements it. A header is checked
//! (magic, version, length bound) before any payload memory is reserved, and a partial frame is a state of the
//! reader, not an error, until the stream ends.

use bytes::Bytes;

use crate::chunk::Digest;

mod basis;
mod frame;
mod message;
#[cfg(test)]
mod tests;

pub use basis::{Fallback, Offer, SyncKind};
pub use frame::{check_header, decode_frame, parse_frame, FrameReader, FrameWriter};

/// First two bytes of every frame ("BM"). Frozen.
pub const MAGIC: [u8; 2] = *b"BM";
/// The protocol version this build speaks (the version log is in `proto/PROTOCOL.md`). Version 2 added the source's
/// identity to HELLO and the ABORT code `Busy`; version 3 the delta offer in HELLO and the session's kind in READY;
/// version 4 the compression lanes (DATA encodings `2 + lane`); version 5 the BLOCKS frame (a delta by change list
/// pushes the listed blocks of a chunk with its digest); version 6 the block digest as the chaining value of the
/// block's subtree at its place in the chunk (`chunk::lanes`), so that block digests merge into the chunk digest;
/// version 7 the cover in BLOCKS (`chunk::cover`), so that a pushed chunk is verified without reading the target's
/// blocks the change list does not name; version 8 BLOCKS in a delta by manifest too (the source pushes the blocks
/// whose digests differ from its base's).
pub const VERSION: u8 = 8;
/// Frame header length in bytes. Frozen.
pub const HEADER_LEN: usize = 8;
/// The largest payload a frame may carry. Frozen.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The most digests one DIGESTS frame may carry.
pub const MAX_DIGESTS_PER_FRAME: usize = 4096;
/// The longest ABORT message, in bytes.
pub const MAX_ABORT_MESSAGE: usize = 1024;
/// The longest source identity a HELLO may carry, in bytes (its length is one byte on the wire).
pub const MAX_SOURCE_ID: usize = 255;

/// Why a peer aborts a session (the ABORT frame's code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortCode {
    /// A message the protocol does not allow.
    Protocol,
    /// Protocol version mismatch.
    Version,
    /// The target cannot hold the volume.
    TargetTooSmall,
    /// An I/O error at the peer.
    Io,
    /// A chunk or the volume digest did not verify.
    Digest,
    /// The PSK proof did not verify.
    Auth,
    /// The peer was interrupted.
    Cancelled,
    /// The peer's configuration is wrong.
    Config,
    /// The destination is serving another source; try again later.
    Busy,
    /// A code this build does not know.
    Unknown(u16),
}

impl AbortCode {
    fn to_u16(self) -> u16 {
        match self {
            AbortCode::Protocol => 1,
            AbortCode::Version => 2,
            AbortCode::TargetTooSmall => 3,
            AbortCode::Io => 4,
            AbortCode::Digest => 5,
            AbortCode::Auth => 6,
            AbortCode::Cancelled => 7,
            AbortCode::Config => 8,
            AbortCode::Busy => 9,
            AbortCode::Unknown(c) => c,
        }
    }

    fn from_u16(code: u16) -> Self {
        match code {
            1 => AbortCode::Protocol,
            2 => AbortCode::Version,
            3 => AbortCode::TargetTooSmall,
            4 => AbortCode::Io,
            5 => AbortCode::Digest,
            6 => AbortCode::Auth,
            7 => AbortCode::Cancelled,
            8 => AbortCode::Config,
            9 => AbortCode::Busy,
            c => AbortCode::Unknown(c),
        }
    }

    /// Whether the peer's failure may go away on a retry.
    pub fn is_retryable(self) -> bool {
        // The peer's I/O errors are a full, read-only or failing disk: they need someone to act. A chunk the
        // destination refused changed during the sync (see `Error::DigestMismatch`).
        matches!(
            self,
            AbortCode::Cancelled | AbortCode::Busy | AbortCode::Digest
        )
    }
}

/// How a DATA payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The blocks as they are.
    Raw,
    /// One zstd frame of the concatenated blocks.
    Zstd,
    /// The next part of compression lane `n`'s zstd stream (`n < zstream::MAX_LANES`; wire encoding `2 + n`).
    Lane(u8),
}

/// The changed blocks of one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrame {
    /// Chunk index.
    pub chunk: u64,
    /// Blocks carried as data.
    pub send_mask: u64,
    /// Blocks to zero.
    pub zero_mask: u64,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Summed length of the blocks in `send_mask`.
    pub raw_len: u32,
    /// The encoded blocks.
    pub payload: Bytes,
}

/// One protocol message (a frame's type and payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// PSK proof.
    Auth {
        /// keyed BLAKE3 over the role label and the TLS exporter.
        proof: [u8; 32],
    },
    /// The source announces the volume.
    Hello {
        /// Volume size in bytes.
        volume_size: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
        /// Block size in bytes.
        block_size: u32,
        /// Who is sending: `namespace/name` of the source (at most [`MAX_SOURCE_ID`] bytes of UTF-8). A destination
        /// lets a new connection supersede a sync under way only when it comes from the same source.
        source: String,
        /// The kind of sync the source offers, and its base image.
        offer: Offer,
    },
    /// The destination accepts.
    Ready {
        /// Target size in bytes.
        target_size: u64,
        /// Max chunks announced and not settled.
        window: u32,
        /// The session's kind: the source's delta offer, or [`SyncKind::Full`].
        kind: SyncKind,
        /// Why the session is a full comparison ([`Fallback::None`] for a delta).
        reason: Fallback,
    },
    /// Source chunk digests of consecutive chunks; in a delta session only of chunks that differ from the base, so
    /// `first` may skip chunks (those are equal to the base).
    Digests {
        /// Index of the first.
        first: u64,
        /// The digests.
        digests: Vec<Digest>,
    },
    /// The destination asks for the changed blocks of a chunk.
    Need {
        /// Chunk index.
        chunk: u64,
        /// The target chunk's block digests, or `None` when the target chunk is all zeros.
        blocks: Option<Vec<Digest>>,
    },
    /// Every chunk below `through` has been compared.
    Ack {
        /// Exclusive upper bound.
        through: u64,
    },
    /// Changed blocks of a chunk.
    Data(DataFrame),
    /// A delta by change list: announces chunk `data.chunk` (like a DIGESTS entry, in the same order and under the
    /// same window) with its digest, and carries the blocks of it the change list names, with the cover of the
    /// others (`chunk::cover`). The destination writes them if the cover with its target's listed blocks gives its
    /// base's digest of the chunk and with the pushed ones `digest`, and otherwise asks with NEED.
    Blocks {
        /// The source's digest of the whole chunk.
        digest: Digest,
        /// The chaining values of the chunk's largest subtrees without a listed block, left to right (at most 63:
        /// a chunk has at most 64 blocks, and at least one is listed).
        cover: Vec<Digest>,
        /// The listed blocks, as in DATA.
        data: DataFrame,
    },
    /// The source has announced everything.
    End {
        /// Chunk count.
        chunk_count: u64,
        /// Volume size.
        volume_size: u64,
        /// Whole-volume digest.
        digest: Digest,
    },
    /// The destination holds the volume durably.
    Commit {
        /// Chunk count.
        chunk_count: u64,
        /// Volume size.
        volume_size: u64,
        /// Whole-volume digest of what the target holds.
        digest: Digest,
    },
    /// The sender gives up.
    Abort {
        /// Why.
        code: AbortCode,
        /// Human-readable reason.
        message: String,
    },
}

mod kind {
    pub const AUTH: u8 = 0x01;
    pub const HELLO: u8 = 0x02;
    pub const READY: u8 = 0x03;
    pub const DIGESTS: u8 = 0x10;
    pub const NEED: u8 = 0x11;
    pub const ACK: u8 = 0x12;
    pub const DATA: u8 = 0x13;
    pub const BLOCKS: u8 = 0x14;
    pub const END: u8 = 0x20;
    pub const COMMIT: u8 = 0x21;
    pub const ABORT: u8 = 0x7F;
}
