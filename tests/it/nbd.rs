//! NBD sources (issue 12, item 2): `source --volume nbd+unix:///EXPORT?socket=PATH` reads a qcow2 image through the
//! real `qemu-nbd` (read-only, `-r`), with its persistent dirty bitmap exported as `qemu:dirty-bitmap:NAME`
//! (`-B NAME`). Images are made with `qemu-img create -f qcow2` and written with `qemu-io` while the export is
//! stopped; the expected contents are `qemu-img convert -O raw` of the image. Every test skips, printing why,
//! when `qemu-nbd`, `qemu-img` or `qemu-io` is absent.
//!
//! - [`sync`]: a first sync over NBD skips the unallocated ranges (base:allocation); a delta from the bitmap
//!   reads only the dirty chunks; an absent bitmap falls back to a full comparison.
//! - [`failures`]: the export killed (`kill -9`) or frozen (`SIGSTOP`) during a sync: exit 75, status Failed.
//! - [`bitmaps`]: what a disabled bitmap looks like over NBD (the finding in the README's "Source kinds").
//! - [`depth`]: `--read-depth` keeps that many reads in flight, against nbdkit's delay filter (skips without
//!   `nbdkit`).

mod bitmaps;
mod depth;
mod failures;
mod sync;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::common::{bin, keygen, sparse_file, wait_until};

/// The export name every test serves.
pub const EXPORT: &str = "disk";
pub const MIB: u64 = 1 << 20;
pub const CHUNK: u64 = 65536;

/// Whether the qemu tools are here; prints why not (the caller then returns: a skip).
pub fn qemu_tools() -> bool {
    tools_present(&["qemu-nbd", "qemu-img", "qemu-io"], "qemu-utils")
}

/// Whether every one of `tools` answers `--version`; prints which is missing and the Debian `package` to install
/// (the caller then returns: a skip).
pub fn tools_present(tools: &[&str], package: &str) -> bool {
    for tool in tools {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("skipped: {tool} is not installed (apt-get install {package})");
            return false;
        }
    }
    true
}

/// Runs a qemu tool; fails with its stderr unless it succeeds.
pub fn qemu(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("run {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A qcow2 image with a persistent bitmap `b0`, a target, key, statuses and state directories, and (while
/// served) a `qemu-nbd -r -t` exporting it on a Unix socket.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub qcow2: PathBuf,
    pub socket: PathBuf,
    pub psk: PathBuf,
    pub target: PathBuf,
    pub source_status: PathBuf,
    pub destination_status: PathBuf,
    pub sa: String,
    pub sb: String,
    pub size: u64,
    server: Option<Child>,
    /// Served on TCP 127.0.0.1:PORT instead of the Unix socket.
    tcp: Option<u16>,
}

impl Image {
    /// An empty (unallocated) image of `size` bytes with the enabled persistent bitmap `b0`, and a zero target.
    pub fn new(size: u64) -> Result<Image> {
        let dir = tempfile::tempdir()?;
        let p = |n: &str| dir.path().join(n);
        let qcow2 = p("disk.qcow2");
        let s = qcow2.to_string_lossy().into_owned();
        qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &s, &size.to_string()],
        )?;
        qemu("qemu-img", &["bitmap", "--add", "--enable", &s, "b0"])?;
        sparse_file(&p("target.img"), size)?;
        Ok(Image {
            psk: keygen(dir.path())?,
            socket: p("nbd.sock"),
            target: p("target.img"),
            source_status: p("source-status.json"),
            destination_status: p("destination-status.json"),
            sa: p("state-source").to_string_lossy().into_owned(),
            sb: p("state-destination").to_string_lossy().into_owned(),
            qcow2,
            size,
            server: None,
            tcp: None,
            dir,
        })
    }

    fn image(&self) -> String {
        self.qcow2.to_string_lossy().into_owned()
    }

    /// `qemu-io -c 'write -P PATTERN OFFSET LEN'` for each write (the export must be stopped).
    pub fn write(&self, writes: &[(u8, u64, u64)]) -> Result<()> {
        let cmds: Vec<String> = writes
            .iter()
            .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
            .collect();
        let mut args = vec!["-f", "qcow2"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        let image = self.image();
        args.push(&image);
        qemu("qemu-io", &args).map(|_| ())
    }

    /// `qemu-img bitmap ARGS... IMAGE NAME` (the export must be stopped).
    pub fn bitmap(&self, op: &str, name: &str) -> Result<()> {
        qemu("qemu-img", &["bitmap", op, &self.image(), name]).map(|_| ())
    }

    /// Starts `qemu-nbd -r -t -k SOCKET -x disk --format qcow2 [-B BITMAP] IMAGE` and waits for its socket.
    pub fn serve(&mut self, bitmap: Option<&str>) -> Result<()> {
        ensure!(self.server.is_none(), "already served");
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-t", "--format", "qcow2", "-x", EXPORT]);
        match self.tcp {
            Some(port) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
            None => cmd.arg("-k").arg(&self.socket),
        };
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        let child = cmd
            .arg(&self.qcow2)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn qemu-nbd")?;
        self.server = Some(child);
        let (socket, tcp) = (self.socket.clone(), self.tcp);
        wait_until("qemu-nbd listening", Duration::from_secs(20), || {
            Ok(match tcp {
                // A probe connection: -t serves the next client after it.
                Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                None => socket.exists(),
            })
        })
    }

    /// From now on, serve on TCP at a free loopback port (`nbd://127.0.0.1:PORT/disk`).
    pub fn use_tcp(&mut self) -> Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        self.tcp = Some(port);
        Ok(())
    }

    /// The pid of the running qemu-nbd.
    pub fn server_pid(&self) -> Result<u32> {
        self.server.as_ref().map(Child::id).context("not served")
    }

    /// Stops the export (SIGKILL after SIGCONT, in case a test froze it) and reaps it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.server.take() {
            let _ = crate::common::signal("CONT", child.id());
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// `nbd+unix:///disk?socket=PATH`, or `nbd://127.0.0.1:PORT/disk` on TCP.
    pub fn uri(&self) -> String {
        if let Some(port) = self.tcp {
            return format!("nbd://127.0.0.1:{port}/{EXPORT}");
        }
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    /// BLAKE3 of the image's guest data (`qemu-img convert -O raw`, sharing the image with a running export).
    pub fn guest_digest(&self) -> Result<blake3::Hash> {
        let raw = self.dir.path().join("expected.raw");
        qemu(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &self.image(),
                &raw.to_string_lossy(),
            ],
        )?;
        let d = blockmover::sample::file_digest(&raw, self.size)?;
        std::fs::remove_file(&raw)?;
        Ok(d)
    }

    /// Asserts the target's first `size` bytes are the image's guest data.
    pub fn expect_target_matches_image(&self) -> Result<()> {
        let target = blockmover::sample::file_digest(&self.target, self.size)?;
        ensure!(
            target == self.guest_digest()?,
            "the target differs from the image's guest data"
        );
        Ok(())
    }

    /// A sync of the export with both state directories and `source` extra flags; both agents must succeed and
    /// the target must equal the image.
    pub fn sync(&self, source: &[&str]) -> Result<crate::delta::Outcome> {
        let uri = self.uri();
        let mut s = vec!["--state-dir", self.sa.as_str()];
        s.extend_from_slice(source);
        let d = ["--state-dir", self.sb.as_str()];
        let outcome = crate::delta::sync_files(
            &self.psk,
            crate::delta::End {
                path: Path::new(&uri),
                status: &self.source_status,
                flags: &s,
            },
            crate::delta::End {
                path: &self.target,
                status: &self.destination_status,
                flags: &d,
            },
        )?;
        self.expect_target_matches_image()?;
        Ok(outcome)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Bytes the source read from the export, from its `nbd export ...: N bytes read in M reads` line.
pub fn nbd_bytes_read(log: &str) -> Result<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("bytes read in") && l.contains("nbd export"))
        .context("no `nbd export ...: N bytes read` line in the source's log")?;
    let before = line.split(" bytes read in").next().unwrap_or("");
    let n = before.rsplit(' ').next().unwrap_or("");
    n.parse().with_context(|| format!("bad count in {line:?}"))
}

/// A source process whose stderr lines are passed on as they come (and kept).
pub struct Watched {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    pub log: String,
}

impl Watched {
    /// `blockmover source --connect ADDR --volume URI --psk P --status S EXTRA...`.
    pub fn source(
        addr: std::net::SocketAddr,
        uri: &str,
        image: &Image,
        extra: &[&str],
    ) -> Result<Watched> {
        let mut child = Command::new(bin())
            .args([
                "source",
                "--connect",
                &addr.to_string(),
                "--volume",
                uri,
                "--psk",
            ])
            .arg(&image.psk)
            .arg("--status")
            .arg(&image.source_status)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Watched {
            child,
            lines,
            reader: Some(reader),
            log: String::new(),
        })
    }

    /// Waits (safety net `limit`) for a stderr line containing `text`.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if hit {
                        return Ok(());
                    }
                }
                Err(_) => bail!("no line with {text:?} within {limit:?}; log:\n{}", self.log),
            }
        }
    }

    /// Waits for the exit (safety net `limit`, then killed); returns the exit code and the whole log.
    pub fn finish(mut self, limit: Duration) -> Result<(Option<i32>, Duration, String)> {
        let start = std::time::Instant::now();
        let status = crate::common::wait_with_timeout(&mut self.child, limit)?;
        let waited = start.elapsed();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        while let Ok(line) = self.lines.try_recv() {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        Ok((status.code(), waited, std::mem::take(&mut self.log)))
    }
}
