//! A replayed proof, and peers that go silent in each phase: each is dropped at its timeout.

use super::*;

#[tokio::test]
async fn proof_recorded_in_another_tls_session_does_not_authenticate() -> Result<()> {
    let site = site(16)?;
    let (dest, addr) = Agent::destination(&site)?;
    let untouched = crate::common::file_bytes(&site.status)?;
    let connect = || async {
        let tcp = TcpStream::connect(&addr).await?;
        anyhow::Ok(tls::connector()?.connect(tls::server_name(), tcp).await?)
    };
    // Session A: the honest proof for A's exporter, as an eavesdropper on A might learn it.
    let a = connect().await?;
    let recorded = site.psk.proof(Side::Source, &tls::client_exporter(&a)?);
    // Session B: the recorded proof, replayed.
    let mut b = connect().await?;
    b.write_all(&frame(&Message::Auth { proof: recorded }))
        .await?;
    b.flush().await?;
    let mut reader = FrameReader::new(b);
    let mut got = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(LIMIT, reader.read("drain")).await {
        got.push(m);
    }
    aborted(&got, AbortCode::Auth, "pre-shared keys do not match")?;
    drop(a);
    // A connection that never proved the key changes nothing (issue 10, finding 4): the status and the target as
    // they were, and the one-shot destination still waits for its source, which then syncs.
    ensure!(
        crate::common::file_bytes(&site.status)? == untouched,
        "the replayed proof changed the status"
    );
    unchanged(&site.target, site.before)?;
    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 160))?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(
        src.code == Some(0) && dst.code == Some(0),
        "the real sync after the replay failed: source {:?}: {}\ndestination {:?}: {}",
        src.code,
        src.stderr,
        dst.code,
        dst.stderr
    );
    unchanged(&site.target, file_digest(&volume, SIZE)?)
}

/// An authenticated peer that never says HELLO is dropped at the handshake timeout, and starts no sync.
#[tokio::test]
async fn authenticated_source_silent_before_hello_is_dropped_at_the_handshake_timeout() -> Result<()>
{
    let site = site(17)?;
    let (dest, addr, peer) = hostile_source_at(&site, &["--handshake-timeout", "2"]).await?;
    let got = turned_away(&site, dest, &addr, peer, "hello timed out after 2s").await?;
    ensure!(got.is_empty(), "no ABORT for a silent peer: {got:?}");
    Ok(())
}

#[tokio::test]
async fn source_silent_after_ready_hits_the_idle_timeout() -> Result<()> {
    let site = site(18)?;
    let (dest, mut peer) = hostile_source_with(&site, &["--idle-timeout", "1"]).await?;
    peer.hello_ready().await?;
    refused(&site, dest, peer, RETRYABLE, "idle read timed out after 1s").await?;
    Ok(())
}

#[tokio::test]
async fn silent_clients_are_dropped_at_their_phase_timeout_and_a_real_sync_follows() -> Result<()> {
    let site = site(19)?;
    let (dest, addr) = Agent::destination_with(&site, &["--handshake-timeout", "2"])?;
    // One client silent after TCP, one silent after TLS: each is hung up on at its phase's timeout.
    let mut tcp_only = TcpStream::connect(&addr).await?;
    let tcp = TcpStream::connect(&addr).await?;
    let mut tls_only = tls::connector()?.connect(tls::server_name(), tcp).await?;
    let mut sink = Vec::new();
    let hung_up = tokio::time::timeout(LIMIT, tcp_only.read_to_end(&mut sink)).await?;
    ensure!(matches!(hung_up, Ok(0)), "{hung_up:?}");
    // It received the destination's proof, then the end of the connection (without close_notify: an error).
    let _ = tokio::time::timeout(LIMIT, tls_only.read_to_end(&mut sink)).await?;
    ensure!(!site.status.exists(), "a silent client started a sync");

    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 190))?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(src.code == Some(0) && dst.code == Some(0), "{}", dst.stderr);
    for needle in ["tls handshake timed out", "authentication timed out"] {
        ensure!(
            dst.stderr.contains(needle),
            "no {needle:?}:\n{}",
            dst.stderr
        );
    }
    unchanged(&site.target, file_digest(&volume, SIZE)?)
}

#[tokio::test]
async fn source_facing_a_silent_destination_times_out_in_the_tls_handshake() -> Result<()> {
    let site = site(20)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let flags = [
        ("--volume", &*site.target),
        ("--psk", &site.psk_path),
        ("--status", &site.status),
    ];
    let args = ["source", "--connect", &addr, "--handshake-timeout", "1"];
    let source = Agent::spawn(&args, flags)?;
    let (_silent, _) = tokio::time::timeout(LIMIT, listener.accept()).await??;
    let exit = source.exit().await?;
    let needles = ["tls handshake timed out after 1s"];
    failed(&exit, RETRYABLE, &needles, &site.status, Kind::Source)?;
    Ok(())
}
