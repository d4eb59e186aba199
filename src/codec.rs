//! Frames and messages of the wire protocol, and the framed reader and writer over a byte stream.
//!
//! The specification, with byte tables, is `proto/PROTOCOL.md`; this module implements it. A header is checked
//! (magic, version, length bound) before any payload memory is reserved, and a partial frame is a state of the
//! reader, not an error, until the stream ends.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chunk::Digest;
use crate::error::{Error, Result};

/// First two bytes of every frame ("BM"). Frozen.
pub const MAGIC: [u8; 2] = *b"BM";
/// The protocol version this build speaks (the version log is in `proto/PROTOCOL.md`). Version 2 added the source's
/// identity to HELLO and the ABORT code `Busy`.
pub const VERSION: u8 = 2;
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
    },
    /// The destination accepts.
    Ready {
        /// Target size in bytes.
        target_size: u64,
        /// Max chunks announced and not acknowledged.
        window: u32,
    },
    /// Source chunk digests, in order.
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
    pub const END: u8 = 0x20;
    pub const COMMIT: u8 = 0x21;
    pub const ABORT: u8 = 0x7F;
}

impl Message {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Auth { .. } => "AUTH",
            Message::Hello { .. } => "HELLO",
            Message::Ready { .. } => "READY",
            Message::Digests { .. } => "DIGESTS",
            Message::Need { .. } => "NEED",
            Message::Ack { .. } => "ACK",
            Message::Data(_) => "DATA",
            Message::End { .. } => "END",
            Message::Commit { .. } => "COMMIT",
            Message::Abort { .. } => "ABORT",
        }
    }

    /// Appends this message as one frame (header and payload) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Some(payload) = self.encode_head(dst) {
            dst.put_slice(payload);
        }
    }

    /// Appends this message's frame to `dst` except a DATA's payload, which it returns: the frame is `dst`'s new
    /// bytes followed by that payload (its length is already in the header). The writer sends the payload from
    /// where it is instead of copying it into the frame.
    pub fn encode_head(&self, dst: &mut BytesMut) -> Option<&Bytes> {
        let start = dst.len();
        let mut tail = None;
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(0);
        dst.put_u32(0);
        let ty = match self {
            Message::Auth { proof } => {
                dst.put_slice(proof);
                kind::AUTH
            }
            Message::Hello {
                volume_size,
                chunk_size,
                block_size,
                source,
            } => {
                dst.put_u64(*volume_size);
                dst.put_u32(*chunk_size);
                dst.put_u32(*block_size);
                let id = truncated(source, MAX_SOURCE_ID);
                dst.put_u8(id.len() as u8);
                dst.put_slice(id.as_bytes());
                kind::HELLO
            }
            Message::Ready {
                target_size,
                window,
            } => {
                dst.put_u64(*target_size);
                dst.put_u32(*window);
                kind::READY
            }
            Message::Digests { first, digests } => {
                dst.put_u64(*first);
                dst.put_u32(digests.len() as u32);
                digests.iter().for_each(|d| dst.put_slice(&d.0));
                kind::DIGESTS
            }
            Message::Need { chunk, blocks } => {
                dst.put_u64(*chunk);
                match blocks {
                    None => dst.put_u8(0),
                    Some(ds) => {
                        dst.put_u8(1);
                        ds.iter().for_each(|d| dst.put_slice(&d.0));
                    }
                }
                kind::NEED
            }
            Message::Ack { through } => {
                dst.put_u64(*through);
                kind::ACK
            }
            Message::Data(d) => {
                dst.put_u64(d.chunk);
                dst.put_u64(d.send_mask);
                dst.put_u64(d.zero_mask);
                dst.put_u8(match d.encoding {
                    Encoding::Raw => 0,
                    Encoding::Zstd => 1,
                });
                dst.put_u32(d.raw_len);
                tail = Some(&d.payload);
                kind::DATA
            }
            Message::End {
                chunk_count,
                volume_size,
                digest,
            }
            | Message::Commit {
                chunk_count,
                volume_size,
                digest,
            } => {
                dst.put_u64(*chunk_count);
                dst.put_u64(*volume_size);
                dst.put_slice(&digest.0);
                if matches!(self, Message::End { .. }) {
                    kind::END
                } else {
                    kind::COMMIT
                }
            }
            Message::Abort { code, message } => {
                dst.put_u16(code.to_u16());
                dst.put_slice(truncated(message, MAX_ABORT_MESSAGE).as_bytes());
                kind::ABORT
            }
        };
        let len = (dst.len() - start - HEADER_LEN + tail.map_or(0, |t| t.len())) as u32;
        dst[start + 3] = ty;
        dst[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
        tail
    }

    /// Decodes the payload of a frame of type `ty`, checking every length against the payload.
    pub fn decode(ty: u8, mut p: Bytes) -> Result<Message> {
        let short = |what: &str| Error::Protocol(format!("{what} frame has a wrong length"));
        let msg = match ty {
            kind::AUTH => {
                need(&p, 32, "AUTH")?;
                let proof = take_digest(&mut p).ok_or_else(|| short("AUTH"))?.0;
                Message::Auth { proof }
            }
            kind::HELLO => {
                if p.len() < 17 || p.len() != 17 + usize::from(p[16]) {
                    return Err(short("HELLO"));
                }
                let volume_size = p.get_u64();
                let chunk_size = p.get_u32();
                let block_size = p.get_u32();
                p.advance(1);
                let source = String::from_utf8(p.to_vec()).map_err(|_| {
                    Error::Protocol("HELLO carries a source identity that is not UTF-8".into())
                })?;
                Message::Hello {
                    volume_size,
                    chunk_size,
                    block_size,
                    source,
                }
            }
            kind::READY => {
                need(&p, 12, "READY")?;
                Message::Ready {
                    target_size: p.get_u64(),
                    window: p.get_u32(),
                }
            }
            kind::DIGESTS => {
                if p.len() < 12 {
                    return Err(short("DIGESTS"));
                }
                let first = p.get_u64();
                let count = p.get_u32() as usize;
                if count == 0 || count > MAX_DIGESTS_PER_FRAME || p.len() != count * 32 {
                    return Err(short("DIGESTS"));
                }
                let digests = (0..count).filter_map(|_| take_digest(&mut p)).collect();
                Message::Digests { first, digests }
            }
            kind::NEED => {
                if p.len() < 9 {
                    return Err(short("NEED"));
                }
                let chunk = p.get_u64();
                let blocks = match p.get_u8() {
                    0 if p.is_empty() => None,
                    1 if !p.is_empty() && p.len() % 32 == 0 && p.len() / 32 <= 64 => Some(
                        (0..p.len() / 32)
                            .filter_map(|_| take_digest(&mut p))
                            .collect(),
                    ),
                    _ => return Err(short("NEED")),
                };
                Message::Need { chunk, blocks }
            }
            kind::ACK => {
                need(&p, 8, "ACK")?;
                Message::Ack {
                    through: p.get_u64(),
                }
            }
            kind::DATA => {
                if p.len() < 29 {
                    return Err(short("DATA"));
                }
                let chunk = p.get_u64();
                let send_mask = p.get_u64();
                let zero_mask = p.get_u64();
                let encoding = match p.get_u8() {
                    0 => Encoding::Raw,
                    1 => Encoding::Zstd,
                    e => return Err(Error::Protocol(format!("DATA has unknown encoding {e}"))),
                };
                let raw_len = p.get_u32();
                Message::Data(DataFrame {
                    chunk,
                    send_mask,
                    zero_mask,
                    encoding,
                    raw_len,
                    payload: p,
                })
            }
            kind::END | kind::COMMIT => {
                need(&p, 48, if ty == kind::END { "END" } else { "COMMIT" })?;
                let chunk_count = p.get_u64();
                let volume_size = p.get_u64();
                let digest = take_digest(&mut p).ok_or_else(|| short("END"))?;
                if ty == kind::END {
                    Message::End {
                        chunk_count,
                        volume_size,
                        digest,
                    }
                } else {
                    Message::Commit {
                        chunk_count,
                        volume_size,
                        digest,
                    }
                }
            }
            kind::ABORT => {
                if p.len() < 2 || p.len() > 2 + MAX_ABORT_MESSAGE {
                    return Err(short("ABORT"));
                }
                let code = AbortCode::from_u16(p.get_u16());
                Message::Abort {
                    code,
                    message: String::from_utf8_lossy(&p).into_owned(),
                }
            }
            t => return Err(Error::Protocol(format!("unknown frame type 0x{t:02x}"))),
        };
        Ok(msg)
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn need(p: &Bytes, len: usize, what: &str) -> Result<()> {
    if p.len() == len {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "{what} frame has {} payload bytes, expected {len}",
            p.len()
        )))
    }
}

fn take_digest(p: &mut Bytes) -> Option<Digest> {
    if p.len() < 32 {
        return None;
    }
    let mut d = [0u8; 32];
    p.copy_to_slice(&mut d);
    Some(Digest(d))
}

/// Checks a frame header at the front of `bytes`: `Ok(None)` while fewer than [`HEADER_LEN`] bytes are there,
/// else the frame's type and payload length, the length already checked against [`MAX_PAYLOAD`].
pub fn check_header(bytes: &[u8]) -> Result<Option<(u8, usize)>> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if h[0..2] != MAGIC {
        return Err(Error::Protocol(format!(
            "bad frame magic {:02x}{:02x}",
            h[0], h[1]
        )));
    }
    if h[2] != VERSION {
        return Err(Error::VersionMismatch {
            peer: h[2],
            ours: VERSION,
        });
    }
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::Protocol(format!(
            "frame length {len} exceeds the maximum {MAX_PAYLOAD}"
        )));
    }
    Ok(Some((h[3], len)))
}

/// Parses one frame from the front of `buf`: `Ok(None)` while the frame is incomplete.
///
/// The header is validated before the payload is waited for, so an absurd length fails at once and no memory is
/// reserved for it.
pub fn parse_frame(buf: &mut BytesMut) -> Result<Option<Message>> {
    let Some((ty, len)) = check_header(buf)? else {
        return Ok(None);
    };
    if buf.len() < HEADER_LEN + len {
        make_room(buf, HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Message::decode(ty, payload).map(Some)
}

/// Makes room for `additional` more bytes, exactly: `BytesMut::reserve` may double the capacity, and since a peer
/// chooses the frame sizes, that would let it make a reader hold twice the largest frame.
fn make_room(buf: &mut BytesMut, additional: usize) {
    if buf.capacity() - buf.len() >= additional || buf.try_reclaim(additional) {
        return;
    }
    let mut bigger = BytesMut::with_capacity(buf.len() + additional);
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

/// Decodes the frame at the front of `bytes` without a reader: `Ok(None)` while it is incomplete, else the
/// message and the bytes it took. The same checks as [`parse_frame`] (it is what the fuzz targets drive); memory
/// is reserved only for a payload that is complete and within [`MAX_PAYLOAD`].
pub fn decode_frame(bytes: &[u8]) -> Result<Option<(Message, usize)>> {
    let Some((ty, len)) = check_header(bytes)? else {
        return Ok(None);
    };
    let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let msg = Message::decode(ty, Bytes::copy_from_slice(payload))?;
    Ok(Some((msg, HEADER_LEN + len)))
}

/// Reads frames from a byte stream.
///
/// The header is read on its own, then the payload straight into a buffer of exactly its length: no read-ahead
/// buffer that a large frame straddles and has to be copied out of, and never more than one frame's memory.
///
/// Cancel-safe: a read dropped halfway (a `select!` that took another branch) keeps what it has read of the frame
/// in the reader, and the next read goes on from there.
pub struct FrameReader<R> {
    inner: R,
    /// The header read so far.
    head: [u8; HEADER_LEN],
    got: usize,
    /// The checked header's type and the payload read so far.
    payload: Option<(u8, usize, BytesMut)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            head: [0u8; HEADER_LEN],
            got: 0,
            payload: None,
        }
    }

    /// The stream under the frames: for reading what is left once frames no longer matter (a read of a frame
    /// that was cancelled halfway leaves the stream inside that frame).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames, an error inside one.
    pub async fn read(&mut self, phase: &'static str) -> Result<Option<Message>> {
        let truncated = |at: usize| {
            Error::Protocol(format!(
                "truncated frame: stream ended {at} bytes into a frame"
            ))
        };
        while self.payload.is_none() {
            if self.got == HEADER_LEN {
                let checked = check_header(&self.head);
                self.got = 0;
                let Some((ty, len)) = checked? else {
                    return Err(truncated(HEADER_LEN));
                };
                self.payload = Some((ty, len, BytesMut::with_capacity(len)));
                break;
            }
            let got = self.got;
            let n = self
                .inner
                .read(&mut self.head[got..])
                .await
                .map_err(|e| Error::net(phase, e))?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(truncated(got))
                };
            }
            self.got += n;
        }
        loop {
            let Some((_, len, payload)) = self.payload.as_mut() else {
                return Err(Error::Protocol("frame reader lost its frame".into()));
            };
            let (len, have) = (*len, payload.len());
            if have >= len {
                break;
            }
            let n = self
                .inner
                .read_buf(&mut payload.limit(len - have))
                .await
                .map_err(|e| Error::net(phase, e))?;
            if n == 0 {
                return Err(truncated(HEADER_LEN + have));
            }
        }
        match self.payload.take() {
            Some((ty, _, payload)) => Message::decode(ty, payload.freeze()).map(Some),
            None => Err(Error::Protocol("frame reader lost its frame".into())),
        }
    }

    /// The next message, treating end of stream as the peer closing during `phase`.
    pub async fn expect(&mut self, phase: &'static str) -> Result<Message> {
        self.read(phase).await?.ok_or(Error::PeerClosed(phase))
    }
}

/// Writes frames to a byte stream, batching small frames into one write.
///
/// Headers and small frames are encoded into one buffer, reused; DATA payloads are not copied into it but queued
/// as they are and written with the headers in one vectored write (TLS copies them into its records anyway).
pub struct FrameWriter<W> {
    inner: W,
    /// Encoded bytes not yet cut into `queued`.
    head: BytesMut,
    /// What to write, in order.
    queued: std::collections::VecDeque<Bytes>,
    /// Bytes in `head` and `queued`.
    pending: usize,
}

/// A writer writes out once this much is queued.
const WRITE_BATCH: usize = 128 * 1024;

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a stream.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            head: BytesMut::with_capacity(64 * 1024),
            queued: std::collections::VecDeque::new(),
            pending: 0,
        }
    }

    /// Queues a message, writing out when the batch is large.
    pub async fn queue(&mut self, msg: &Message) -> Result<()> {
        self.push(msg);
        if self.pending >= WRITE_BATCH {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Queues a message and flushes everything.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.push(msg);
        self.flush().await
    }

    fn push(&mut self, msg: &Message) {
        let before = self.head.len();
        let payload = msg.encode_head(&mut self.head);
        self.pending += self.head.len() - before;
        if let Some(p) = payload.filter(|p| !p.is_empty()) {
            self.pending += p.len();
            self.queued.push_back(self.head.split().freeze());
            self.queued.push_back(p.clone());
        }
    }

    /// Writes every queued frame and flushes the stream.
    pub async fn flush(&mut self) -> Result<()> {
        self.write_out().await?;
        self.inner.flush().await.map_err(|e| Error::net("send", e))
    }

    async fn write_out(&mut self) -> Result<()> {
        if !self.head.is_empty() {
            self.queued.push_back(self.head.split().freeze());
        }
        while !self.queued.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> = self
                .queued
                .iter()
                .take(64)
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            let mut n = self
                .inner
                .write_vectored(&slices)
                .await
                .map_err(|e| Error::net("send", e))?;
            if n == 0 {
                return Err(Error::net("send", std::io::ErrorKind::WriteZero.into()));
            }
            self.pending -= n;
            while let Some(front) = self.queued.front_mut() {
                if n < front.len() {
                    front.advance(n);
                    break;
                }
                n -= front.len();
                self.queued.pop_front();
            }
        }
        Ok(())
    }

    /// Flushes and shuts the stream down (TLS close_notify).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.flush().await?;
        self.inner
            .shutdown()
            .await
            .map_err(|e| Error::net("close", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: Message) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let total = buf.len();
        let mut partial = BytesMut::from(&buf[..total - 1]);
        assert_eq!(parse_frame(&mut partial).expect("valid prefix"), None);
        let got = parse_frame(&mut buf)
            .expect("valid frame")
            .expect("complete");
        assert_eq!(got, msg);
        assert!(buf.is_empty());
    }

    #[test]
    fn hello_source_identity_is_bounded_and_utf8() {
        let long = "é".repeat(200);
        let mut buf = BytesMut::new();
        Message::Hello {
            volume_size: 1,
            chunk_size: 4096,
            block_size: 4096,
            source: long,
        }
        .encode(&mut buf);
        match parse_frame(&mut buf) {
            Ok(Some(Message::Hello { source, .. })) => {
                assert!(source.len() <= MAX_SOURCE_ID && source.chars().all(|c| c == 'é'))
            }
            other => panic!("{other:?}"),
        }
        // The identity's length byte must match the payload exactly, and the identity must be UTF-8.
        let mut bad = BytesMut::new();
        Message::Hello {
            volume_size: 1,
            chunk_size: 4096,
            block_size: 4096,
            source: "ab".into(),
        }
        .encode(&mut bad);
        let mut longer = bad.clone();
        longer[HEADER_LEN + 16] = 3;
        assert!(parse_frame(&mut longer).is_err());
        let n = bad.len();
        bad[n - 1] = 0xff;
        assert!(parse_frame(&mut bad).is_err());
    }

    #[test]
    fn every_message_roundtrips() {
        let d = Digest::of(b"x");
        roundtrip(Message::Auth { proof: [7; 32] });
        roundtrip(Message::Hello {
            volume_size: 1 << 40,
            chunk_size: 65536,
            block_size: 4096,
            source: "prod/vm-disk-é".into(),
        });
        roundtrip(Message::Hello {
            volume_size: 1,
            chunk_size: 4096,
            block_size: 4096,
            source: String::new(),
        });
        roundtrip(Message::Ready {
            target_size: 5,
            window: 8192,
        });
        roundtrip(Message::Digests {
            first: 9,
            digests: vec![d, d],
        });
        roundtrip(Message::Need {
            chunk: 3,
            blocks: None,
        });
        roundtrip(Message::Need {
            chunk: 3,
            blocks: Some(vec![d; 16]),
        });
        roundtrip(Message::Ack { through: 1024 });
        roundtrip(Message::Data(DataFrame {
            chunk: 1,
            send_mask: 0b101,
            zero_mask: 0b10,
            encoding: Encoding::Zstd,
            raw_len: 8192,
            payload: Bytes::from_static(b"abc"),
        }));
        roundtrip(Message::End {
            chunk_count: 2,
            volume_size: 3,
            digest: d,
        });
        roundtrip(Message::Commit {
            chunk_count: 2,
            volume_size: 3,
            digest: d,
        });
        roundtrip(Message::Abort {
            code: AbortCode::TargetTooSmall,
            message: "too small".into(),
        });
    }

    #[test]
    fn absurd_length_is_rejected_before_the_payload_arrives() {
        let mut buf = BytesMut::from(&[b'B', b'M', VERSION, 0x13, 0xff, 0xff, 0xff, 0xff][..]);
        let err = parse_frame(&mut buf).expect_err("must reject");
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
        assert!(
            buf.capacity() < 1024,
            "no memory reserved for the claimed length"
        );
    }

    #[test]
    fn other_version_is_a_version_mismatch() {
        let mut buf = BytesMut::new();
        Message::Ack { through: 1 }.encode(&mut buf);
        buf[2] = 1;
        let err = parse_frame(&mut buf).expect_err("must reject");
        assert!(matches!(err, Error::VersionMismatch { peer: 1, ours: 2 }));
        assert!(
            err.to_string()
                .contains("peer speaks version 1, this build speaks version 2"),
            "{err}"
        );
    }

    #[test]
    fn bad_magic_and_wrong_payload_lengths_are_rejected() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(parse_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&[b'B', b'M', VERSION, 0x12, 0, 0, 0, 3, 1, 2, 3][..]);
        assert!(parse_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(
            &[
                b'B', b'M', VERSION, 0x10, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
            ][..],
        );
        assert!(
            parse_frame(&mut buf).is_err(),
            "DIGESTS count without digests"
        );
        let mut buf = BytesMut::from(&[b'B', b'M', VERSION, 0x55, 0, 0, 0, 0][..]);
        assert!(parse_frame(&mut buf).is_err(), "unknown type");
    }

    #[test]
    fn auth_with_trailing_bytes_is_rejected() {
        let mut buf = BytesMut::new();
        Message::Auth { proof: [1; 32] }.encode(&mut buf);
        buf[7] = 33;
        buf.put_u8(0);
        let err = parse_frame(&mut buf).expect_err("a 33-byte AUTH");
        assert!(err.to_string().contains("AUTH frame has 33"), "{err}");
    }

    #[test]
    fn decode_frame_takes_one_frame_from_a_slice() {
        let mut buf = BytesMut::new();
        Message::Ack { through: 7 }.encode(&mut buf);
        Message::Ack { through: 8 }.encode(&mut buf);
        let (msg, used) = decode_frame(&buf).expect("valid").expect("complete");
        assert_eq!((msg, used), (Message::Ack { through: 7 }, HEADER_LEN + 8));
        assert_eq!(decode_frame(&buf[..used - 1]).expect("valid prefix"), None);
        assert_eq!(decode_frame(&buf[..3]).expect("short header"), None);
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error_and_clean_end_is_none() {
        let mut buf = BytesMut::new();
        Message::Ack { through: 1 }.encode(&mut buf);
        let bytes = buf.to_vec();
        let mut r = FrameReader::new(&bytes[..]);
        assert!(r.read("test").await.expect("frame").is_some());
        assert!(r.read("test").await.expect("clean end").is_none());
        let mut r = FrameReader::new(&bytes[..bytes.len() - 2]);
        let err = r.read("test").await.expect_err("truncated");
        assert!(err.to_string().contains("truncated frame"), "{err}");
    }

    #[tokio::test]
    async fn a_read_cancelled_halfway_resumes_where_it_stopped() {
        use tokio::io::AsyncWriteExt;
        let mut buf = BytesMut::new();
        let end = Message::End {
            chunk_count: 3,
            volume_size: 9,
            digest: Digest::of(b"v"),
        };
        end.encode(&mut buf);
        Message::Ack { through: 2 }.encode(&mut buf);
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(rx);
        let limit = std::time::Duration::from_millis(20);
        // Cancelled inside the header, then inside the payload.
        for part in [&buf[..5], &buf[5..30]] {
            tx.write_all(part).await.expect("write");
            let cancelled = tokio::time::timeout(limit, r.read("test")).await;
            assert!(cancelled.is_err(), "{cancelled:?}");
        }
        tx.write_all(&buf[30..]).await.expect("write");
        assert_eq!(r.read("test").await.expect("frame"), Some(end));
        assert_eq!(
            r.read("test").await.expect("frame"),
            Some(Message::Ack { through: 2 })
        );
    }
}
