//! Progress of a sync under way: a bar on a terminal, a log line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::stats::{get, Figures};

/// How often a log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A running progress reporter; stops when dropped.
pub struct Progress {
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts reporting the scan of `figures` under `label` ("source" or "destination").
    pub fn start(label: &'static str, figures: Arc<Figures>) -> Progress {
        let task = if std::io::stderr().is_terminal() {
            tokio::spawn(bar(label, figures))
        } else {
            tokio::spawn(lines(label, figures))
        };
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bar(label: &'static str, figures: Arc<Figures>) {
    let pb = ProgressBar::new(get(&figures.volume_size));
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>11} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(label);
    let _finish = scopeguard(pb.clone());
    loop {
        pb.set_length(get(&figures.volume_size));
        pb.set_position(get(&figures.bytes_read));
        pb.set_message(format!(
            "wire {} B, {} blocks",
            get(&figures.wire.sent) + get(&figures.wire.received),
            get(&figures.blocks_sent)
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn scopeguard(pb: ProgressBar) -> impl Drop {
    struct Guard(ProgressBar);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    Guard(pb)
}

async fn lines(label: &'static str, figures: Arc<Figures>) {
    let mut tick = tokio::time::interval(LOG_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let size = get(&figures.volume_size).max(1);
        let read = get(&figures.bytes_read);
        tracing::info!(
            "{label} progress: scanned {read} of {size} bytes ({:.1}%), wire sent {} received {} bytes, blocks sent {}",
            read as f64 * 100.0 / size as f64,
            get(&figures.wire.sent),
            get(&figures.wire.received),
            get(&figures.blocks_sent),
        );
    }
}
