//! The rsync comparisons: Debian's rsync against an rsync daemon on loopback (`--inplace --no-whole-file -z`), and
//! VolSync's rsync-tls mover (`-aAhHSxz` through stunnel with the PSK), on the same volume and change.
//!
//! Fairness: blockmover reports a sync only after fsyncing its target, so each rsync sync here is timed until its
//! client exits *and* an fsync of the target file returns. Daemons and tunnels are started before the clock,
//! as blockmover's destination is. Bytes are rsync's own `sent`/`received` counts (rsync protocol bytes, before
//! TLS for the tunnelled flavour).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::agents::SYNC_LIMIT;
use super::procs::{self, ChildGuard, Probe};
use super::wait;

/// Which rsync setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavour {
    /// Plain rsync daemon on loopback: `rsync --inplace --no-whole-file -z`.
    Rsync,
    /// VolSync's rsync-tls flags (`-aAhHSxz`) through stunnel with the PSK, TLS 1.3.
    VolsyncRsyncTls,
}

impl Flavour {
    /// The name printed in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Rsync => "rsync",
            Flavour::VolsyncRsyncTls => "volsync-rsync-tls",
        }
    }

    /// The client's flags.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Flavour::Rsync => &["--inplace", "--no-whole-file", "-z", "--stats"],
            // VolSync's client.sh flags; `--no-h` only makes the byte counts exact in the summary line.
            Flavour::VolsyncRsyncTls => &[
                "-aAhHSxz",
                "--itemize-changes",
                "--info=stats2,misc2",
                "--no-h",
            ],
        }
    }
}

/// What one rsync sync measured.
#[derive(Debug, Clone)]
pub struct RsyncSync {
    /// Client run plus the fsync of the target file.
    pub duration: Duration,
    /// `sent N bytes` (client to daemon).
    pub sent: u64,
    /// `received N bytes` (daemon to client).
    pub received: u64,
    /// Peak RSS of the rsync client (the sender).
    pub rss_client: Option<u64>,
    /// Summed peak RSS of the rsync processes serving the connection (generator and receiver).
    pub rss_server: Option<u64>,
    /// CPU time of the client, seconds.
    pub cpu_client: Option<f64>,
    /// CPU time of the serving processes, seconds.
    pub cpu_server: Option<f64>,
}

/// A running rsync daemon (and tunnels) ready to take syncs into `module_dir`.
pub struct RsyncSetup {
    flavour: Flavour,
    rsync: PathBuf,
    dir: PathBuf,
    module_dir: PathBuf,
    port: u16,
    /// The rsync daemon (plain) or the server stunnel that execs rsync per connection (TLS).
    server: ChildGuard,
    /// The client stunnel (TLS only); held so that it is killed with the setup.
    _client_tunnel: Option<ChildGuard>,
    runs: u32,
}

/// The programs a flavour needs, or why it must be skipped.
pub fn programs(flavour: Flavour) -> Result<(PathBuf, Option<PathBuf>), String> {
    let rsync = procs::which("rsync").ok_or("rsync is not on PATH (apt-get install -y rsync)")?;
    match flavour {
        Flavour::Rsync => Ok((rsync, None)),
        Flavour::VolsyncRsyncTls => {
            let stunnel = procs::which("stunnel")
                .or_else(|| procs::which("stunnel4"))
                .ok_or("stunnel is not on PATH (apt-get install -y stunnel4)")?;
            Ok((rsync, Some(stunnel)))
        }
    }
}

/// `uid = ...` and `gid = ...` lines so that the daemon writes as the user running the bench (root's daemon would
/// otherwise switch to `nobody`).
fn ids() -> anyhow::Result<String> {
    let me = std::fs::metadata("/proc/self").context("cannot stat /proc/self")?;
    Ok(format!("uid = {}\ngid = {}\n", me.uid(), me.gid()))
}

impl RsyncSetup {
    /// Starts the daemon (and tunnels) in `dir` for `flavour`; `psk` is the VolSync-format key file.
    pub fn start(
        flavour: Flavour,
        rsync: &Path,
        stunnel: Option<&Path>,
        psk: &Path,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let name = flavour.name();
        let dir = dir.join(name);
        let module_dir = dir.join("module");
        std::fs::create_dir_all(&module_dir)
            .with_context(|| format!("cannot create {}", module_dir.display()))?;
        let conf = dir.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = false\nnumeric ids = true\nread only = false\nreverse lookup = false\n\
                 log file = {}\n{}\n[data]\npath = {}\n",
                dir.join("rsyncd.log").display(),
                ids()?,
                module_dir.display()
            ),
        )?;
        let server_port = procs::free_port()?;
        let (server, client_tunnel, port) = match (flavour, stunnel) {
            (Flavour::Rsync, _) => {
                let mut cmd = Command::new(rsync);
                cmd.arg("--daemon")
                    .arg("--no-detach")
                    .arg(format!("--config={}", conf.display()))
                    .arg("--address=127.0.0.1")
                    .arg(format!("--port={server_port}"));
                let mut daemon =
                    ChildGuard::spawn("rsync daemon", cmd, &dir.join("daemon.log"), false)?;
                procs::wait_listening(&mut daemon, server_port)?;
                (daemon, None, server_port)
            }
            (Flavour::VolsyncRsyncTls, Some(stunnel)) => {
                let client_port = procs::free_port()?;
                let tls = "ciphers = PSK\n\
                           ciphersuites = TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256\n\
                           sslVersionMin = TLSv1.3\n";
                let server_conf = dir.join("stunnel-server.conf");
                std::fs::write(
                    &server_conf,
                    format!(
                        "foreground = yes\npid = {}\nsyslog = no\ndebug = notice\n\n[rsync]\nclient = no\n\
                         accept = 127.0.0.1:{server_port}\n{tls}PSKsecrets = {}\nexec = {}\n\
                         execArgs = rsync --server --daemon --config={} .\n",
                        dir.join("stunnel-server.pid").display(),
                        psk.display(),
                        rsync.display(),
                        conf.display()
                    ),
                )?;
                let client_conf = dir.join("stunnel-client.conf");
                std::fs::write(
                    &client_conf,
                    format!(
                        "foreground = yes\npid = {}\nsyslog = no\ndebug = info\n\n[rsync]\nclient = yes\n\
                         accept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{server_port}\n{tls}\
                         PSKsecrets = {}\n",
                        dir.join("stunnel-client.pid").display(),
                        psk.display()
                    ),
                )?;
                let mut cmd = Command::new(stunnel);
                cmd.arg(&server_conf);
                let mut server = ChildGuard::spawn(
                    "stunnel server",
                    cmd,
                    &dir.join("stunnel-server.log"),
                    false,
                )?;
                procs::wait_listening(&mut server, server_port)?;
                let mut cmd = Command::new(stunnel);
                cmd.arg(&client_conf);
                let mut client = ChildGuard::spawn(
                    "stunnel client",
                    cmd,
                    &dir.join("stunnel-client.log"),
                    false,
                )?;
                procs::wait_listening(&mut client, client_port)?;
                (server, Some(client), client_port)
            }
            (Flavour::VolsyncRsyncTls, None) => bail!("stunnel is needed for {name}"),
        };
        Ok(Self {
            flavour,
            rsync: rsync.to_owned(),
            dir,
            module_dir,
            port,
            server,
            _client_tunnel: client_tunnel,
            runs: 0,
        })
    }

    /// Which setup this is.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// Where a sync of `volume` lands.
    pub fn target(&self, volume: &Path) -> PathBuf {
        match self.flavour {
            Flavour::Rsync => self.module_dir.join("target.img"),
            // VolSync copies the files of the volume into the module's root under their own names.
            Flavour::VolsyncRsyncTls => self
                .module_dir
                .join(volume.file_name().unwrap_or_else(|| "volume".as_ref())),
        }
    }

    /// What TLS the client tunnel negotiated, from its log (`TLSv1.3 ciphersuite: ...`), once a sync ran.
    pub fn negotiated_tls(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.join("stunnel-client.log")).ok()?;
        let line = log.lines().rev().find(|l| l.contains("ciphersuite"))?;
        Some(
            line.split_once("]: ")
                .map_or(line, |(_, rest)| rest)
                .trim()
                .to_owned(),
        )
    }

    /// Empties the module, so that the next sync of `volume` is a full one.
    pub fn reset(&self, volume: &Path) -> anyhow::Result<()> {
        match std::fs::remove_file(self.target(volume)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// One sync of `volume` into the module, then an fsync of the target file, timed together.
    pub fn sync(&mut self, volume: &Path) -> anyhow::Result<RsyncSync> {
        self.runs += 1;
        let url = match self.flavour {
            Flavour::Rsync => format!("rsync://127.0.0.1:{}/data/target.img", self.port),
            Flavour::VolsyncRsyncTls => format!("rsync://127.0.0.1:{}/data/", self.port),
        };
        let mut cmd = Command::new(&self.rsync);
        cmd.args(self.flavour.flags()).arg(volume).arg(url);
        let log = self.dir.join(format!("client-{}.log", self.runs));
        let start = Instant::now();
        let mut client =
            ChildGuard::spawn(&format!("{} client", self.flavour.name()), cmd, &log, false)?;
        let mut client_probe = Probe::process(client.pid());
        let mut server_probe = Probe::descendants(self.server.pid());
        let ended = wait::wait_all(
            &mut [&mut client],
            &mut [&mut client_probe, &mut server_probe],
            SYNC_LIMIT,
        )?;
        let client_exit = ended[0];
        if !client_exit.status.success() {
            return Err(client.failure(&format!("failed ({})", client_exit.status)));
        }
        let target = self.target(volume);
        std::fs::File::open(&target)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot fsync {}", target.display()))?;
        let duration = start.elapsed();
        let text = std::fs::read_to_string(&log)?;
        let (sent, received) = parse_summary(&text)
            .ok_or_else(|| client.failure("printed no `sent N bytes  received M bytes` line"))?;
        Ok(RsyncSync {
            duration,
            sent,
            received,
            rss_client: client_probe.peak(),
            rss_server: server_probe.peak(),
            cpu_client: Some(client_exit.usage.cpu_secs),
            cpu_server: server_probe.cpu_secs(),
        })
    }
}

/// The byte counts of rsync's `sent 1,234 bytes  received 56 bytes  ...` line (any digit grouping).
pub fn parse_summary(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().rev().find(|l| l.starts_with("sent "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| -> Option<u64> {
        let digits: String = words.get(i)?.chars().filter(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    (words.get(2) == Some(&"bytes") && words.get(3) == Some(&"received"))
        .then_some(())
        .and_then(|()| Some((number(1)?, number(4)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_with_thousands_separators_is_parsed() {
        let text = "Number of files: 1\n\nsent 21,475,123 bytes  received 1.234 bytes  1,000.00 bytes/sec\n\
                    total size is 536,870,912  speedup is 24.99\n";
        assert_eq!(parse_summary(text), Some((21_475_123, 1_234)));
    }

    #[test]
    fn output_without_summary_gives_none() {
        assert_eq!(parse_summary("rsync error: some error\n"), None);
    }
}
