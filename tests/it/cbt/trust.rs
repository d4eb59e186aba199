//! What the source trusts of the service's connection: its certificate (CA and name), its silence (timeouts),
//! and which flags it needs (usage errors).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::Cbt;
use crate::common::{run_bin, AGENT_TIMEOUT};
use crate::delta::{scattered, scribble, text, BLOCK, MIB};

/// `flags` with the value after `name` replaced by `value`, or `name value` added.
fn with(flags: &[String], name: &str, value: &str) -> Vec<String> {
    let mut f = flags.to_vec();
    match f.iter().position(|x| x == name) {
        Some(i) => f[i + 1] = value.to_owned(),
        None => f.extend([name.to_owned(), value.to_owned()]),
    }
    f
}

/// A certificate signed by another CA, or for another name, is refused (a full comparison that says so); an IP
/// endpoint without `--cbt-server-name` is checked against the certificate's IP address, and deltas.
#[test]
fn the_service_certificate_is_checked() -> Result<()> {
    let size = 4 * MIB;
    let mut c = Cbt::new(size, 51)?;
    let k1 = c.snapshot()?;
    c.sync(&c.flags(k1, None), &[])?;
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let other_ca = c.p.fx.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem())?;
    let mut base = k1;
    for (case, flag, value) in [
        (
            "another CA",
            "--cbt-ca",
            other_ca.to_string_lossy().into_owned(),
        ),
        (
            "another name",
            "--cbt-server-name",
            "other.example".to_owned(),
        ),
    ] {
        scribble(&c.p.fx.volume, &scattered(size, 3, base.into()), 30)?;
        let k = c.snapshot()?;
        let flags = with(&c.flags(k, Some(base)), flag, &value);
        let out = c.sync(&flags, &[])?;
        out.expect_full("the source's change tracker failed");
        let error = text(&out.source, "changeTrackerError").unwrap_or("");
        assert!(
            error.contains("cannot connect to") && error.contains("certificate"),
            "{case}: {error:?}"
        );
        assert_eq!(out.src("bytesRead"), size, "{case}: {}", out.describe());
        base = k;
    }
    let changed = scattered(size, 3, 8);
    scribble(&c.p.fx.volume, &changed, 31)?;
    let k = c.snapshot()?;
    let flags: Vec<String> = c.flags(k, Some(base));
    let i = flags
        .iter()
        .position(|f| f == "--cbt-server-name")
        .expect("flag");
    let flags = [&flags[..i], &flags[i + 2..]].concat();
    assert!(flags.iter().any(|f| f.starts_with("127.0.0.1:")));
    let out = c.sync(&flags, &[])?;
    out.expect_delta("delta-changelist");
    assert_eq!(out.src("bytesRead"), 3 * BLOCK, "{}", out.describe());
    Ok(())
}

/// A service that accepts the connection and never answers costs `--cbt-timeout`, not a hung sync: a full
/// comparison that says it timed out.
#[test]
fn a_silent_service_times_out() -> Result<()> {
    let size = 4 * MIB;
    let mut c = Cbt::new(size, 52)?;
    let k1 = c.snapshot()?;
    c.sync(&c.flags(k1, None), &[])?;
    // The kernel completes the TCP handshakes of a listening socket nobody accepts on: connected, then silence.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    scribble(&c.p.fx.volume, &scattered(size, 3, 1), 40)?;
    let k2 = c.snapshot()?;
    let flags = with(
        &c.flags(k2, Some(k1)),
        "--cbt-endpoint",
        &silent.local_addr()?.to_string(),
    );
    let flags = with(&flags, "--cbt-timeout", "1");
    let started = Instant::now();
    let out = c.sync(&flags, &[])?;
    let took = started.elapsed();
    out.expect_full("the source's change tracker failed");
    let error = text(&out.source, "changeTrackerError").unwrap_or("");
    assert!(error.contains("within 1s"), "{error:?}");
    // One call's timeout (no allocation map is asked after it) and the sync itself.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(silent);
    Ok(())
}

/// The flags a CBT source needs are required together, and exclude `--changed-extents` and `--schedule`: usage
/// errors, exit 2.
#[test]
fn cbt_flags_are_checked_as_usage_errors() -> Result<()> {
    let base = [
        "source",
        "--connect",
        "127.0.0.1:9",
        "--volume",
        "v.img",
        "--psk",
        "k",
    ];
    let full = [
        "--cbt-endpoint",
        "localhost:6443",
        "--cbt-ca",
        "ca.pem",
        "--cbt-token-file",
        "t",
        "--cbt-namespace",
        "ns",
        "--cbt-snapshot",
        "s",
    ];
    let cases: [(&[&str], &str); 6] = [
        (&full[..2], "--cbt-ca"),
        (&["--cbt-snapshot", "s"], "--cbt-endpoint"),
        (&["--cbt-base-snapshot-id", "h"], "--cbt-endpoint"),
        (
            &[&full[..], &["--changed-extents", "c.json"]].concat(),
            "cannot be used with",
        ),
        (&with_endpoint(&full, "localhost"), "not HOST:PORT"),
        // The snapshot names change with every sync: a schedule would sync the same snapshot again and again.
        (
            &[&full[..], &["--schedule", "@hourly"]].concat(),
            "cannot be used with",
        ),
    ];
    for (flags, says) in cases {
        let args = [&base[..], flags].concat();
        let out = run_bin(&args, AGENT_TIMEOUT)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    Ok(())
}

fn with_endpoint<'a>(flags: &[&'a str], endpoint: &'a str) -> Vec<&'a str> {
    let mut f = flags.to_vec();
    f[1] = endpoint;
    f
}
