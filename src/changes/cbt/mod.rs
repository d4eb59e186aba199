//! CSI changed block tracking (KEP-3314): the Kubernetes SnapshotMetadata service of the
//! `external-snapshot-metadata` sidecar as a [`Tracker`].
//!
//! The point-in-time image is a CSI VolumeSnapshot (`--cbt-snapshot`, whose clone the source reads as
//! `--volume`). `GetMetadataDelta` from the base snapshot (`--cbt-base-snapshot-id`, the CSI handle of the
//! snapshot the last sync read) gives the change list; `GetMetadataAllocated` gives the allocation map of a
//! full comparison. Trusted: the storage provider's diff, as the file change list is trusted (a range it omits
//! is not read; `--verify-every` bounds that), and that the base snapshot is the image of the source's manifest.
//! Not trusted: the shape of its answers, checked in [`ranges`] (refused as a whole when wrong). Any failure is
//! [`Error::Tracker`], and the sync is a full comparison, never a partial one; after a failed change list that
//! comparison gets no allocation map from the same service either (it reads the whole volume).
//!
//! The calls run on a current-thread tokio runtime of their own, on a thread of their own: `Tracker::changed`
//! is synchronous and asked from the source's async code, and a runtime nested in (or blocking) the caller's
//! could deadlock. On a multi-thread runtime the wait is wrapped in `block_in_place`, so the caller's other
//! tasks keep running.

mod client;
mod ranges;

use std::path::PathBuf;
use std::time::Duration;

use super::{ChangedChunks, Tracker};
use crate::chunk::{Digest, Geometry};
use crate::error::{Error, Result};

pub use client::MAX_RESUMES;
pub use ranges::MAX_EXTENTS;

/// The generated SnapshotMetadata messages and client (`proto/snapshot_metadata.proto`; committed, checked against
/// protoc's output by `tests/it/cbt/generated.rs`).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
mod pb;

/// The largest token file read (a service account token is about a kilobyte).
const MAX_TOKEN: u64 = 64 << 10;
/// Ranges asked per response message unless configured.
pub const DEFAULT_MAX_RESULTS: u32 = 1024;

/// Where the SnapshotMetadata service is and what to ask it (`source --cbt-*`).
#[derive(Clone, Debug)]
pub struct CbtConfig {
    /// `HOST:PORT` of the sidecar's gRPC service.
    pub endpoint: String,
    /// PEM CA certificate(s) that sign the sidecar's certificate.
    pub ca: PathBuf,
    /// The service account token, sent as `security_token`; read again for every sync.
    pub token_file: PathBuf,
    /// The namespace of the VolumeSnapshots.
    pub namespace: String,
    /// The VolumeSnapshot being synced (the source's `--volume` is its clone).
    pub snapshot: String,
    /// The CSI snapshot handle of the snapshot the last sync read; without it there is no delta to ask for.
    pub base_snapshot_id: Option<String>,
    /// The name to check the sidecar's certificate against, when not the endpoint's host.
    pub server_name: Option<String>,
    /// The limit on connecting, on each call's answer and on each message of a stream.
    pub timeout: Duration,
    /// Ranges asked per response message (`max_results`; 0 lets the service choose).
    pub max_results: u32,
}

/// `source --cbt-endpoint ...`: the change list and allocation map from CSI snapshot metadata.
#[derive(Debug)]
pub struct CsiSnapshotMetadata {
    config: CbtConfig,
    /// Why the last change list failed, if it did: the full comparison that follows then asks no allocation map
    /// (a service whose answer was just refused is not trusted to say what may be skipped).
    failed: std::sync::Mutex<Option<String>>,
}

impl CsiSnapshotMetadata {
    /// The tracker for `config` (nothing is read or connected until a sync asks).
    pub fn new(config: CbtConfig) -> Self {
        CsiSnapshotMetadata {
            config,
            failed: std::sync::Mutex::new(None),
        }
    }

    fn remember(&self, failure: Option<String>) {
        if let Ok(mut f) = self.failed.lock() {
            *f = failure;
        }
    }

    fn failed(&self, reason: String) -> Error {
        Error::Tracker {
            tracker: self.describe(),
            reason,
        }
    }

    fn token(&self) -> std::result::Result<String, String> {
        use std::io::Read;
        let path = &self.config.token_file;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN + 1).read_to_string(&mut text))
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_TOKEN {
            return Err(format!(
                "token file {} is larger than {MAX_TOKEN} bytes",
                path.display()
            ));
        }
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("token file {} is empty", path.display()));
        }
        Ok(token.to_owned())
    }
}

impl Tracker for CsiSnapshotMetadata {
    fn describe(&self) -> String {
        let c = &self.config;
        let base = match &c.base_snapshot_id {
            Some(id) => format!("since snapshot {id}"),
            None => "without a base snapshot".to_owned(),
        };
        format!(
            "CSI snapshot metadata {}: snapshot {}/{} {base}",
            c.endpoint, c.namespace, c.snapshot
        )
    }

    fn changed(&self, geometry: Geometry, base: &Digest) -> Result<ChangedChunks> {
        let answer = self.ask_changed(geometry, base);
        self.remember(match &answer {
            Err(Error::Tracker { reason, .. }) => Some(reason.clone()),
            Err(e) => Some(e.to_string()),
            Ok(_) => None,
        });
        answer
    }

    fn allocated(&self, geometry: Geometry) -> Result<Option<Vec<(u64, u64)>>> {
        if let Some(why) = self.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(self.failed(format!(
                "no allocation map from a service whose change list failed ({why})"
            )));
        }
        let token = self.token().map_err(|e| self.failed(e))?;
        let size = geometry.volume_size();
        let config = self.config.clone();
        let answer = on_own_runtime(move || async move {
            let client = client::Client::connect(&config).await?;
            client.allocated(&config, &token, size).await
        })
        .map_err(|e| self.failed(e))?;
        Ok(Some(answer.extents))
    }
}

impl CsiSnapshotMetadata {
    fn ask_changed(&self, geometry: Geometry, _base: &Digest) -> Result<ChangedChunks> {
        let Some(base_id) = self.config.base_snapshot_id.clone() else {
            return Err(self.failed(
                "no --cbt-base-snapshot-id: there is no base snapshot to ask the changes since"
                    .to_owned(),
            ));
        };
        let token = self.token().map_err(|e| self.failed(e))?;
        let size = geometry.volume_size();
        let config = self.config.clone();
        let answer = on_own_runtime(move || async move {
            let client = client::Client::connect(&config).await?;
            client.delta(&config, &token, &base_id, size).await
        })
        .map_err(|e| self.failed(e))?;
        let bytes: u64 = answer.extents.iter().map(|(_, l)| l).sum();
        tracing::info!(
            "{}: {} ranges, {bytes} bytes changed ({} resumed streams)",
            self.describe(),
            answer.ranges,
            answer.resumes
        );
        ChangedChunks::from_extents(&answer.extents, geometry).map_err(|e| self.failed(e.0))
    }
}

/// Runs the future that `make` builds on a current-thread runtime on a thread of its own, and waits for it
/// (inside `block_in_place` on a multi-thread runtime).
fn on_own_runtime<T, F, Fut>(make: F) -> std::result::Result<T, String>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let work = move || {
        std::thread::scope(|s| {
            s.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the tracker's runtime: {e}"))?;
                runtime.block_on(make())
            })
            .join()
            .unwrap_or_else(|_| Err("the tracker's thread panicked".to_owned()))
        })
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn later(v: u32) -> std::result::Result<u32, String> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(v)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_calls_run_beside_a_current_thread_runtime() {
        assert_eq!(on_own_runtime(|| later(1)), Ok(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_calls_run_beside_a_multi_thread_runtime_without_starving_it() {
        // A task of the caller's runtime makes progress while the tracker waits (block_in_place).
        let other = tokio::spawn(async { later(2).await });
        assert_eq!(on_own_runtime(|| later(1)), Ok(1));
        assert_eq!(other.await.ok(), Some(Ok(2)));
    }

    #[test]
    fn the_calls_run_without_a_runtime() {
        assert_eq!(on_own_runtime(|| later(3)), Ok(3));
    }

    fn config(dir: &std::path::Path) -> CbtConfig {
        CbtConfig {
            endpoint: "127.0.0.1:1".to_owned(),
            ca: dir.join("ca.pem"),
            token_file: dir.join("token"),
            namespace: "ns".to_owned(),
            snapshot: "snap-2".to_owned(),
            base_snapshot_id: Some("handle-1".to_owned()),
            server_name: None,
            timeout: Duration::from_secs(5),
            max_results: DEFAULT_MAX_RESULTS,
        }
    }

    #[test]
    fn every_failure_is_a_tracker_error_naming_the_snapshots() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let geo = Geometry::new(1 << 20, 65536).map_err(anyhow::Error::msg)?;
        let t = CsiSnapshotMetadata::new(config(dir.path()));
        assert!(t.describe().contains("ns/snap-2 since snapshot handle-1"));
        let tracker_error = |e: Error, what: &str| match e {
            Error::Tracker { tracker, reason } => {
                assert!(tracker.contains("127.0.0.1:1"), "{tracker}");
                assert!(reason.contains(what), "{reason:?} does not say {what:?}");
            }
            other => panic!("not a tracker error: {other}"),
        };
        let e = t.changed(geo, &Digest([0; 32])).expect_err("no token");
        tracker_error(e, "cannot read token file");
        // Fresh trackers: after a failed change list, `allocated` is refused whatever the token or CA.
        let fresh = || CsiSnapshotMetadata::new(config(dir.path()));
        std::fs::write(dir.path().join("token"), "\n")?;
        tracker_error(fresh().allocated(geo).expect_err("empty"), "is empty");
        std::fs::write(dir.path().join("token"), "secret\n")?;
        tracker_error(
            fresh().allocated(geo).expect_err("no CA"),
            "cannot read CA file",
        );
        let mut c = config(dir.path());
        c.base_snapshot_id = None;
        let e = CsiSnapshotMetadata::new(c)
            .changed(geo, &Digest([0; 32]))
            .expect_err("no base");
        tracker_error(e, "no --cbt-base-snapshot-id");
        // After a failed change list, the fallback asks no allocation map of that service.
        let e = t.changed(geo, &Digest([0; 32])).expect_err("no CA");
        tracker_error(e, "cannot read CA file");
        tracker_error(
            t.allocated(geo).expect_err("after a failure"),
            "no allocation map from a service whose change list failed (cannot read CA file",
        );
        Ok(())
    }
}
