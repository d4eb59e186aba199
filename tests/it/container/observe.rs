//! From inside the running containers: the destination's `--metrics-listen` (`METRICS_LISTEN`) scraped over the
//! podman network by a third container, and `blockmover status` on the status file.
//!
//! A one-shot mover exits once its sync is done, and its sync counters live as long as the process: a scrape
//! after the sync has nobody to answer. What a scrape can see deterministically is a destination waiting for its
//! source: before the first sync (out of sync, no sync yet), and, with `/tmp` a directory that outlives the
//! container (an emptyDir of the pod, as a status file is kept), a second destination that loaded the first one's
//! `lastSyncTime` (in sync). The status file shows the first sync Successful, read by a short-lived container on
//! the same `/tmp` and by `podman exec` into the waiting second destination.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result};
use blockmover::sample::SampleSpec;

use super::podman::engine;
use super::scenario::{timer, Role, Scenario, Shape, SIZE, UID};

/// The port the destinations serve metrics on.
const METRICS_PORT: u16 = 9100;

/// `GET /metrics` from HOST:9100, from a short-lived container on the scenario's network (bash's /dev/tcp: the
/// image has no curl). The metrics server is up before the destination prints `listening on`, so one try is
/// enough.
fn scrape(s: &Scenario, host: &str) -> Result<String> {
    let script = r#"exec 3<>"/dev/tcp/$1/$2" && printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\n\r\n' "$1" >&3 && cat <&3"#;
    let port = METRICS_PORT.to_string();
    let user = format!("{UID}:{UID}");
    let args = [
        "run",
        "--rm",
        "--network",
        &s.network.name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--user",
        &user,
        &s.engine.image,
        "/bin/bash",
        "-c",
        script,
        "scrape",
        host,
        &port,
    ];
    let response = s.engine.podman(&args)?;
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "scrape of {host}: {response}"
    );
    Ok(response)
}

/// The value of the one sample of `name` whose labels contain `label` (empty: any).
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(label))?;
    line.rsplit(' ').next()?.parse().ok()
}

fn expect_samples(metrics: &str, out_of_sync: f64, successful: f64) {
    let oos = sample(metrics, "volsync_volume_out_of_sync", "");
    assert_eq!(
        oos,
        Some(out_of_sync),
        "volsync_volume_out_of_sync:\n{metrics}"
    );
    let ok = sample(metrics, "blockmover_syncs_total", r#"result="Successful""#);
    assert_eq!(
        ok,
        Some(successful),
        "blockmover_syncs_total Successful:\n{metrics}"
    );
}

#[test]
fn container_metrics_scraped_over_the_network_and_status_read_inside_the_containers() -> Result<()>
{
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("metrics and status from inside");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(SIZE, 0x13_000a),
        Shape::OwnedByPodUser,
    )?;
    let tmp = s.dir.path().join("tmp");
    std::fs::create_dir(&tmp)?;
    std::os::unix::fs::chown(&tmp, Some(UID), Some(UID))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
    let listen = format!("0.0.0.0:{METRICS_PORT}");

    // The first destination, waiting: never synced, so out of sync.
    let name = engine.unique_name("dst");
    let mut server = s
        .pod(Role::Destination, &name)
        .env("METRICS_LISTEN", &listen)
        .tmp(tmp.clone())
        .start()?;
    server.wait_for(&format!("metrics on http://{listen}/metrics"), 1)?;
    server.wait_for("listening on ", 1)?;
    expect_samples(&scrape(&s, &name)?, 1.0, 0.0);
    let client = s
        .source(&name)
        .env("METRICS_LISTEN", &listen)
        .start()?
        .finish()?;
    let server = server.finish()?;
    s.expect_success(&server, &client)?;
    client.expect_line(&format!("metrics on http://{listen}/metrics"));

    // The status file outlived the destination: a short-lived container on the same /tmp reads it.
    let mount = format!("{}:/tmp:ro", tmp.display());
    let user = format!("{UID}:{UID}");
    let status_args = ["blockmover", "status", "/tmp/blockmover-status.json"];
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
    ];
    args.extend(["--user", &user, "-v", &mount, &engine.image]);
    args.extend(status_args);
    let table = engine.podman(&args)?;
    println!("blockmover status (new container):\n{table}");
    assert!(table.contains("Successful"), "{table}");

    // A second destination on the same /tmp loads the first one's lastSyncTime: in sync while it waits. Its sync
    // counters are its own (none yet). `podman exec` into it shows the status file.
    let name = engine.unique_name("dst");
    let mut second = s
        .pod(Role::Destination, &name)
        .env("METRICS_LISTEN", &listen)
        .tmp(tmp.clone())
        .start()?;
    second.wait_for("listening on ", 1)?;
    expect_samples(&scrape(&s, &name)?, 0.0, 0.0);
    let mut args = vec!["exec", name.as_str()];
    args.extend(status_args);
    let table = engine
        .podman(&args)
        .context("podman exec blockmover status")?;
    println!("blockmover status (podman exec):\n{table}");
    assert!(table.contains("Successful"), "{table}");
    drop(second);
    Ok(())
}
