//! `blockmover status`: status files shown as `kubectl get replicationsource` shows them (a table with the CRD's
//! printer columns), or as the whole document in YAML or JSON.

use std::path::{Path, PathBuf};

use crate::status::{go_duration, MoverStatus, CONDITION_SYNCHRONIZING};

/// A status file and its document.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The file read.
    pub path: PathBuf,
    /// Its document.
    pub status: MoverStatus,
}

impl Entry {
    /// The row name: the file name without `.json` (and without a `-status` suffix), like a resource name.
    pub fn name(&self) -> String {
        name_of(&self.path)
    }
}

fn name_of(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let stem = file.strip_suffix(".json").unwrap_or(&file);
    stem.strip_suffix("-status")
        .or_else(|| stem.strip_suffix(".status"))
        .filter(|s| !s.is_empty())
        .unwrap_or(stem)
        .to_owned()
}

/// The columns: the CRD's printer columns (`Last sync`, `Duration`, `Next sync`) after the name, then the
/// age of the data the target holds (now minus the start of the last successful sync: what a disaster now would
/// lose, the live RPO), the latest result, the kind of the latest sync (`full`, `delta-manifest`, `delta-changelist`: a full comparison
/// that should have been a delta is what a user looks for) and the `Synchronizing` condition's reason.
const HEADERS: [&str; 8] = [
    "NAME",
    "LAST SYNC",
    "DURATION",
    "NEXT SYNC",
    "DATA AGE",
    "RESULT",
    "KIND",
    "CONDITION",
];

/// A table, one row per entry, columns padded with three spaces as kubectl does; absent values are empty.
pub fn table(entries: &[Entry]) -> String {
    table_at(entries, chrono::Utc::now())
}

/// [`table`] as of `now`.
pub fn table_at(entries: &[Entry], now: chrono::DateTime<chrono::Utc>) -> String {
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            let s = &e.status;
            let condition = s
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_SYNCHRONIZING)
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            [
                e.name(),
                s.last_sync_time.clone().unwrap_or_default(),
                s.last_sync_duration.clone().unwrap_or_default(),
                s.next_sync_time.clone().unwrap_or_default(),
                s.image_time()
                    .and_then(|t| (now - t).to_std().ok())
                    .map(|d| go_duration(std::time::Duration::from_secs(d.as_secs())))
                    .unwrap_or_default(),
                s.latest_mover_status
                    .as_ref()
                    .map(|m| m.result.clone())
                    .unwrap_or_default(),
                s.external.get("syncKind").cloned().unwrap_or_default(),
                condition,
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(HEADERS.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Condition, LatestMoverStatus};

    #[test]
    fn table_has_kubectl_columns_and_aligns_them() {
        let status = MoverStatus {
            last_sync_time: Some("2026-11-24T18:31:54Z".to_owned()),
            last_sync_duration: Some("24.08s".to_owned()),
            next_sync_time: Some("2026-11-24T18:35:00Z".to_owned()),
            latest_mover_status: Some(LatestMoverStatus {
                result: "Successful".to_owned(),
                logs: String::new(),
            }),
            conditions: vec![Condition {
                type_: CONDITION_SYNCHRONIZING.to_owned(),
                status: "False".to_owned(),
                reason: "WaitingForSchedule".to_owned(),
                message: String::new(),
                last_transition_time: String::new(),
            }],
            external: [("syncKind".to_owned(), "delta-manifest".to_owned())].into(),
            ..MoverStatus::default()
        };
        let entries = [
            Entry {
                path: PathBuf::from("/x/vm-disk-status.json"),
                status,
            },
            Entry {
                path: PathBuf::from("fresh.json"),
                status: MoverStatus::default(),
            },
        ];
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-24T18:33:00Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .expect("time");
        let t = table_at(&entries, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME      LAST SYNC              DURATION   NEXT SYNC              DATA AGE   RESULT       KIND             CONDITION"
        );
        assert_eq!(
            lines[1],
            "vm-disk   2026-11-24T18:31:54Z   24.08s     2026-11-24T18:35:00Z   1m30s      Successful   delta-manifest   WaitingForSchedule"
        );
        assert_eq!(lines[2], "fresh");
    }
}
