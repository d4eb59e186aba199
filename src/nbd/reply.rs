//! The transmission-phase reply parser: pure, no I/O. Bytes in, a parsed reply or an error out.
//!
//! A reply starts with a magic that says its shape: a simple reply (16 bytes: magic, error, cookie; a successful
//! read's data follows, as long as the request asked) or a structured reply chunk (20 bytes: magic, flags, type,
//! cookie, payload length; then the payload). The payload length is checked against [`MAX_PAYLOAD`] in the header,
//! before a byte of it is read or allocated; the parsed chunk allocates at most what its payload holds (block
//! status descriptors) or 65535 bytes (an error message). Trusted: nothing; a reply that breaks the protocol is a
//! [`ReplyError`], which ends the connection.

use std::fmt;

/// Simple reply magic.
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
/// Bytes of a simple reply header.
pub const SIMPLE_HEADER: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER: usize = 20;
/// The largest read this client asks for (the protocol's customary maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest structured payload accepted: a read's data and its offset, with room to spare for block status.
pub const MAX_PAYLOAD: u32 = MAX_REQUEST + 4096;

/// `NBD_REPLY_FLAG_DONE`: the last chunk of the reply to this cookie.
pub const FLAG_DONE: u16 = 1;
/// `NBD_REPLY_TYPE_NONE`.
pub const TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// A reply that breaks the protocol (one line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyError(pub String);

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(what: impl Into<String>) -> Result<T, ReplyError> {
    Err(ReplyError(what.into()))
}

/// A reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A simple reply: `error` 0 is success (a read's data follows).
    Simple {
        /// The errno-style error (0: none).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; `length` payload bytes follow (at most [`MAX_PAYLOAD`]).
    Structured {
        /// Reply flags ([`FLAG_DONE`]).
        flags: u16,
        /// The chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload bytes that follow.
        length: u32,
    },
}

impl Header {
    /// The cookie it answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            Header::Simple { cookie, .. } | Header::Structured { cookie, .. } => cookie,
        }
    }
}

/// One block-status descriptor: `length` bytes with status `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes it covers (never 0).
    pub length: u32,
    /// The context's status bits.
    pub flags: u32,
}

/// A parsed structured reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`: no payload (only with DONE).
    None,
    /// Data read at `offset` (at least one byte).
    Data {
        /// Export offset of the first byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `length` bytes at `offset` read as zeros.
    Hole {
        /// Export offset.
        offset: u64,
        /// Bytes (never 0).
        length: u32,
    },
    /// Block status of one metadata context.
    BlockStatus {
        /// The context id from `NBD_OPT_SET_META_CONTEXT`.
        context: u32,
        /// The descriptors, in order from the request's offset (at least one).
        extents: Vec<Extent>,
    },
    /// The request failed (at `offset`, for `NBD_REPLY_TYPE_ERROR_OFFSET`).
    Error {
        /// The errno-style error (never 0).
        code: u32,
        /// The server's message (lossy UTF-8, may be empty).
        message: String,
        /// Where, if the server said.
        offset: Option<u64>,
    },
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// How long the header that starts with these 4 bytes (the magic) is.
pub fn header_len(magic: &[u8]) -> Result<usize, ReplyError> {
    if magic.len() < 4 {
        return bad("reply shorter than its magic");
    }
    match be32(magic) {
        SIMPLE_MAGIC => Ok(SIMPLE_HEADER),
        STRUCTURED_MAGIC => Ok(STRUCTURED_HEADER),
        other => bad(format!("reply with unknown magic {other:#010x}")),
    }
}

/// Parses a whole header (its length from [`header_len`]); a structured payload longer than [`MAX_PAYLOAD`] is an
/// error here, before it is read.
pub fn parse_header(bytes: &[u8]) -> Result<Header, ReplyError> {
    let len = header_len(bytes)?;
    if bytes.len() < len {
        return bad(format!(
            "reply header of {} bytes, expected {len}",
            bytes.len()
        ));
    }
    if len == SIMPLE_HEADER {
        return Ok(Header::Simple {
            error: be32(&bytes[4..]),
            cookie: be64(&bytes[8..]),
        });
    }
    let length = be32(&bytes[16..]);
    if length > MAX_PAYLOAD {
        return bad(format!(
            "structured reply of {length} bytes, more than the {MAX_PAYLOAD} allowed"
        ));
    }
    Ok(Header::Structured {
        flags: be16(&bytes[4..]),
        kind: be16(&bytes[6..]),
        cookie: be64(&bytes[8..]),
        length,
    })
}

/// Parses the payload of a structured chunk of type `kind` with `flags`.
pub fn parse_chunk(kind: u16, flags: u16, payload: &[u8]) -> Result<Chunk<'_>, ReplyError> {
    let n = payload.len();
    if n > MAX_PAYLOAD as usize {
        return bad(format!("structured payload of {n} bytes"));
    }
    match kind {
        TYPE_NONE if n == 0 && flags & FLAG_DONE != 0 => Ok(Chunk::None),
        TYPE_NONE => bad("NBD_REPLY_TYPE_NONE with a payload or without DONE"),
        TYPE_OFFSET_DATA if n > 8 => Ok(Chunk::Data {
            offset: be64(payload),
            data: &payload[8..],
        }),
        TYPE_OFFSET_DATA => bad(format!("OFFSET_DATA of {n} bytes")),
        TYPE_OFFSET_HOLE if n == 12 => match be32(&payload[8..]) {
            0 => bad("OFFSET_HOLE of length 0"),
            length => Ok(Chunk::Hole {
                offset: be64(payload),
                length,
            }),
        },
        TYPE_OFFSET_HOLE => bad(format!("OFFSET_HOLE of {n} bytes, expected 12")),
        TYPE_BLOCK_STATUS if n >= 12 && (n - 4).is_multiple_of(8) => {
            let mut extents = Vec::with_capacity((n - 4) / 8);
            for d in payload[4..].chunks_exact(8) {
                let length = be32(d);
                if length == 0 {
                    return bad("block status descriptor of length 0");
                }
                extents.push(Extent {
                    length,
                    flags: be32(&d[4..]),
                });
            }
            Ok(Chunk::BlockStatus {
                context: be32(payload),
                extents,
            })
        }
        TYPE_BLOCK_STATUS => bad(format!("BLOCK_STATUS of {n} bytes")),
        k if k & (1 << 15) != 0 => parse_error(k, payload),
        k => bad(format!("unknown structured reply type {k}")),
    }
}

/// The longest part of a server's error message that is kept.
const MAX_ERROR_MESSAGE: usize = 512;

/// An error chunk: `u32 error, u16 message length, message` (+ `u64 offset` for ERROR_OFFSET). Other error types
/// (bit 15 set) carry at least the first two fields; their rest is not looked at.
fn parse_error(kind: u16, payload: &[u8]) -> Result<Chunk<'_>, ReplyError> {
    if payload.len() < 6 {
        return bad(format!("error reply of {} bytes", payload.len()));
    }
    let code = be32(payload);
    if code == 0 {
        return bad("error reply with error 0");
    }
    let len = usize::from(be16(&payload[4..]));
    let rest = &payload[6..];
    let tail = match kind {
        TYPE_ERROR => 0,
        TYPE_ERROR_OFFSET => 8,
        _ => rest.len().saturating_sub(len),
    };
    if rest.len() != len + tail {
        return bad(format!(
            "error reply of {} bytes with a {len}-byte message",
            payload.len()
        ));
    }
    // A server's message may be 4 KiB of anything: the first 512 bytes are kept, on one line.
    let shown = &rest[..len.min(MAX_ERROR_MESSAGE)];
    let mut message: String = String::from_utf8_lossy(shown)
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if shown.len() < len {
        message.push_str(" (cut)");
    }
    let offset = (kind == TYPE_ERROR_OFFSET).then(|| be64(&rest[len..]));
    Ok(Chunk::Error {
        code,
        message,
        offset,
    })
}

/// One whole reply at the front of `bytes`, for fuzzing and tests: its header and (structured) parsed chunk, and
/// how many bytes it took; `None` when `bytes` holds only part of it. A simple reply's data is not included (its
/// length is the request's, which only the caller knows).
pub fn decode(bytes: &[u8]) -> Result<Option<(Header, Option<Chunk<'_>>, usize)>, ReplyError> {
    if bytes.len() < 4 {
        return Ok(None);
    }
    let len = header_len(bytes)?;
    if bytes.len() < len {
        return Ok(None);
    }
    let header = parse_header(&bytes[..len])?;
    match header {
        Header::Simple { .. } => Ok(Some((header, None, len))),
        Header::Structured {
            flags,
            kind,
            length,
            ..
        } => {
            let end = len + length as usize;
            if bytes.len() < end {
                return Ok(None);
            }
            let chunk = parse_chunk(kind, flags, &bytes[len..end])?;
            Ok(Some((header, Some(chunk), end)))
        }
    }
}

/// What an NBD error number means (the protocol's errno values).
pub fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }

    #[test]
    fn simple_and_structured_replies_parse() {
        let mut simple = SIMPLE_MAGIC.to_be_bytes().to_vec();
        simple.extend(5u32.to_be_bytes());
        simple.extend(7u64.to_be_bytes());
        assert_eq!(
            decode(&simple),
            Ok(Some((
                Header::Simple {
                    error: 5,
                    cookie: 7
                },
                None,
                16
            )))
        );
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend([1, 2, 3]);
        let r = structured(0, TYPE_OFFSET_DATA, 9, &data);
        let (h, c, used) = decode(&r).expect("valid").expect("whole");
        assert_eq!((h.cookie(), used), (9, r.len()));
        assert_eq!(
            c,
            Some(Chunk::Data {
                offset: 4096,
                data: &[1, 2, 3]
            })
        );
        let mut hole = 0u64.to_be_bytes().to_vec();
        hole.extend(512u32.to_be_bytes());
        let r = structured(FLAG_DONE, TYPE_OFFSET_HOLE, 1, &hole);
        assert_eq!(
            decode(&r).expect("valid").expect("whole").1,
            Some(Chunk::Hole {
                offset: 0,
                length: 512
            })
        );
        let mut bs = 3u32.to_be_bytes().to_vec();
        for (l, f) in [(65536u32, 1u32), (4096, 0)] {
            bs.extend(l.to_be_bytes());
            bs.extend(f.to_be_bytes());
        }
        let r = structured(FLAG_DONE, TYPE_BLOCK_STATUS, 2, &bs);
        assert_eq!(
            decode(&r).expect("valid").expect("whole").1,
            Some(Chunk::BlockStatus {
                context: 3,
                extents: vec![
                    Extent {
                        length: 65536,
                        flags: 1
                    },
                    Extent {
                        length: 4096,
                        flags: 0
                    }
                ]
            })
        );
        let r = structured(FLAG_DONE, TYPE_NONE, 2, &[]);
        assert_eq!(
            decode(&r).expect("valid").expect("whole").1,
            Some(Chunk::None)
        );
    }

    #[test]
    fn error_replies_carry_their_code_message_and_offset() {
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend(4u16.to_be_bytes());
        e.extend(b"bad\n");
        let r = structured(FLAG_DONE, TYPE_ERROR, 1, &e);
        assert_eq!(
            decode(&r).expect("valid").expect("whole").1,
            Some(Chunk::Error {
                code: 5,
                message: "bad ".into(),
                offset: None
            })
        );
        e.extend(8192u64.to_be_bytes());
        let r = structured(FLAG_DONE, TYPE_ERROR_OFFSET, 1, &e);
        assert_eq!(
            decode(&r).expect("valid").expect("whole").1,
            Some(Chunk::Error {
                code: 5,
                message: "bad\n".replace('\n', " "),
                offset: Some(8192)
            })
        );
        // An unknown error type is still an error, not a protocol violation.
        let mut u = 95u32.to_be_bytes().to_vec();
        u.extend(0u16.to_be_bytes());
        u.extend([9, 9]);
        let r = structured(FLAG_DONE, (1 << 15) + 77, 1, &u);
        assert!(matches!(
            decode(&r),
            Ok(Some((_, Some(Chunk::Error { code: 95, .. }), _)))
        ));
        assert_eq!(errno_name(108), "ESHUTDOWN");
    }

    #[test]
    fn truncated_replies_are_incomplete_not_errors() {
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend([7u8; 100]);
        let r = structured(0, TYPE_OFFSET_DATA, 9, &data);
        for cut in 0..r.len() {
            assert_eq!(decode(&r[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn wrong_magic_oversized_and_malformed_replies_are_errors() {
        let mut r = structured(0, TYPE_OFFSET_DATA, 9, &[0; 9]);
        r[0] ^= 1;
        assert!(decode(&r).expect_err("magic").0.contains("unknown magic"));
        // A header that claims 4 GiB: refused from the header alone, nothing more read.
        let mut huge = structured(0, TYPE_OFFSET_DATA, 9, &[]);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge)
            .expect_err("oversized")
            .0
            .contains("more than"));
        for (flags, kind, payload) in [
            (0, TYPE_NONE, vec![]),                         // NONE without DONE
            (FLAG_DONE, TYPE_NONE, vec![1]),                // NONE with a payload
            (0, TYPE_OFFSET_DATA, vec![0; 8]),              // no data
            (0, TYPE_OFFSET_HOLE, vec![0; 11]),             // short hole
            (0, TYPE_OFFSET_HOLE, vec![0; 12]),             // hole of length 0
            (0, TYPE_BLOCK_STATUS, vec![0; 8]),             // no descriptor
            (0, TYPE_BLOCK_STATUS, vec![0; 13]),            // a partial descriptor
            (0, TYPE_BLOCK_STATUS, vec![0; 12]),            // a descriptor of length 0
            (0, TYPE_ERROR, vec![0, 0, 0, 5, 0]),           // short error
            (0, TYPE_ERROR, vec![0, 0, 0, 0, 0, 0]),        // error 0
            (0, TYPE_ERROR, vec![0, 0, 0, 5, 0, 9, 1]),     // message longer than the payload
            (0, TYPE_ERROR_OFFSET, vec![0, 0, 0, 5, 0, 0]), // no offset
            (0, 3, vec![]),                                 // unknown non-error type
            (0, 6, vec![0; 12]), // extended block status, never negotiated
        ] {
            let r = structured(flags, kind, 1, &payload);
            let e = decode(&r).expect_err(&format!("type {kind} {payload:?}"));
            assert!(!e.0.contains('\n'));
        }
    }
}
