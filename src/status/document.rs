//! The `.status` document's types, field for field as VolSync's ReplicationSource / ReplicationDestination CRDs
//! name them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

impl MoverStatus {
    /// When the image of the last successful sync was read: `lastSyncTime - lastSyncDuration` (the sync's start).
    /// What a disaster now would lose is everything written since.
    pub fn image_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let end = super::parse_time(self.last_sync_time.as_deref())?;
        let took = super::format::parse_go_duration(self.last_sync_duration.as_deref()?)?;
        Some(end - chrono::Duration::from_std(took).ok()?)
    }
}

/// The `.status` document, field for field as VolSync's CRDs name them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MoverStatus {
    /// RFC 3339 time of the last successful sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// RFC 3339 start time of the sync under way; absent when none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_start_time: Option<String>,
    /// Go duration text of the last successful sync (`lastSyncTime - lastSyncStartTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration: Option<String>,
    /// RFC 3339 time the next scheduled sync is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<String>,
    /// The value of `spec.trigger.manual` when the last sync completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_manual_sync: Option<String>,
    /// Result and log tail of the latest mover run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_mover_status: Option<LatestMoverStatus>,
    /// Kubernetes conditions; VolSync uses only `Synchronizing`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Free-form string map for a third-party mover (blockmover's counters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external: BTreeMap<String, String>,
    /// Destination only: where the source connects and which Secret holds the key.
    #[serde(default, rename = "rsyncTLS", skip_serializing_if = "Option::is_none")]
    pub rsync_tls: Option<RsyncTlsStatus>,
}

/// `latestMoverStatus`: how the latest mover run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatestMoverStatus {
    /// [`RESULT_SUCCESSFUL`](super::RESULT_SUCCESSFUL) or [`RESULT_FAILED`](super::RESULT_FAILED).
    pub result: String,
    /// The last [`MOVER_LOG_MAX_BYTES`](super::MOVER_LOG_MAX_BYTES) of the mover's summary log lines.
    pub logs: String,
}

/// A Kubernetes `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type; always [`CONDITION_SYNCHRONIZING`](super::CONDITION_SYNCHRONIZING) here.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, e.g. `SyncInProgress`.
    pub reason: String,
    /// Human-readable detail, at most [`CONDITION_MESSAGE_MAX_LEN`](super::CONDITION_MESSAGE_MAX_LEN) bytes.
    pub message: String,
    /// RFC 3339 time `status` last changed.
    pub last_transition_time: String,
}

/// `rsyncTLS` of a ReplicationDestination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RsyncTlsStatus {
    /// The address the source connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The Secret holding the pre-shared key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
}
