//! Encoding and decoding of each message's payload (byte tables in `proto/PROTOCOL.md`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::*;
use crate::chunk::Digest;
use crate::error::{Error, Result};

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
            Message::Blocks { .. } => "BLOCKS",
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
                offer,
            } => {
                dst.put_u64(*volume_size);
                dst.put_u32(*chunk_size);
                dst.put_u32(*block_size);
                dst.put_u8(offer.kind.code());
                dst.put_u8(offer.reason.code());
                dst.put_slice(&offer.base.0);
                let id = truncated(source, MAX_SOURCE_ID);
                dst.put_u8(id.len() as u8);
                dst.put_slice(id.as_bytes());
                kind::HELLO
            }
            Message::Ready {
                target_size,
                window,
                kind,
                reason,
            } => {
                dst.put_u64(*target_size);
                dst.put_u32(*window);
                dst.put_u8(kind.code());
                dst.put_u8(reason.code());
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
                put_blocks(dst, d);
                tail = Some(&d.payload);
                kind::DATA
            }
            Message::Blocks {
                digest,
                cover,
                data,
            } => {
                dst.put_u64(data.chunk);
                dst.put_slice(&digest.0);
                // At most 63 for a chunk of 64 blocks (`Message::Blocks`): a cover never fills a byte.
                debug_assert!(
                    cover.len() < 64,
                    "a cover of {} chaining values",
                    cover.len()
                );
                dst.put_u8(cover.len() as u8);
                for c in cover {
                    dst.put_slice(&c.0);
                }
                put_blocks(dst, data);
                tail = Some(&data.payload);
                kind::BLOCKS
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
                if p.len() < HELLO_FIXED || p.len() != HELLO_FIXED + usize::from(p[HELLO_FIXED - 1])
                {
                    return Err(short("HELLO"));
                }
                let volume_size = p.get_u64();
                let chunk_size = p.get_u32();
                let block_size = p.get_u32();
                let kind = sync_kind(p.get_u8(), "HELLO")?;
                let reason = Fallback::from_code(p.get_u8());
                let base = take_digest(&mut p).ok_or_else(|| short("HELLO"))?;
                p.advance(1);
                let source = String::from_utf8(p.to_vec()).map_err(|_| {
                    Error::Protocol("HELLO carries a source identity that is not UTF-8".into())
                })?;
                Message::Hello {
                    volume_size,
                    chunk_size,
                    block_size,
                    source,
                    offer: Offer { kind, reason, base },
                }
            }
            kind::READY => {
                need(&p, 14, "READY")?;
                Message::Ready {
                    target_size: p.get_u64(),
                    window: p.get_u32(),
                    kind: sync_kind(p.get_u8(), "READY")?,
                    reason: Fallback::from_code(p.get_u8()),
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
                    1 if !p.is_empty() && p.len().is_multiple_of(32) && p.len() / 32 <= 64 => Some(
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
                Message::Data(take_blocks(chunk, p, "DATA")?)
            }
            kind::BLOCKS => {
                if p.len() < 62 {
                    return Err(short("BLOCKS"));
                }
                let chunk = p.get_u64();
                let digest = take_digest(&mut p).ok_or_else(|| short("BLOCKS"))?;
                let count = usize::from(p.get_u8());
                if p.len() < count * 32 + 21 {
                    return Err(short("BLOCKS"));
                }
                let cover = (0..count)
                    .map(|_| take_digest(&mut p).ok_or_else(|| short("BLOCKS")))
                    .collect::<Result<_>>()?;
                let data = take_blocks(chunk, p, "BLOCKS")?;
                Message::Blocks {
                    digest,
                    cover,
                    data,
                }
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

/// HELLO's payload without the source identity: sizes (16), kind and reason (2), base (32), identity length (1).
const HELLO_FIXED: usize = 51;

fn sync_kind(code: u8, frame: &str) -> Result<SyncKind> {
    SyncKind::from_code(code)
        .ok_or_else(|| Error::Protocol(format!("{frame} names an unknown sync kind {code}")))
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

/// DATA's and BLOCKS' fields after the chunk (and digest): masks, encoding, raw_len; the payload follows.
fn put_blocks(dst: &mut BytesMut, d: &DataFrame) {
    dst.put_u64(d.send_mask);
    dst.put_u64(d.zero_mask);
    dst.put_u8(match d.encoding {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
        Encoding::Lane(n) => 2 + n,
    });
    dst.put_u32(d.raw_len);
}

/// The rest of a DATA or BLOCKS payload (at least 21 bytes: masks, encoding, raw_len) as the blocks of `chunk`.
fn take_blocks(chunk: u64, mut p: Bytes, frame: &str) -> Result<DataFrame> {
    let send_mask = p.get_u64();
    let zero_mask = p.get_u64();
    let encoding = match p.get_u8() {
        0 => Encoding::Raw,
        1 => Encoding::Zstd,
        e if usize::from(e) < 2 + crate::zstream::MAX_LANES => Encoding::Lane(e - 2),
        e => return Err(Error::Protocol(format!("{frame} has unknown encoding {e}"))),
    };
    let raw_len = p.get_u32();
    Ok(DataFrame {
        chunk,
        send_mask,
        zero_mask,
        encoding,
        raw_len,
        payload: p,
    })
}

fn take_digest(p: &mut Bytes) -> Option<Digest> {
    if p.len() < 32 {
        return None;
    }
    let mut d = [0u8; 32];
    p.copy_to_slice(&mut d);
    Some(Digest(d))
}
