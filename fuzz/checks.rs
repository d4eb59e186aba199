//! What must hold for ANY input to the wire decoder, the framed reader, the authentication exchange and the DATA
//! payload decoder. Shared, word for word, by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly, unbounded)
//! and the bounded seeded run under stable `cargo test` (`tests/decoder_props.rs`): each function panics when a
//! property fails, so either driver reports the input.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use blockmover::chunk::{block_range, blocks_in, MAX_CHUNK_SIZE};
use blockmover::codec::{
    decode_frame, parse_frame, DataFrame, Encoding, FrameReader, Message, HEADER_LEN,
};
use blockmover::destination::decode_payload;
use blockmover::net::authenticate;
use blockmover::tls::{Psk, Side};
use bytes::{Bytes, BytesMut};

/// A valid key the authentication checks run with.
pub const KEY: &str = "volsync:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// One frame at the front of `data`: the slice decoder and the buffer decoder agree; a decoded frame re-encodes to
/// exactly its bytes (the encoding is canonical, so nothing a peer sends is silently ignored); errors are one line.
pub fn frame(data: &[u8]) {
    let decoded = decode_frame(data);
    let mut buf = BytesMut::from(data);
    let parsed = parse_frame(&mut buf);
    match (&decoded, &parsed) {
        (Ok(Some((m, used))), Ok(Some(p))) => {
            assert_eq!(m, p, "decode_frame and parse_frame disagree");
            assert!(*used >= HEADER_LEN && *used <= data.len());
            assert_eq!(
                buf.len(),
                data.len() - used,
                "parse_frame consumed a different length"
            );
            canonical(m, &data[..*used]);
        }
        (Ok(None), Ok(None)) => {}
        (Err(a), Err(b)) => {
            assert_eq!(
                a.to_string(),
                b.to_string(),
                "the decoders fail differently"
            );
            assert!(!a.to_string().contains('\n'), "multi-line error: {a}");
        }
        _ => panic!("decode_frame {decoded:?} and parse_frame {parsed:?} disagree"),
    }
}

/// `frame` is the whole encoding of `m`, or (ABORT whose text is not UTF-8) one that decodes to `m` again.
fn canonical(m: &Message, frame: &[u8]) {
    let mut again = BytesMut::new();
    m.encode(&mut again);
    let lossy_abort = matches!(m, Message::Abort { .. })
        && std::str::from_utf8(&frame[HEADER_LEN + 2..]).is_err();
    if !lossy_abort {
        assert_eq!(
            &again[..],
            frame,
            "{} does not re-encode to its bytes",
            m.name()
        );
    }
    match decode_frame(&again) {
        Ok(Some((back, used))) if !lossy_abort => {
            assert_eq!(&back, m);
            assert_eq!(used, again.len());
        }
        Ok(Some(_)) => {}
        other => panic!("re-encoded {} does not decode: {other:?}", m.name()),
    }
}

/// A valid message encodes, decodes to itself, and reads back through a [`FrameReader`] fed in small pieces.
pub fn roundtrip(msgs: &[Message], piece: usize) {
    let mut wire = BytesMut::new();
    for m in msgs {
        let start = wire.len();
        m.encode(&mut wire);
        let (back, used) = decode_frame(&wire[start..])
            .expect("a valid message decodes")
            .expect("complete");
        assert_eq!(&back, m);
        assert_eq!(used, wire.len() - start);
    }
    let read = read_all(&wire, piece);
    assert_eq!(read.len(), msgs.len(), "reader: {read:?}");
    for (got, want) in read.iter().zip(msgs) {
        assert_eq!(got.as_ref().expect("valid stream"), want);
    }
}

/// Arbitrary bytes through a [`FrameReader`] in pieces of `data[0]` bytes: every message it yields is the one
/// [`decode_frame`] finds at the same offset, and it ends with end of stream or one error, never a panic.
pub fn stream(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first % 64) + 1;
    let read = read_all(rest, piece);
    let mut at = 0;
    for (i, r) in read.iter().enumerate() {
        match (r, decode_frame(&rest[at..])) {
            (Ok(m), Ok(Some((d, used)))) => {
                assert_eq!(m, &d);
                at += used;
            }
            (Err(e), _) => {
                assert_eq!(i, read.len() - 1, "the reader went on after an error");
                assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
            }
            (Ok(m), other) => panic!("reader yielded {m:?}, decode_frame {other:?}"),
        }
    }
}

/// Every message of `wire` through a [`FrameReader`] reading at most `piece` bytes at a time, until the end or the
/// first error. The reader never waits (the bytes are all there), so it is polled without a runtime.
pub fn read_all(wire: &[u8], piece: usize) -> Vec<blockmover::Result<Message>> {
    let mut reader = FrameReader::new(Pieces { rest: wire, piece });
    let mut out = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let next = {
            let fut = pin!(reader.read("fuzz"));
            match fut.poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending => panic!("a reader over bytes in memory is never pending"),
            }
        };
        match next {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// Bytes in memory, handed out at most `piece` at a time.
struct Pieces<'a> {
    rest: &'a [u8],
    piece: usize,
}

impl tokio::io::AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.piece.min(self.rest.len()).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}

/// `data[0]` bytes of key-file text, the rest what a peer sends during authentication:
/// - the key-file parser accepts only `<identity>:<at least 32 hex digits>` and never quotes the secret;
/// - the exchange succeeds only when the peer's first frame is AUTH carrying exactly the right proof.
pub fn handshake(rt: &tokio::runtime::Runtime, data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (text, peer) = rest.split_at(usize::from(first).min(rest.len()));
    key_text(&String::from_utf8_lossy(text));

    let psk = Psk::parse(KEY).expect("the fixed key parses");
    let exporter = blake3::hash(b"fuzz session").into();
    for side in [Side::Source, Side::Destination] {
        let mut reader = FrameReader::new(peer);
        let mut writer = blockmover::codec::FrameWriter::new(tokio::io::sink());
        let limit = std::time::Duration::from_secs(60);
        let r = rt.block_on(authenticate(
            &mut reader,
            &mut writer,
            &psk,
            side,
            &exporter,
            limit,
        ));
        let honest = Message::Auth {
            proof: psk.proof(side.peer(), &exporter),
        };
        let first_is_proof = matches!(decode_frame(peer), Ok(Some((m, _))) if m == honest);
        assert_eq!(r.is_ok(), first_is_proof, "{side:?} authenticated: {r:?}");
    }
}

fn key_text(text: &str) {
    let secret = text.trim().split_once(':').map(|(_, s)| s);
    match Psk::parse(text) {
        Ok(_) => {
            let s = secret.expect("an accepted key has ':'");
            assert!(
                s.len() >= 32
                    && s.len().is_multiple_of(2)
                    && s.bytes().all(|b| b.is_ascii_hexdigit())
            );
        }
        Err(reason) => {
            // A secret-like value (8+ hex digits), not text that happens to be in the reason's own wording.
            let secret_like = |s: &&str| s.len() >= 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if let Some(s) = secret.filter(secret_like) {
                assert!(
                    !reason.contains(s),
                    "the reason quotes the secret: {reason}"
                );
            }
            assert!(!reason.contains('\n'));
        }
    }
}

/// A DATA frame made of `data` for a chunk of some length: the payload decoder accepts it only when masks and
/// lengths are consistent, and then returns exactly `raw_len` bytes, never more than the chunk (a zstd bomb is
/// refused at the cap, not inflated).
pub fn data_payload(data: &[u8]) {
    if data.len() < 26 {
        return;
    }
    let (head, payload) = data.split_at(26);
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    // Chunk lengths a destination meets: powers of two up to the largest chunk, and a short last chunk.
    let chunk_len = match head[24] % 8 {
        n @ 0..=6 => 4096usize << n,
        _ => 1 + (word(0) % u64::from(MAX_CHUNK_SIZE)) as usize,
    };
    let encoding = if head[25] & 1 == 0 {
        Encoding::Raw
    } else {
        Encoding::Zstd
    };
    let d = DataFrame {
        chunk: 0,
        send_mask: word(0),
        zero_mask: word(8),
        encoding,
        raw_len: word(16) as u32,
        payload: Bytes::copy_from_slice(payload),
    };
    data_frame(&d, chunk_len);
}

/// A lane's parts (`u16` LE raw_len, `u16` LE part length, the part; repeated) decoded in order by one lane
/// decoder: each part decodes to exactly its raw_len or is refused with a one-line error, and after a refusal
/// nothing more is decoded (a session ends at its first bad DATA).
pub fn lane_parts(data: &[u8]) {
    let Ok(mut decoder) = blockmover::zstream::Decoder::new() else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 4 {
        let raw_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let n = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let part = &rest[4..4 + n];
        rest = &rest[4 + n..];
        lane_part(&mut decoder, part, raw_len);
    }
}

/// [`lane_parts`]'s property for one part; false once the lane refused it.
pub fn lane_part(decoder: &mut blockmover::zstream::Decoder, part: &[u8], raw_len: usize) -> bool {
    match decoder.decompress(part, raw_len) {
        Ok(raw) => {
            assert_eq!(raw.len(), raw_len);
            true
        }
        Err(e) => {
            assert!(!e.contains('\n'), "multi-line error: {e}");
            false
        }
    }
}

/// [`data_payload`]'s property for one frame.
pub fn data_frame(d: &DataFrame, chunk_len: usize) {
    match decode_payload(d, chunk_len) {
        Ok(raw) => {
            let blocks = blocks_in(chunk_len);
            let sent: usize = (0..blocks)
                .filter(|b| d.send_mask & (1 << b) != 0)
                .map(|b| block_range(chunk_len, b).len())
                .sum();
            assert_eq!(raw.len(), d.raw_len as usize);
            assert_eq!(raw.len(), sent);
            assert!(raw.len() <= chunk_len);
            assert_eq!(d.send_mask & d.zero_mask, 0);
            if d.encoding == Encoding::Raw {
                assert_eq!(&raw[..], &d.payload[..]);
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
    }
}

/// The most the NBD reply parser may allocate for `input`: proportional to the bytes it holds (block status
/// descriptors, a lossy UTF-8 message of up to three bytes per input byte) and a one-line error text, never to a
/// length a header claims.
pub fn nbd_reply_bound(input: &[u8]) -> usize {
    3 * input.len() + 256
}

/// One NBD reply at the front of arbitrary bytes: a reply, "incomplete" only for a true prefix of one whose
/// claimed length is within [`nbd::reply::MAX_PAYLOAD`], or a one-line error; never a panic. Every chunk type
/// parses any payload the same way.
pub fn nbd_reply(data: &[u8]) {
    use blockmover::nbd::reply::{self, Chunk, Header};
    match reply::decode(data) {
        Ok(Some((header, chunk, used))) => {
            assert!(used <= data.len());
            match (header, chunk) {
                (Header::Simple { .. }, None) => assert_eq!(used, reply::SIMPLE_HEADER),
                (Header::Structured { length, flags, .. }, Some(chunk)) => {
                    assert!(length <= reply::MAX_PAYLOAD);
                    assert_eq!(used, reply::STRUCTURED_HEADER + length as usize);
                    match chunk {
                        Chunk::None => assert!(length == 0 && flags & reply::FLAG_DONE != 0),
                        Chunk::Data { data: d, .. } => assert_eq!(d.len() + 8, length as usize),
                        Chunk::Hole { length: l, .. } => assert!(l > 0 && length == 12),
                        Chunk::BlockStatus { extents, .. } => {
                            assert_eq!(extents.len() * 8 + 4, length as usize);
                            assert!(extents.iter().all(|e| e.length > 0));
                        }
                        Chunk::Error { code, message, .. } => {
                            assert_ne!(code, 0);
                            assert!(!message.contains('\n'));
                        }
                    }
                }
                other => panic!("header and chunk disagree: {other:?}"),
            }
        }
        Ok(None) => {
            if data.len() >= 4 {
                let len = reply::header_len(data).expect("incomplete, so the magic is known");
                if data.len() >= len {
                    let h = reply::parse_header(&data[..len])
                        .expect("incomplete, so the header parses");
                    match h {
                        Header::Structured { length, .. } => {
                            assert!(
                                data.len() < len + length as usize,
                                "complete but reported incomplete"
                            )
                        }
                        Header::Simple { .. } => {
                            panic!("a whole simple header reported incomplete")
                        }
                    }
                }
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
    }
    for kind in [0u16, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003, 3, 0xffff] {
        for flags in [0u16, reply::FLAG_DONE] {
            if let Err(e) = reply::parse_chunk(kind, flags, data) {
                assert!(!e.0.contains('\n'));
            }
        }
    }
}
