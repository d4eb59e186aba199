//! Frames a hostile peer sends out of place, of another version, truncated or too large; and what a failed sync
//! leaves in the status.

use super::*;

/// A HELLO of another protocol version is answered with ABORT(VERSION) and starts no sync.
#[tokio::test]
async fn hello_of_another_version_is_aborted_and_starts_no_sync() -> Result<()> {
    let site = site(1)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    let mut bytes = frame(&hello(SIZE));
    bytes[2] = blockmover::codec::VERSION + 1;
    peer.raw(&bytes).await?;
    let got = turned_away(&site, dest, &addr, peer, "protocol version mismatch").await?;
    aborted(&got, AbortCode::Version, "protocol version mismatch")
}

#[tokio::test]
async fn header_claiming_4_gib_payload_is_rejected_before_it_arrives() -> Result<()> {
    let site = site(2)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.raw(&[
        b'B',
        b'M',
        blockmover::codec::VERSION,
        0x13,
        0xff,
        0xff,
        0xff,
        0xff,
    ])
    .await?;
    let got = refused(&site, dest, peer, 1, "exceeds the maximum").await?;
    aborted(&got, AbortCode::Protocol, "exceeds the maximum")
}

/// A stream that ends inside its HELLO frame is a truncated frame, and no sync.
#[tokio::test]
async fn stream_closed_inside_a_frame_is_a_truncated_frame() -> Result<()> {
    let site = site(3)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    peer.raw(&frame(&hello(SIZE))[..10]).await?;
    peer.writer.shutdown().await?;
    turned_away(&site, dest, &addr, peer, "truncated frame").await?;
    Ok(())
}

/// A stream that ends inside a frame once the sync runs fails it, permanently.
#[tokio::test]
async fn stream_closed_inside_a_frame_mid_sync_fails_the_sync() -> Result<()> {
    let site = site(3)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.raw(&frame(&digests_from_chunk_5())[..10]).await?;
    peer.writer.shutdown().await?;
    refused(&site, dest, peer, 1, "truncated frame").await?;
    Ok(())
}

#[tokio::test]
async fn data_without_an_open_need_is_rejected_and_not_written() -> Result<()> {
    let site = site(4)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&unsolicited_data()).await?;
    let got = refused(&site, dest, peer, 1, "no open NEED").await?;
    aborted(&got, AbortCode::Protocol, "no open NEED")
}

#[tokio::test]
async fn digests_out_of_order_are_rejected() -> Result<()> {
    let site = site(5)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&digests_from_chunk_5()).await?;
    let got = refused(&site, dest, peer, 1, "DIGESTS for chunks").await?;
    aborted(&got, AbortCode::Protocol, "DIGESTS for chunks")
}

#[tokio::test]
async fn source_vanishing_mid_session_is_a_retryable_failure() -> Result<()> {
    let site = site(6)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    drop(peer);
    let exit = dest.exit().await?;
    destination_failed(&site, &exit, RETRYABLE, &["peer closed", "network error"])?;
    Ok(())
}

#[tokio::test]
async fn volume_larger_than_the_target_is_refused_with_an_abort() -> Result<()> {
    let site = site(7)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.send(&hello(SIZE + u64::from(CHUNK))).await?;
    let got = refused(&site, dest, peer, 1, "too small").await?;
    aborted(&got, AbortCode::TargetTooSmall, "too small")
}

#[tokio::test]
async fn ready_of_another_version_fails_the_source_with_version_mismatch() -> Result<()> {
    let site = site(8)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let source = Agent::source(&addr, &site.target, &site.psk_path, &site.status)?;
    let (tcp, _) = tokio::time::timeout(LIMIT, listener.accept()).await??;
    let wire = Arc::new(WireCounters::default());
    let tls = tls::acceptor()?
        .accept(Counted::new(tcp, wire.clone()))
        .await?;
    let exporter = tls::server_exporter(&tls)?;
    let mut peer = Peer::authenticated(tls, &site.psk, Side::Destination, exporter).await?;
    let hello_received = peer.recv().await?;
    ensure!(
        matches!(hello_received, Message::Hello { volume_size: SIZE, chunk_size: CHUNK, block_size: 4096, ref source, .. } if source == "default/target.img"),
        "HELLO {hello_received:?}"
    );
    let mut ready = frame(&Message::Ready {
        target_size: SIZE,
        window: 8192,
        kind: SyncKind::Full,
        reason: Fallback::DestinationNoState,
    });
    ready[2] = blockmover::codec::VERSION + 1;
    peer.raw(&ready).await?;
    peer.drain().await;
    let exit = source.exit().await?;
    let needles = ["protocol version mismatch"];
    failed(&exit, 1, &needles, &site.status, Kind::Source)?;
    ensure!(wire.received.load(Ordering::Relaxed) > 0, "wire counter");
    unchanged(&site.target, site.before)
}

#[tokio::test]
async fn failed_syncs_never_set_last_sync_time_and_a_later_sync_does() -> Result<()> {
    let site = site(9)?;
    // A failed attempt against a status file that has never seen a sync.
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&unsolicited_data()).await?;
    refused(&site, dest, peer, 1, "no open NEED").await?;
    let v = read_status(&site.status)?;
    ensure!(v.get("lastSyncTime").is_none(), "set by a failure: {v:#}");

    // A real sync of other content to a fresh destination with the same status file and target.
    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 90))?;
    let synced = file_digest(&volume, SIZE)?;
    ensure!(
        synced != site.before,
        "the seeds must give different content"
    );
    let (dest, addr) = Agent::destination(&site)?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(src.code == Some(0), "source failed:\n{}", src.stderr);
    ensure!(dst.code == Some(0), "destination failed:\n{}", dst.stderr);
    unchanged(&site.target, synced).context("the target must now equal the volume")?;
    let mut v = read_status(&site.status)?;
    ensure!(v["latestMoverStatus"]["result"] == "Successful", "{v:#}");
    ensure!(v["lastSyncTime"].is_string(), "no lastSyncTime: {v:#}");
    check_status_file(&site.status, Kind::Destination)?;

    // A later failure keeps the previous lastSyncTime (a sentinel, so a rewrite in the same second shows).
    let sentinel = "2001-02-03T04:05:06Z";
    v["lastSyncTime"] = Value::from(sentinel);
    std::fs::write(&site.status, serde_json::to_vec(&v)?)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&digests_from_chunk_5()).await?;
    peer.drain().await;
    let exit = dest.exit().await?;
    let needles = ["DIGESTS for chunks"];
    let v = failed(&exit, 1, &needles, &site.status, Kind::Destination)?;
    unchanged(&site.target, synced)?;
    ensure!(
        v["lastSyncTime"] == sentinel,
        "replaced by a failure: {v:#}"
    );
    Ok(())
}
