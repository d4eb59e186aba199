//! The fixed newstyle handshake (`doc/proto.md`, "Handshake"): `NBD_OPT_STRUCTURED_REPLY`, then
//! `NBD_OPT_SET_META_CONTEXT` for the contexts asked for, then `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`.
//!
//! Trusted: nothing. Every option reply's length is bounded ([`MAX_OPTION_REPLY`]) before it is read, and so is
//! the number of replies to one option; a server without fixed newstyle or without `NBD_OPT_GO` is refused.

use std::io::{self, Read, Write};

/// `NBDMAGIC`.
const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle (and the option request magic).
const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The oldstyle protocol's second magic.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option reply magic.
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
/// `NBD_FLAG_READ_ONLY` in the transmission flags.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_DF`: the server can answer a read in one chunk.
const FLAG_HAS_FLAGS: u16 = 1;

/// The largest option reply read (the protocol's strings are at most 4096 bytes).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The most replies accepted to one option before its ACK.
const MAX_REPLIES: usize = 64;
/// The largest maximum block size used (bigger advertised values are clamped).
const MAX_BLOCK: u32 = super::reply::MAX_REQUEST;

/// What the server said about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (a power of two; requests are aligned to it).
    pub min_block: u32,
    /// Maximum bytes of one request (at most [`super::reply::MAX_REQUEST`]).
    pub max_block: u32,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts the server selected: `(id, name)`.
    pub contexts: Vec<(u32, String)>,
}

impl Export {
    /// The id of the selected context `name`, if the server selected it.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Whether the server marks the export read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
}

/// Why the handshake failed, and whether a later try may succeed.
#[derive(Debug)]
pub struct Failure {
    /// One line.
    pub reason: String,
    /// Whether a retry may help (the server went away, shuts down, timed out).
    pub retryable: bool,
}

impl Failure {
    fn permanent(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            retryable: false,
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        let reason = match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the server closed the connection during the handshake".to_owned()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                "the server did not answer the handshake in time".to_owned()
            }
            _ => format!("handshake: {e}"),
        };
        Failure {
            reason,
            retryable: true,
        }
    }
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend(OPT_MAGIC.to_be_bytes());
    msg.extend(option.to_be_bytes());
    msg.extend((data.len() as u32).to_be_bytes());
    msg.extend(data);
    s.write_all(&msg)?;
    s.flush()
}

/// One option reply: its type and data (bounded).
fn read_reply(s: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>), Failure> {
    if read_u64(s)? != REPLY_MAGIC {
        return Err(Failure::permanent("option reply with a wrong magic"));
    }
    let answered = read_u32(s)?;
    if answered != option {
        return Err(Failure::permanent(format!(
            "the server answered option {answered} to option {option}"
        )));
    }
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY {
        return Err(Failure::permanent(format!(
            "option reply of {len} bytes, more than the {MAX_OPTION_REPLY} allowed"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((kind, data))
}

fn is_error(kind: u32) -> bool {
    kind & (1 << 31) != 0
}

/// The server's message of an error reply, for ours.
fn error_text(kind: u32, data: &[u8]) -> String {
    let name = match kind {
        REP_ERR_UNSUP => "unsupported",
        0x8000_0002 => "forbidden by policy",
        0x8000_0003 => "invalid",
        0x8000_0004 => "unsupported on this platform",
        0x8000_0005 => "TLS required",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        0x8000_0008 => "block size negotiation required",
        0x8000_0009 => "request too big",
        _ => "error",
    };
    let message = String::from_utf8_lossy(data).replace(['\n', '\r'], " ");
    if message.is_empty() {
        name.to_owned()
    } else {
        format!("{name} ({message})")
    }
}

/// Negotiates export `name` on a fresh connection: structured replies if the server has them, the metadata
/// `contexts` asked for (those the server selects end up in [`Export::contexts`]), then `NBD_OPT_GO`.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    name: &str,
    contexts: &[String],
) -> Result<Export, Failure> {
    if read_u64(s)? != INIT_MAGIC {
        return Err(Failure::permanent("not an NBD server (no NBDMAGIC)"));
    }
    match read_u64(s)? {
        OPT_MAGIC => {}
        OLDSTYLE_MAGIC => return Err(Failure::permanent("oldstyle NBD servers are not supported")),
        _ => return Err(Failure::permanent("not an NBD server (no IHAVEOPT)")),
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Failure::permanent(
            "the server does not speak fixed newstyle NBD",
        ));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        REP_ACK => true,
        k if is_error(k) => false,
        k => {
            return Err(Failure::permanent(format!(
                "unexpected reply {k} to NBD_OPT_STRUCTURED_REPLY"
            )))
        }
    };

    let mut selected = Vec::new();
    if structured && !contexts.is_empty() {
        let mut data = Vec::new();
        data.extend((name.len() as u32).to_be_bytes());
        data.extend(name.as_bytes());
        data.extend((contexts.len() as u32).to_be_bytes());
        for c in contexts {
            data.extend((c.len() as u32).to_be_bytes());
            data.extend(c.as_bytes());
        }
        send_option(s, OPT_SET_META_CONTEXT, &data)?;
        for _ in 0..=MAX_REPLIES {
            let (kind, data) = read_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if data.len() > 4 => {
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let text = String::from_utf8_lossy(&data[4..]).into_owned();
                    if !contexts.contains(&text) {
                        return Err(Failure::permanent(format!(
                            "the server selected metadata context {text:?}, which was not asked for"
                        )));
                    }
                    selected.push((id, text));
                }
                // No metadata contexts on this server: none selected.
                k if is_error(k) => break,
                k => {
                    return Err(Failure::permanent(format!(
                        "unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
            if selected.len() > contexts.len() {
                return Err(Failure::permanent(
                    "the server selected more contexts than asked for",
                ));
            }
        }
    }

    let mut data = Vec::new();
    data.extend((name.len() as u32).to_be_bytes());
    data.extend(name.as_bytes());
    data.extend(1u16.to_be_bytes());
    data.extend(INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let (mut size_flags, mut blocks) = (None, None);
    for _ in 0..=MAX_REPLIES {
        let (kind, data) = read_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => {
                let Some((size, flags)) = size_flags else {
                    return Err(Failure::permanent(
                        "NBD_OPT_GO ended without NBD_INFO_EXPORT",
                    ));
                };
                let (min_block, max_block) = blocks.unwrap_or((1, MAX_BLOCK));
                return Ok(Export {
                    size,
                    flags,
                    min_block,
                    max_block,
                    structured,
                    contexts: selected,
                });
            }
            REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                INFO_EXPORT if data.len() == 12 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    if flags & FLAG_HAS_FLAGS == 0 {
                        return Err(Failure::permanent(
                            "transmission flags without NBD_FLAG_HAS_FLAGS",
                        ));
                    }
                    size_flags = Some((u64::from_be_bytes(b), flags));
                }
                INFO_BLOCK_SIZE if data.len() == 14 => {
                    let word = |i: usize| {
                        u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]])
                    };
                    let (min, preferred, max) = (word(2), word(6), word(10));
                    if !min.is_power_of_two() || min > 65536 || preferred < min || max < min {
                        return Err(Failure::permanent(format!(
                            "bad block sizes: minimum {min}, preferred {preferred}, maximum {max}"
                        )));
                    }
                    blocks = Some((min, max.min(MAX_BLOCK).max(min)));
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => {
                    return Err(Failure::permanent(format!(
                        "NBD_REP_INFO of {} bytes",
                        data.len()
                    )))
                }
                _ => {} // other information is not needed
            },
            REP_ERR_UNSUP => {
                return Err(Failure::permanent("the server does not support NBD_OPT_GO"));
            }
            REP_ERR_UNKNOWN => {
                return Err(Failure::permanent(format!(
                    "the server has no export {name:?}: {}",
                    error_text(kind, &data)
                )));
            }
            k if is_error(k) => {
                return Err(Failure {
                    reason: format!("NBD_OPT_GO refused: {}", error_text(k, &data)),
                    retryable: k == REP_ERR_SHUTDOWN,
                });
            }
            k => {
                return Err(Failure::permanent(format!(
                    "unexpected reply {k} to NBD_OPT_GO"
                )))
            }
        }
    }
    // Too many replies: say goodbye and give up.
    let _ = send_option(s, OPT_ABORT, &[]);
    Err(Failure::permanent("too many replies to NBD_OPT_GO"))
}
