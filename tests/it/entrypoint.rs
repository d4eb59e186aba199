//! The container entrypoints (`container/client.sh`, `container/server.sh`) run with bash outside a container:
//! VolSync's paths and env pointed at a temporary directory, sparse files as the block devices, the real binary.
//!
//! Synchronisation points are the server's `listening on` lines and the client's retry lines; a client started
//! before its server relies on the script's own backoff. Timeouts are safety nets only. VolSync's log filters are
//! checked with plain string logic equivalent to its regexes (the `regex` crate is not a dependency).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmover::sample::{self, SampleSpec};
use serde_json::Value;

/// Safety net for a script run or a line it should print.
const SAFETY_NET: Duration = Duration::from_secs(120);

/// Volume size: four 1 MiB sample regions and a partial fifth.
const VOLUME_SIZE: u64 = (4 << 20) + 12_288;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Tags of recorded output lines: what the script printed on stdout and on stderr.
const OUT: &str = "out| ";
const ERR: &str = "err| ";

/// A temporary directory with a key (`psk.txt`), a sample volume (`volume.img`), an all-zero target of the same
/// size (`target.img`) and an IPv6 "disable" file holding 1 (`ipv6-disable`).
struct Fixture(tempfile::TempDir);

impl Fixture {
    fn new(seed: u64) -> Result<Fixture> {
        let fixture = Fixture(tempfile::tempdir()?);
        keygen(&fixture.path("psk.txt"))?;
        let spec = SampleSpec::mixed(VOLUME_SIZE, seed);
        sample::write_sample_volume(&fixture.path("volume.img"), &spec)?;
        std::fs::File::create(fixture.path("target.img"))?.set_len(VOLUME_SIZE)?;
        std::fs::write(fixture.path("ipv6-disable"), "1\n")?;
        Ok(fixture)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// `bash container/NAME` with VolSync's paths pointed into the fixture (no `/data` there) and nothing from the
    /// caller's environment but PATH.
    fn script(&self, name: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(container_dir().join(name))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BLOCKMOVER_BIN", env!("CARGO_BIN_EXE_blockmover"))
            .env("KEY_FILE", self.path("psk.txt"))
            .env("DATA_DIR", self.path("no-data-dir"))
            .env("TMPDIR", self.0.path());
        command
    }

    /// `server.sh` on `port`, IPv4 only, into the target.
    fn server(&self, port: u16) -> Command {
        let mut command = self.script("server.sh");
        command
            .env("BLOCK_DEVICE", self.path("target.img"))
            .env("STATUS_FILE", self.path("destination-status.json"))
            .env("LISTEN_PORT", port.to_string())
            .env("IPV6_DISABLE_FILE", self.path("ipv6-disable"));
        command
    }

    /// `client.sh` sending the volume to `address`:`port`, retrying at once.
    fn client(&self, address: &str, port: u16) -> Command {
        let mut command = self.script("client.sh");
        command
            .env("BLOCK_DEVICE", self.path("volume.img"))
            .env("STATUS_FILE", self.path("source-status.json"))
            .env("DESTINATION_ADDRESS", address)
            .env("DESTINATION_PORT", port.to_string())
            .env("RETRY_DELAYS", "0 0 0 0 0");
        command
    }

    /// Assert the target holds the volume and both status files say Successful.
    fn expect_synced(&self) -> Result<()> {
        let volume = std::fs::read(self.path("volume.img"))?;
        let target = std::fs::read(self.path("target.img"))?;
        assert!(volume == target, "the target differs from the volume");
        for name in ["source-status.json", "destination-status.json"] {
            let text = std::fs::read_to_string(self.path(name))?;
            let status: Value = serde_json::from_str(&text)?;
            let result = status.pointer("/latestMoverStatus/result");
            assert_eq!(result, Some(&Value::from("Successful")), "{name}: {text}");
        }
        Ok(())
    }
}

/// The scripts, the Containerfile and the examples.
fn container_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("container")
}

/// `blockmover keygen --out OUT`.
fn keygen(out: &Path) -> Result<()> {
    let mut keygen = Command::new(env!("CARGO_BIN_EXE_blockmover"));
    keygen
        .args(["keygen", "--out"])
        .arg(out)
        .stderr(Stdio::null());
    let status = keygen.status()?;
    if !status.success() {
        bail!("keygen failed: {status}");
    }
    Ok(())
}

/// A port nobody listens on right now (bound, read, released), free on `ip`.
fn free_port(ip: IpAddr) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// A running script in its own process group; its output lines, tagged OUT or ERR, in arrival order.
struct Running {
    what: &'static str,
    child: Child,
    lines: Receiver<String>,
    output: String,
}

/// How a script ended: its exit code (None if a signal killed it) and all it printed, tagged.
struct Ran {
    what: &'static str,
    code: Option<i32>,
    output: String,
}

impl Running {
    fn spawn(what: &'static str, command: &mut Command) -> Result<Running> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().context("stdout")?, OUT, tx.clone());
        forward(child.stderr.take().context("stderr")?, ERR, tx);
        let output = String::new();
        Ok(Running {
            what,
            child,
            lines,
            output,
        })
    }

    /// The next line, recorded; None once the script and everything it started closed their output.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<String>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.output.push_str(&line);
                self.output.push('\n');
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => bail!("{} hangs:\n{}", self.what, self.output),
        }
    }

    /// Wait for the `nth` line (1-based, counting from the start) printed on `stream` (OUT or ERR) containing
    /// `needle`; returns it untagged.
    fn wait_for(&mut self, stream: &str, needle: &str, nth: usize) -> Result<String> {
        let wanted = |l: &str| l.starts_with(stream) && l.contains(needle);
        let mut seen = self.output.lines().filter(|l| wanted(l)).count();
        let deadline = Instant::now() + SAFETY_NET;
        while let Some(line) = self.next_line(deadline)? {
            seen += usize::from(wanted(&line));
            if seen == nth {
                return Ok(line[stream.len()..].to_owned());
            }
        }
        bail!("{} ended without {needle:?}:\n{}", self.what, self.output)
    }

    /// Wait until the script and everything it started closed their output (nothing is left behind), then for its
    /// exit.
    fn finish(mut self) -> Result<Ran> {
        let deadline = Instant::now() + SAFETY_NET;
        while self.next_line(deadline)?.is_some() {}
        let status = self.child.wait()?;
        let output = std::mem::take(&mut self.output);
        println!("--- {} ({status}):\n{output}", self.what);
        Ok(Ran {
            what: self.what,
            code: status.code(),
            output,
        })
    }

    /// Send SIGTERM to the script itself (as the kubelet does to a container's PID 1).
    fn terminate(&self) -> Result<()> {
        signal(&format!("-TERM {}", self.child.id()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = signal(&format!("-KILL -- -{}", self.child.id()));
            let _ = self.child.wait();
        }
    }
}

/// bash's `kill` builtin with ARGS.
fn signal(args: &str) -> Result<()> {
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("kill {args}"))
        .status()?;
    if !status.success() {
        bail!("kill {args}: {status}");
    }
    Ok(())
}

fn forward(pipe: impl Read + Send + 'static, tag: &'static str, tx: Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(format!("{tag}{line}")).is_err() {
                break;
            }
        }
    });
}

impl Ran {
    /// The lines as the script printed them (without the stream tags).
    fn lines(&self) -> impl Iterator<Item = &str> {
        self.output
            .lines()
            .map(|l| l.get(OUT.len()..).unwrap_or(""))
    }

    /// Assert `ok`, showing `about` and the script's output otherwise.
    fn check(&self, ok: bool, about: &str) {
        assert!(ok, "{}: {about}:\n{}", self.what, self.output);
    }

    fn expect_code(&self, code: i32) {
        self.check(self.code == Some(code), &format!("exit code is not {code}"));
    }

    fn expect_line(&self, needle: &str) -> &str {
        let line = self.lines().find(|l| l.contains(needle));
        line.unwrap_or_else(|| panic!("{}: no line {needle:?}:\n{}", self.what, self.output))
    }

    /// What VolSync would show as latestMoverStatus.logs: the lines its filter keeps, the last 1024 bytes.
    fn volsync_logs(&self, failed: bool) -> String {
        volsync_logs(self.lines(), failed)
    }
}

/// `[xX]yz` at byte `at`: the first letter in either case, the rest as written.
fn word_at(line: &str, at: usize, word: &str) -> bool {
    let (first, rest) = word.split_at(1);
    line.get(at..at + 1)
        .is_some_and(|c| c.eq_ignore_ascii_case(first))
        && line.get(at + 1..).is_some_and(|t| t.starts_with(rest))
}

fn contains_word(line: &str, word: &str) -> bool {
    (0..line.len()).any(|at| word_at(line, at, word))
}

/// Whether `line` matches the unanchored regex `W1\s.+W2\s.+ ... Wn` (each word `[xX]yz`). Taking the leftmost
/// occurrence of each word is enough: a later word only needs to start past a minimum offset.
pub(crate) fn chain_matches(line: &str, words: &[&str]) -> bool {
    let mut from = 0;
    for (i, word) in words.iter().enumerate() {
        let last = i + 1 == words.len();
        let after = |at: usize| line[at + word.len()..].chars().next();
        let found = (from..line.len()).find(|&at| {
            word_at(line, at, word) && (last || after(at).is_some_and(char::is_whitespace))
        });
        let Some(at) = found else { return false };
        // The whitespace, then `.+`: at least one more character.
        from = at + word.len() + after(at).map_or(0, char::len_utf8) + 1;
    }
    true
}

/// VolSync's success filter: `([sS]ent)\s.+([bB]ytes)\s.+([rR]eceived)\s.+([bB]ytes)|([tT]otal size)|([rR]sync completed in)`.
/// What VolSync would show as `latestMoverStatus.logs` of a mover that printed `lines`: the lines its filter keeps
/// (on failure also the failure filter's), the last 1024 bytes.
pub(crate) fn volsync_logs<'a>(lines: impl Iterator<Item = &'a str>, failed: bool) -> String {
    let kept: Vec<&str> = lines
        .filter(|l| success_filter(l) || (failed && failure_filter(l)))
        .collect();
    let all = kept.join("\n");
    let mut start = all.len().saturating_sub(1024);
    while !all.is_char_boundary(start) {
        start += 1;
    }
    all[start..].to_owned()
}

pub(crate) fn success_filter(line: &str) -> bool {
    chain_matches(line, &["sent", "bytes", "received", "bytes"])
        || contains_word(line, "total size")
        || contains_word(line, "rsync completed in")
}

/// VolSync's failure filter: `^\s*([rR]sync)|^\s*(disk[rR]sync)|([fF]ail)|([eE]rror)`.
pub(crate) fn failure_filter(line: &str) -> bool {
    let start = line.trim_start();
    word_at(start, 0, "rsync")
        || start.starts_with("diskrsync")
        || start.starts_with("diskRsync")
        || contains_word(line, "fail")
        || contains_word(line, "error")
}

#[test]
fn key_secret_mounted_group_readable_under_fs_group_still_syncs() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // As the kubelet lays out a Secret volume under a pod fsGroup: `psk.txt` a symlink into `..data/`, the file
    // mode 0600 from VolSync's DefaultMode plus group read. The binary alone refuses such a key; the entrypoints
    // hand it a private copy.
    let fixture = Fixture::new(47)?;
    let data = fixture.path("keys/..data");
    std::fs::create_dir_all(&data)?;
    std::fs::copy(fixture.path("psk.txt"), data.join("psk.txt"))?;
    std::fs::set_permissions(data.join("psk.txt"), std::fs::Permissions::from_mode(0o640))?;
    std::os::unix::fs::symlink("..data/psk.txt", fixture.path("keys/psk.txt"))?;
    let key = fixture.path("keys/psk.txt");
    let port = free_port(LOCALHOST)?;
    let (server, _) = start_server(fixture.server(port).env("KEY_FILE", &key))?;
    let mut client = fixture.client("127.0.0.1", port);
    let client = run("client.sh", client.env("KEY_FILE", &key))?;
    expect_success(&fixture, server.finish()?, client)?;
    let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the mounted key is left as it is");
    Ok(())
}

/// Start `server.sh` and wait for its `listening on` line.
fn start_server(command: &mut Command) -> Result<(Running, String)> {
    let mut server = Running::spawn("server.sh", command)?;
    let line = server.wait_for(OUT, "listening on ", 1)?;
    Ok((server, line))
}

fn run(what: &'static str, command: &mut Command) -> Result<Ran> {
    Running::spawn(what, command)?.finish()
}

/// Both entrypoints end 0 with the summary lines VolSync keeps.
fn expect_success(fixture: &Fixture, server: Ran, client: Ran) -> Result<()> {
    client.expect_code(0);
    server.expect_code(0);
    fixture.expect_synced()?;
    for ran in [&client, &server] {
        let logs = ran.volsync_logs(false);
        let sent = ["sent", "bytes", "received", "bytes"];
        let kept = logs.lines().any(|l| chain_matches(l, &sent))
            && logs.contains("total size is")
            && logs.contains("blockmover: rsync completed in ");
        ran.check(kept, &format!("VolSync would keep only {logs:?}"));
    }
    Ok(())
}

#[test]
fn full_sync_through_both_entrypoints_exits_0_and_copies_the_volume() -> Result<()> {
    let fixture = Fixture::new(41)?;
    let port = free_port(LOCALHOST)?;
    let (server, listening) = start_server(&mut fixture.server(port))?;
    assert_eq!(listening, format!("listening on 0.0.0.0:{port}"));
    let client = run("client.sh", &mut fixture.client("127.0.0.1", port))?;
    expect_success(&fixture, server.finish()?, client)
}

/// The source names itself after its mover pod's Job (the pod name without VolSync's random suffix), which is
/// what the destination uses to tell a retry of the same source from another source.
#[test]
fn client_names_itself_after_the_mover_job() -> Result<()> {
    let fixture = Fixture::new(47)?;
    let port = free_port(LOCALHOST)?;
    let (server, _) = start_server(&mut fixture.server(port))?;
    let mut client = fixture.client("127.0.0.1", port);
    let client = run(
        "client.sh",
        client.env("HOSTNAME", "volsync-rsync-tls-src-vm-disk-x7k2p"),
    )?;
    let server = server.finish()?;
    let named = server.lines().any(|l| {
        l.contains("source=default/volsync-rsync-tls-src-vm-disk") && !l.contains("x7k2p")
    });
    server.check(named, "the destination logs the source by its Job name");
    expect_success(&fixture, server, client)
}

#[test]
fn client_without_destination_address_exits_1_with_a_clear_error() -> Result<()> {
    let fixture = Fixture::new(42)?;
    let mut command = fixture.client("", 8000);
    let client = run("client.sh", command.env_remove("DESTINATION_ADDRESS"))?;
    client.expect_code(1);
    let line = client.expect_line("DESTINATION_ADDRESS is not set");
    assert!(failure_filter(line), "{line}");
    Ok(())
}

#[test]
fn wrong_key_stops_the_client_after_one_try_with_exit_1_and_the_server_keeps_waiting() -> Result<()>
{
    let fixture = Fixture::new(43)?;
    let other_key = fixture.path("other-psk.txt");
    keygen(&other_key)?;
    let port = free_port(LOCALHOST)?;
    let (server, _) = start_server(&mut fixture.server(port))?;
    let client = run(
        "client.sh",
        fixture.client("127.0.0.1", port).env("KEY_FILE", other_key),
    )?;
    client.expect_code(1);
    let tries = client.lines().filter(|l| l.starts_with("error: ")).count();
    client.check(tries == 1, "the binary ran more than once");
    client.check(!client.output.contains("retrying in"), "it retried");
    client.expect_line("failed permanently on try 1/5 (exit 1)");
    let reason = |ran: &Ran| ran.volsync_logs(true).contains("keys do not match");
    client.check(reason(&client), "VolSync would not show the reason");
    // A connection that never proved the key does not end the destination (issue 10, finding 4): the server still
    // waits, and the client with the right key then syncs.
    let client = run("client.sh", &mut fixture.client("127.0.0.1", port))?;
    expect_success(&fixture, server.finish()?, client)
}

#[test]
fn client_started_before_the_server_retries_until_it_listens() -> Result<()> {
    let fixture = Fixture::new(44)?;
    let port = free_port(LOCALHOST)?;
    let mut command = fixture.client("127.0.0.1", port);
    let mut client = Running::spawn("client.sh", command.env("RETRY_DELAYS", "1 2 4 8 16"))?;
    let retry = client.wait_for(ERR, "failed (retryable), retrying in ", 1)?;
    assert!(retry.contains("try 1/5"), "{retry}");
    let (server, _) = start_server(&mut fixture.server(port))?;
    let client = client.finish()?;
    client.expect_line("rsync completed in");
    expect_success(&fixture, server.finish()?, client)
}

#[test]
fn server_listens_again_after_a_source_vanishes_mid_sync() -> Result<()> {
    let fixture = Fixture::new(45)?;
    let port = free_port(LOCALHOST)?;
    let (server, _) = start_server(&mut fixture.server(port))?;
    // The first connection is cut 64 KiB into the sync (past the handshake, hello and digests): a retryable
    // failure on both sides. The source's retry goes through untouched once the server listens again.
    let relay = relay(SocketAddr::from((LOCALHOST, port)), 64 << 10)?;
    let mut command = fixture.client("127.0.0.1", relay);
    let client = run("client.sh", command.env("RETRY_DELAYS", "1 2 4 8 16"))?;
    let server = server.finish()?;
    client.expect_line("try 1/5 failed (retryable)");
    server.expect_line("session 1 failed (retryable), listening again");
    server.expect_line("session 2)");
    expect_success(&fixture, server, client)
}

/// A TCP relay from 127.0.0.1:PORT (returned) to `target`. Its first connection carries `cut_after` bytes
/// upstream and is then closed both ways, like a source that vanished; later ones are relayed untouched.
fn relay(target: SocketAddr, cut_after: u64) -> Result<u16> {
    let listener = TcpListener::bind((LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let (Ok(client), Ok(server)) = (client, TcpStream::connect(target)) else {
                continue;
            };
            let (Ok(up_from), Ok(up_to)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let limit = if n == 0 { cut_after } else { u64::MAX };
            thread::spawn(move || pump(up_from, up_to, limit));
            thread::spawn(move || pump(server, client, u64::MAX));
        }
    });
    Ok(port)
}

/// Copy `from` to `to`, at most `limit` bytes: pass an end of stream on, close both sockets when cut short.
fn pump(mut from: TcpStream, mut to: TcpStream, limit: u64) {
    let mut buf = [0u8; 16 << 10];
    let mut left = limit;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match from.read(&mut buf[..want]) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) if to.write_all(&buf[..n]).is_ok() => left -= n as u64,
            _ => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn filesystem_pvc_without_block_device_fails_clearly() -> Result<()> {
    let fixture = Fixture::new(46)?;
    let data = fixture.path("data");
    std::fs::create_dir(&data)?;
    let missing = fixture.path("no-block-device");
    let mut server = fixture.server(free_port(LOCALHOST)?);
    let mut client = fixture.client("127.0.0.1", 8000);
    for (what, command) in [("server.sh", &mut server), ("client.sh", &mut client)] {
        let ran = run(
            what,
            command.env("DATA_DIR", &data).env("BLOCK_DEVICE", &missing),
        )?;
        ran.expect_code(1);
        let line = ran.expect_line("filesystem PVCs are not supported by this mover");
        assert!(failure_filter(line), "{line}");
        let kept = ran.volsync_logs(true).contains("not supported");
        ran.check(kept, "VolSync would not show the reason");
    }
    Ok(())
}

#[test]
fn dual_stack_listener_when_ipv6_is_enabled() -> Result<()> {
    if let Err(e) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        println!("skipped: IPv6 is unavailable here ({e})");
        return Ok(());
    }
    let fixture = Fixture::new(47)?;
    let enabled = fixture.path("ipv6-enabled");
    std::fs::write(&enabled, "0\n")?;
    let port = free_port(IpAddr::V6(Ipv6Addr::UNSPECIFIED))?;
    let mut addresses = vec!["::1"];
    match std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only") {
        Ok(v) if v.trim() == "0" => addresses.push("127.0.0.1"),
        other => println!("IPv4 through [::] not checked: bindv6only is {other:?}"),
    }
    for address in addresses {
        let mut command = fixture.server(port);
        let (server, listening) = start_server(command.env("IPV6_DISABLE_FILE", &enabled))?;
        assert_eq!(listening, format!("listening on [::]:{port}"));
        let client = run("client.sh", &mut fixture.client(address, port))?;
        let host = match address.contains(':') {
            true => format!("[{address}]"),
            false => address.to_owned(),
        };
        client.expect_line(&format!("to {host}:{port}"));
        expect_success(&fixture, server.finish()?, client)?;
    }
    Ok(())
}

#[test]
fn retryable_failures_end_in_exit_1_after_the_last_try() -> Result<()> {
    let fixture = Fixture::new(48)?;
    // Nobody listens: every try fails with the binary's retryable exit 75.
    let port = free_port(LOCALHOST)?;
    let mut command = fixture.client("127.0.0.1", port);
    let client = run("client.sh", command.env("RETRY_DELAYS", "0 0 0"))?;
    client.expect_code(1);
    let tries = client.lines().filter(|l| l.starts_with("error: ")).count();
    client.check(tries == 3, "the binary did not run 3 times");
    client.expect_line("try 2/3 failed (retryable), retrying in 0s");
    let last = client.lines().last().unwrap_or("");
    let clear = last.contains("failed after 3 tries") && failure_filter(last);
    client.check(clear, "the last line does not give the reason");
    Ok(())
}

#[test]
fn debug_mover_traces_the_script_and_sets_debug_logging() -> Result<()> {
    let fixture = Fixture::new(49)?;
    let port = free_port(LOCALHOST)?;
    let mut command = fixture.client("127.0.0.1", port);
    command.env("DEBUG_MOVER", "1").env("RETRY_DELAYS", "0");
    let client = run("client.sh", &mut command)?;
    client.expect_code(1);
    client.expect_line("+ export BLOCKMOVER_LOG=debug");
    client.expect_line("+ run_mover source --connect 127.0.0.1:");
    Ok(())
}

#[test]
fn sigterm_to_the_server_reaches_the_binary_and_exits_1() -> Result<()> {
    let fixture = Fixture::new(50)?;
    let (server, _) = start_server(&mut fixture.server(free_port(LOCALHOST)?))?;
    server.terminate()?;
    let server = server.finish()?;
    // The binary's own `error: interrupted by SIGTERM` is not asserted: a signal that lands between its
    // `listening on` line and its signal handlers kills it outright. Either way the script ended only after it.
    server.expect_code(1);
    let line = server.expect_line("blockmover: error: interrupted by SIGTERM");
    assert!(failure_filter(line), "{line}");
    Ok(())
}

#[test]
fn volsync_filters_match_like_the_regexes() {
    // (line, kept by the success filter, kept by the failure filter)
    let cases = [
        ("sent 10 bytes  received 2 bytes  3 bytes/sec", true, false),
        ("INFO s: sent 1 bytes  received 3 bytes/s", true, false),
        ("Sent x Bytes y Received z Bytes", true, false),
        ("total size is 4194304  speedup is 1.39", true, false),
        ("blockmover: rsync completed in 0.14s (source)", true, false),
        ("sent 10 bytes", false, false),
        ("sent bytes received bytes", false, false),
        ("sent  bytes  received bytes", false, false),
        ("SENT 1 bytes 2 received 3 bytes", false, false),
        ("sync completed in 0.05s", false, false),
        ("Total Size is 1", false, false),
        ("listening on [::]:8000", false, false),
        ("error: x", false, true),
        ("  rsync: x", false, true),
        ("diskRsync x", false, true),
        ("ERROR x Failed", false, true),
        ("ERROR x", false, false),
        ("x rsync FAIL", false, false),
    ];
    for (line, success, failure) in cases {
        let filters = (success_filter(line), failure_filter(line));
        assert_eq!(filters, (success, failure), "{line:?}");
    }
}

/// Whether `doc` holds everything in `pattern`: objects key by key, arrays of objects element by element (each
/// pattern element in some element of `doc`), anything else equal.
fn holds(doc: &Value, pattern: &Value) -> bool {
    match (doc, pattern) {
        (Value::Object(d), Value::Object(p)) => {
            p.iter().all(|(k, v)| d.get(k).is_some_and(|d| holds(d, v)))
        }
        (Value::Array(d), Value::Array(p)) if p.iter().any(Value::is_object) => {
            p.iter().all(|p| d.iter().any(|d| holds(d, p)))
        }
        _ => doc == pattern,
    }
}

#[test]
fn example_manifests_follow_the_mover_contract() -> Result<()> {
    use serde::Deserialize;
    use serde_json::json;
    let dir = container_dir().join("examples");
    for (name, script) in [
        ("destination.yaml", "server.sh"),
        ("source.yaml", "client.sh"),
    ] {
        let text = std::fs::read_to_string(dir.join(name))?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?);
        }
        let mut container = json!({
            "command": ["/bin/bash", "-c", format!("/mover-rsync-tls/{script}")],
            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeDevices": [{"name": "data", "devicePath": "/dev/block"}],
            "volumeMounts": [{"name": "keys", "mountPath": "/keys"}, {"name": "tmp", "mountPath": "/tmp"}],
        });
        if script == "client.sh" {
            container["env"] = json!([{"name": "DESTINATION_ADDRESS"}]);
        }
        let job = json!({"kind": "Job", "spec": {"template": {"spec": {
            "securityContext": {"runAsNonRoot": true},
            "containers": [container],
            "volumes": [{"name": "keys", "secret": {"defaultMode": 0o600}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory"}}],
        }}}});
        let pod = docs.iter().find(|d| holds(d, &job));
        let pod = pod.with_context(|| format!("{name}: no Job like {job:#}"))?;
        if script == "server.sh" {
            let service = json!({"kind": "Service", "spec": {"ports": [{"name": "rsync-tls", "port": 8000}]}});
            let service = docs
                .iter()
                .find(|d| holds(d, &service))
                .context("no Service")?;
            let labels = &pod["spec"]["template"]["metadata"]["labels"];
            let selector = &service["spec"]["selector"];
            assert!(
                holds(labels, selector),
                "{selector} does not select {labels}"
            );
        }
    }
    Ok(())
}

#[test]
fn containerfile_installs_the_entrypoints_where_volsync_runs_them() -> Result<()> {
    let dir = container_dir();
    let text = std::fs::read_to_string(dir.join("Containerfile"))?;
    assert!(text.contains("cargo build --release --locked"), "{text}");
    assert!(text.contains("/out/mover-rsync-tls/"), "{text}");
    for script in ["client.sh", "server.sh", "common.sh"] {
        let copied = text.contains(&format!("container/{script}")) && dir.join(script).is_file();
        assert!(copied, "{script} is not copied into the image");
    }
    let user = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back();
    let user = user.unwrap_or("");
    let numeric = user
        .split(':')
        .all(|id| id.parse::<u32>().is_ok_and(|n| n > 0));
    assert!(
        numeric,
        "the image must end with a numeric non-root USER, not {user:?}"
    );
    Ok(())
}
