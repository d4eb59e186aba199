//! The `blockmover` command: parse arguments, set up logging, run, and map the outcome to an exit code.
//!
//! Exit codes: 0 synced and durable; 1 a failure a retry will not cure (keys, configuration, digests, versions,
//! a target too small); 75 (EX_TEMPFAIL) a failure a retry may cure (network, a vanished peer, timeouts);
//! 2 bad usage. Every failure prints one line `error: ...` on stderr.

mod bench;
mod cli;
mod demo;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use blockmover::agent::SourceAgent;
use blockmover::metrics::{Labels, Metrics};
use blockmover::status::{Role, StatusFile};
use cli::{Cli, Command};

/// mimalloc instead of glibc's malloc: the agents hand 64 KiB buffers between threads (read on one, sent or
/// written on another), and glibc returned those pages to the kernel and faulted them back in (zeroed) over and
/// over: page faults, `madvise` and zeroing were about a tenth of a full sync's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code of a failure a retry may cure.
const EXIT_RETRYABLE: u8 = 75;

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), and it purges freed pages
    // back to the kernel: every purged range touched again was a fresh 2 MiB page zeroed whole. That zeroing was
    // 17% of a destination's CPU in a change-list delta sync (2753 changed chunks, `perf`), and turning it off
    // here took that sync from 0.48 s to 0.39 s (medians of six alternated runs). The agents' buffers are small and
    // short-lived: 4 KiB pages cost them nothing. Best effort: a kernel without the prctl keeps the default.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_env("BLOCKMOVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Dropping a runtime waits for its blocking threads; one may still be blocked on a peer or a device (a failed
    // session's worker): the outcome is known, so the process must not wait for them.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let retryable = e
                .downcast_ref::<blockmover::Error>()
                .is_some_and(blockmover::Error::is_retryable);
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(if retryable { EXIT_RETRYABLE } else { 1 })
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    // The library's errors already name their cause; other errors carry it as context.
    let text = match (
        e.downcast_ref::<blockmover::Error>(),
        e.downcast_ref::<blockmover::status::StatusError>(),
    ) {
        (Some(own), _) => own.to_string(),
        (None, Some(status)) => status.to_string(),
        (None, None) => format!("{e:#}"),
    };
    text.replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Registered before anything is bound or opened, so a signal at any point is recorded, not fatal.
    let mut signals = Signals::new()?;
    match cli.command {
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Destination(args) => {
            let mut config = args.config()?;
            let status = StatusFile::load(config.status.clone(), Role::Destination)?;
            status.check_writable()?;
            let labels = args.common.labels(Role::Destination, &config.target);
            let _metrics = match &args.common.metrics_listen {
                Some(addr) => {
                    let (m, task) =
                        serve_metrics(addr, labels, config.schedule.clone(), &status).await?;
                    config.metrics = Some(m);
                    Some(task)
                }
                None => None,
            };
            let bound = blockmover::destination::bind(&config).await?;
            let addr = bound.local_addr()?;
            println!("listening on {addr}");
            std::io::stdout().flush()?;
            tracing::info!(%addr, target = %config.target.display(), "destination listening");
            use blockmover::destination::Served;
            match blockmover::destination::serve_until(&config, bound, signals.recv()).await {
                Ok(Served::Synced(_)) => Ok(()),
                Ok(Served::Idle) => {
                    tracing::info!("stopped by a signal while waiting for a source");
                    Ok(())
                }
                Ok(Served::Interrupted(s)) => Err(cancelled(s, config.status, Role::Destination)),
                Err(e) => {
                    // Whatever ends the process, a sync it leaves under way is recorded Failed.
                    record_abandoned(&e, config.status, Role::Destination);
                    Err(e.into())
                }
            }
        }
        Command::Source(args) => {
            let config = args.config()?;
            let schedule = args.common.schedule()?;
            let status_path = args.common.status.clone();
            let status = StatusFile::load(status_path.clone(), Role::Source)?;
            status.check_writable()?;
            let labels = args.common.labels(Role::Source, &args.label_device()?);
            let (metrics, _task) = match &args.common.metrics_listen {
                Some(addr) => {
                    let (m, task) = serve_metrics(addr, labels, schedule.clone(), &status).await?;
                    (Some(m), Some(task))
                }
                None => (None, None),
            };
            let scheduled = schedule.is_some();
            let agent = SourceAgent::new(
                config,
                status_path.clone(),
                schedule,
                args.manual.clone(),
                metrics,
                blockmover::schedule::system_clock(),
            );
            tokio::select! {
                r = agent.run() => { r?; }
                s = signals.recv() => {
                    if scheduled && !agent.busy() {
                        tracing::info!("stopped by {s} while waiting");
                        return Ok(());
                    }
                    return Err(cancelled(s, status_path, Role::Source));
                }
            }
            Ok(())
        }
        Command::Status(args) => show_status(&args),
        Command::Trigger(args) => {
            let token = args.token.clone().unwrap_or_else(|| {
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            });
            let path = blockmover::agent::request_sync(&args.status, &token)?;
            println!("{token}");
            eprintln!(
                "requested a sync with token {token:?} in {}",
                path.display()
            );
            Ok(())
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

/// Binds the metrics endpoint, prints `metrics on http://ADDR/metrics` on stdout and serves it in the background.
async fn serve_metrics(
    addr: &str,
    labels: Labels,
    schedule: Option<blockmover::schedule::Schedule>,
    status: &StatusFile,
) -> anyhow::Result<(Arc<Metrics>, tokio::task::JoinHandle<()>)> {
    let metrics = Arc::new(Metrics::new(
        labels,
        schedule,
        blockmover::schedule::system_clock(),
        status.last_sync_time(),
    ));
    metrics.set_image_time(status.status().image_time());
    let (bound, task) = blockmover::metrics::http::spawn(addr, metrics.clone()).await?;
    println!("metrics on http://{bound}/metrics");
    std::io::stdout().flush()?;
    tracing::info!(%bound, "serving metrics");
    Ok((metrics, task))
}

/// `blockmover status`: every file, as a table or as documents.
fn show_status(args: &cli::StatusArgs) -> anyhow::Result<()> {
    use blockmover::listing::{table, Entry};
    let mut entries = Vec::new();
    for path in &args.files {
        if !path.exists() {
            anyhow::bail!("status file {} does not exist", path.display());
        }
        let status = StatusFile::load(Some(path.clone()), Role::Source)?;
        entries.push(Entry {
            path: path.clone(),
            status: status.status().clone(),
        });
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        cli::Output::Table => out.write_all(table(&entries).as_bytes())?,
        cli::Output::Json => {
            let docs: Vec<_> = entries.iter().map(|e| &e.status).collect();
            let text = match docs.as_slice() {
                [one] => serde_json::to_string_pretty(one)?,
                many => serde_json::to_string_pretty(many)?,
            };
            writeln!(out, "{text}")?;
        }
        cli::Output::Yaml => {
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                out.write_all(serde_yaml::to_string(&e.status)?.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Records an interrupted sync as Failed (keeping the previous lastSyncTime) and returns the error to report.
/// Nothing is reported as synchronised: the status says Failed whatever the target holds.
fn cancelled(
    signal: &'static str,
    status: Option<std::path::PathBuf>,
    role: Role,
) -> anyhow::Error {
    let err = blockmover::Error::Cancelled(signal);
    record_abandoned(&err, status, role);
    err.into()
}

/// The process ends with `err`: a sync it leaves under way (`lastSyncStartTime` set) is recorded Failed with that
/// reason, so that no status says SyncInProgress for a process that is gone.
fn record_abandoned(err: &blockmover::Error, status: Option<std::path::PathBuf>, role: Role) {
    let recorded = StatusFile::load(status, role).and_then(|mut s| {
        if s.status().last_sync_start_time.is_some() {
            s.fail(
                chrono::Utc::now(),
                &err.to_string(),
                Default::default(),
                format!("error: {err}\n"),
            )?;
        }
        Ok(())
    });
    if let Err(e) = recorded {
        tracing::warn!("cannot record the failure in the status file: {e}");
    }
}

/// SIGTERM and SIGINT, registered up front.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when a signal arrives, naming it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Writes a new key file: always a new 0600 file renamed into place (with `--force` over the old one, whatever
/// its mode was), never an existing file rewritten.
fn keygen(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    use blockmover::durable::{write_file, Existing};
    let existing = if force {
        Existing::Replace
    } else {
        Existing::Keep
    };
    let key = blockmover::tls::Psk::generate();
    write_file(out, key.as_bytes(), 0o600, existing).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists && !force {
            anyhow::anyhow!(
                "key file {} already exists: pass --force to replace it",
                out.display()
            )
        } else {
            anyhow::anyhow!("cannot write key file {}: {e}", out.display())
        }
    })?;
    eprintln!("wrote a new key to {}", out.display());
    Ok(())
}
