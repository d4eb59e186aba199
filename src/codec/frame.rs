//! Frames on a byte stream: the header check, and the framed reader and writer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Message, HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION};
use crate::error::{Error, Result};

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
