//! Round trips and rejections of the codec.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;
use crate::error::Error;

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
        offer: Offer::full(Fallback::SourceNoState),
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
        offer: Offer::full(Fallback::SourceNoState),
    }
    .encode(&mut bad);
    let mut longer = bad.clone();
    longer[HEADER_LEN + 50] = 3;
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
        offer: Offer::full(Fallback::SourceNoState),
    });
    roundtrip(Message::Hello {
        volume_size: 1,
        chunk_size: 4096,
        block_size: 4096,
        source: String::new(),
        offer: Offer::full(Fallback::SourceNoState),
    });
    roundtrip(Message::Ready {
        target_size: 5,
        window: 8192,
        kind: SyncKind::Full,
        reason: Fallback::BasesDiffer,
    });
    roundtrip(Message::Ready {
        target_size: 5,
        window: 8192,
        kind: SyncKind::ChangeList,
        reason: Fallback::None,
    });
    roundtrip(Message::Hello {
        volume_size: 1 << 30,
        chunk_size: 65536,
        block_size: 4096,
        source: "ns/v".into(),
        offer: Offer {
            kind: SyncKind::Manifest,
            reason: Fallback::None,
            base: d,
        },
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
    for lane in 0..crate::zstream::MAX_LANES as u8 {
        roundtrip(Message::Data(DataFrame {
            chunk: 9,
            send_mask: 1,
            zero_mask: 0,
            encoding: Encoding::Lane(lane),
            raw_len: 4096,
            payload: Bytes::from_static(b"lane part"),
        }));
    }
    let mut past = BytesMut::new();
    Message::Data(DataFrame {
        chunk: 9,
        send_mask: 1,
        zero_mask: 0,
        encoding: Encoding::Lane(crate::zstream::MAX_LANES as u8 - 1),
        raw_len: 4096,
        payload: Bytes::from_static(b"x"),
    })
    .encode(&mut past);
    past[super::HEADER_LEN + 24] += 1; // the encoding byte: lane MAX_LANES
    let err = parse_frame(&mut past).expect_err("no such lane");
    assert!(err.to_string().contains("unknown encoding 6"), "{err}");
    roundtrip(Message::Blocks {
        digest: d,
        cover: vec![Digest::of(b"left"), Digest::of(b"right")],
        data: DataFrame {
            chunk: 1 << 40,
            send_mask: 0b1001,
            zero_mask: 0b10,
            encoding: Encoding::Lane(3),
            raw_len: 8192,
            payload: Bytes::from_static(b"pushed blocks"),
        },
    });
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
    buf[2] = 7;
    let err = parse_frame(&mut buf).expect_err("must reject");
    assert!(matches!(err, Error::VersionMismatch { peer: 7, ours: 8 }));
    assert!(
        err.to_string()
            .contains("peer speaks version 7, this build speaks version 8"),
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
    let mut blocks = BytesMut::new();
    Message::Blocks {
        digest: Digest::of(b"chunk"),
        cover: Vec::new(),
        data: DataFrame {
            chunk: 2,
            send_mask: 1,
            zero_mask: 0,
            encoding: Encoding::Raw,
            raw_len: 0,
            payload: Bytes::new(),
        },
    }
    .encode(&mut blocks);
    assert_eq!(blocks.len(), super::HEADER_LEN + 62, "BLOCKS' fixed fields");
    let mut short = blocks.clone();
    short.truncate(short.len() - 1);
    short[super::HEADER_LEN - 1] -= 1;
    let err = parse_frame(&mut short).expect_err("BLOCKS without its raw_len's last byte");
    assert!(
        err.to_string().contains("BLOCKS frame has a wrong length"),
        "{err}"
    );
    // A cover count the frame does not hold: one chaining value announced, none there.
    blocks[super::HEADER_LEN + 40] = 1;
    let err = parse_frame(&mut blocks).expect_err("a cover longer than the frame");
    assert!(
        err.to_string().contains("BLOCKS frame has a wrong length"),
        "{err}"
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

#[test]
fn an_unknown_sync_kind_is_a_protocol_violation_and_an_unknown_reason_is_kept() {
    let mut buf = BytesMut::new();
    Message::Ready {
        target_size: 1,
        window: 64,
        kind: SyncKind::Full,
        reason: Fallback::Unknown(200),
    }
    .encode(&mut buf);
    let mut bad = buf.clone();
    match parse_frame(&mut buf) {
        Ok(Some(Message::Ready { reason, .. })) => assert_eq!(reason, Fallback::Unknown(200)),
        other => panic!("{other:?}"),
    }
    bad[HEADER_LEN + 12] = 7;
    let err = parse_frame(&mut bad).expect_err("kind 7");
    assert!(err.to_string().contains("unknown sync kind 7"), "{err}");
}
