//! DATA that must not be written (a zstd bomb, bytes that do not hash to the announced digest, duplicates, BLOCKS
//! outside a delta by change list);
//! DIGESTS past the end or before HELLO, a second HELLO.

use super::*;

/// The target's chunk digests: what the destination computes for what it holds.
fn target_digests(site: &Site) -> Result<Vec<Digest>> {
    let bytes = std::fs::read(&site.target)?;
    let bytes = bytes
        .get(..SIZE as usize)
        .context("target shorter than SIZE")?;
    Ok(bytes.chunks(CHUNK as usize).map(Digest::of).collect())
}

/// Announces every chunk as the target already holds it except chunk 0, announced as `chunk0`, and waits for the
/// destination's NEED for chunk 0.
async fn need_chunk_0<S>(peer: &mut Peer<S>, site: &Site, chunk0: Digest) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut digests = target_digests(site)?;
    digests[0] = chunk0;
    peer.send(&Message::Digests { first: 0, digests }).await?;
    loop {
        match peer.recv().await? {
            Message::Need { chunk: 0, .. } => return Ok(()),
            Message::Ack { .. } => {}
            other => bail!("expected NEED for chunk 0, received {other:?}"),
        }
    }
}

/// Chunk 0 of the target with its block 0 replaced by `0xA5` bytes, as the DATA of [`unsolicited_data`] makes it.
fn chunk_0_rebuilt(site: &Site) -> Result<Vec<u8>> {
    let mut chunk = std::fs::read(&site.target)?;
    chunk.truncate(CHUNK as usize);
    chunk[..4096].fill(0xA5);
    Ok(chunk)
}

#[tokio::test]
async fn zstd_bomb_answering_a_need_is_refused_at_the_block_size_and_not_written() -> Result<()> {
    let site = site(10)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(b"anything")).await?;
    // 64 MiB of zeros in a few KiB of zstd, claiming to be the one 4 KiB block of the NEED.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3)?;
    ensure!(bomb.len() < 4096, "the bomb is {} bytes", bomb.len());
    peer.send(&Message::Data(DataFrame {
        chunk: 0,
        send_mask: 1,
        zero_mask: 0,
        encoding: Encoding::Zstd,
        raw_len: 4096,
        payload: Bytes::from(bomb),
    }))
    .await?;
    let needle = "does not decompress within 4096 bytes";
    let got = refused(&site, dest, peer, 1, needle).await?;
    aborted(&got, AbortCode::Protocol, needle)
}

#[tokio::test]
async fn a_lane_part_sent_without_the_parts_before_it_is_refused_and_not_written() -> Result<()> {
    let site = site(21)?;
    let rebuilt = chunk_0_rebuilt(&site)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(&rebuilt)).await?;
    // The right block, as the second part of lane 1: its first part (the frame header, the window the second
    // part refers to) never came.
    let mut lane = blockmover::zstream::Encoder::new(1)?;
    lane.compress(&[0x5Au8; 4096])?;
    let second = lane.compress(&rebuilt[..4096])?;
    peer.send(&Message::Data(DataFrame {
        chunk: 0,
        send_mask: 1,
        zero_mask: 0,
        encoding: Encoding::Lane(1),
        raw_len: 4096,
        payload: Bytes::from(second),
    }))
    .await?;
    let needle = "DATA for chunk 0: the lane does not decode";
    let got = refused(&site, dest, peer, 1, needle).await?;
    aborted(&got, AbortCode::Protocol, needle)
}

#[tokio::test]
async fn data_not_hashing_to_the_announced_digest_is_a_digest_mismatch_and_not_written(
) -> Result<()> {
    let site = site(11)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(b"not what the data hashes to")).await?;
    peer.send(&unsolicited_data()).await?;
    let got = refused(&site, dest, peer, RETRYABLE, "digest mismatch on chunk 0").await?;
    aborted(&got, AbortCode::Digest, "digest mismatch on chunk 0")
}

#[tokio::test]
async fn duplicated_data_is_rejected_and_the_chunk_is_old_or_verified() -> Result<()> {
    let site = site(12)?;
    let rebuilt = chunk_0_rebuilt(&site)?;
    let old = std::fs::read(&site.target)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(&rebuilt)).await?;
    // The right answer, then the same frame again (a replay within the session).
    let mut twice = frame(&unsolicited_data());
    twice.extend_from_slice(&frame(&unsolicited_data()));
    peer.raw(&twice).await?;
    let got = peer.drain().await;
    aborted(&got, AbortCode::Protocol, "no open NEED")?;
    let exit = dest.exit().await?;
    failed(&exit, 1, &["no open NEED"], &site.status, Kind::Destination)?;
    // The first DATA verified, so chunk 0 may hold it; nothing else may have changed.
    let now = std::fs::read(&site.target)?;
    let chunk = CHUNK as usize;
    ensure!(
        now[..chunk] == old[..chunk] || now[..chunk] == rebuilt[..],
        "chunk 0"
    );
    ensure!(
        now[chunk..] == old[chunk..],
        "a chunk beyond chunk 0 changed"
    );
    Ok(())
}

/// BLOCKS (pushed blocks with their chunk's digest) belong to a delta by change list only: in a full session they
/// are refused, even when they would verify, and nothing is written.
#[tokio::test]
async fn blocks_pushed_in_a_full_session_are_refused_and_not_written() -> Result<()> {
    let site = site(22)?;
    let rebuilt = chunk_0_rebuilt(&site)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    let Message::Data(data) = unsolicited_data() else {
        bail!("unsolicited_data is DATA");
    };
    peer.send(&Message::Blocks {
        digest: Digest::of(&rebuilt),
        cover: Vec::new(),
        data,
    })
    .await?;
    let needle = "BLOCKS outside a delta session";
    let got = refused(&site, dest, peer, 1, needle).await?;
    aborted(&got, AbortCode::Protocol, needle)
}

#[tokio::test]
async fn digests_past_the_last_chunk_are_rejected() -> Result<()> {
    let site = site(13)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    let count = SIZE / u64::from(CHUNK);
    let digests = vec![Digest::of(b"past the end"); count as usize + 1];
    peer.send(&Message::Digests { first: 0, digests }).await?;
    let needle = format!("DIGESTS for chunks 0..{}", count + 1);
    let got = refused(&site, dest, peer, 1, &needle).await?;
    aborted(&got, AbortCode::Protocol, &needle)
}

#[tokio::test]
async fn digests_before_hello_are_rejected() -> Result<()> {
    let site = site(14)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    peer.send(&digests_from_chunk_5()).await?;
    let got = turned_away(&site, dest, &addr, peer, "expected HELLO, received DIGESTS").await?;
    aborted(&got, AbortCode::Protocol, "expected HELLO")
}

#[tokio::test]
async fn second_hello_mid_session_is_rejected() -> Result<()> {
    let site = site(15)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&hello(SIZE)).await?;
    let got = refused(&site, dest, peer, 1, "unexpected HELLO").await?;
    aborted(&got, AbortCode::Protocol, "unexpected HELLO")
}
