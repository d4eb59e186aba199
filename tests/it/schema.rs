//! Checks status JSON against VolSync's own CRD schemas, read at test time from `../shared/volsync` (never copied
//! into this project: they are AGPL), made strict so that a misspelled field fails.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use serde_json::{Map, Value};

/// Which CRD's `.status` schema to check against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `ReplicationSource`.
    Source,
    /// `ReplicationDestination`.
    Destination,
}

impl Kind {
    fn crd_file(self) -> &'static str {
        match self {
            Kind::Source => "volsync.backube_replicationsources.yaml",
            Kind::Destination => "volsync.backube_replicationdestinations.yaml",
        }
    }
}

/// Where the VolSync CRDs live beside the project.
fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/volsync")
}

/// A compiled strict status schema, or `None` when the CRDs are absent. Built once per kind.
type Cached = Result<Option<jsonschema::Validator>, String>;

fn validator(kind: Kind) -> anyhow::Result<Option<&'static jsonschema::Validator>> {
    static SOURCE: OnceLock<Cached> = OnceLock::new();
    static DESTINATION: OnceLock<Cached> = OnceLock::new();
    let cell = match kind {
        Kind::Source => &SOURCE,
        Kind::Destination => &DESTINATION,
    };
    // The error is cached as text: a broken CRD fails every caller the same way.
    match cell.get_or_init(|| build_validator(kind).map_err(|e| format!("{e:#}"))) {
        Ok(v) => Ok(v.as_ref()),
        Err(e) => bail!("{e}"),
    }
}

fn build_validator(kind: Kind) -> anyhow::Result<Option<jsonschema::Validator>> {
    let dir = crd_dir();
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join(kind.crd_file());
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let crd: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut schema = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/status")
        .cloned()
        .with_context(|| format!("{} has no status schema", path.display()))?;
    make_strict(&mut schema);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(true)
        .build(&schema)
        .map_err(|e| anyhow::anyhow!("compiling the status schema of {}: {e}", path.display()))?;
    Ok(Some(validator))
}

/// Forbids unknown properties on every object schema that lists its properties, and drops the Kubernetes
/// `x-kubernetes-*` extensions jsonschema does not know.
fn make_strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with("x-kubernetes-"));
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".to_owned(), Value::Bool(false));
            }
            map.values_mut().for_each(make_strict);
        }
        Value::Array(items) => items.iter_mut().for_each(make_strict),
        _ => {}
    }
}

/// Ok(true) when validated, Ok(false) when skipped (CRDs absent, reason printed), Err with every violation listed.
pub fn check_status_json(status: &Value, kind: Kind) -> anyhow::Result<bool> {
    let Some(validator) = validator(kind)? else {
        println!("skipped: ../shared/volsync not found, status schema not checked");
        return Ok(false);
    };
    let mut violations: Vec<String> = validator
        .iter_errors(status)
        .map(|e| format!("{}: {e}", pointer_or_root(&e.instance_path.to_string())))
        .collect();
    violations.extend(convention_violations(status));
    if violations.is_empty() {
        Ok(true)
    } else {
        bail!(
            "status is not a valid {kind:?} status:\n  {}",
            violations.join("\n  ")
        )
    }
}

/// Reads `path` as JSON and checks it with [`check_status_json`].
pub fn check_status_file(path: &Path, kind: Kind) -> anyhow::Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let status: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    check_status_json(&status, kind).with_context(|| format!("checking {}", path.display()))
}

fn pointer_or_root(p: &str) -> &str {
    if p.is_empty() {
        "/"
    } else {
        p
    }
}

/// VolSync conventions the CRD schema does not encode.
fn convention_violations(status: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(result) = status.pointer("/latestMoverStatus/result") {
        if result != "Successful" && result != "Failed" {
            out.push(format!(
                "/latestMoverStatus/result: {result} is neither \"Successful\" nor \"Failed\""
            ));
        }
    }
    if let Some(d) = status.get("lastSyncDuration") {
        if !d.as_str().is_some_and(is_go_duration) {
            out.push(format!("/lastSyncDuration: {d} is not a Go duration"));
        }
    }
    if let Some(external) = status.get("external") {
        match external.as_object() {
            Some(map) => out.extend(non_strings(map)),
            None => out.push(format!("/external: {external} is not an object")),
        }
    }
    out
}

fn non_strings(map: &Map<String, Value>) -> impl Iterator<Item = String> + '_ {
    map.iter()
        .filter(|(_, v)| !v.is_string())
        .map(|(k, v)| format!("/external/{k}: {v} is not a string"))
}

/// Whether `s` parses as Go's `time.ParseDuration` accepts it: `[-+]` then one or more `<decimal><unit>`,
/// or `0`.
fn is_go_duration(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    if s == "0" {
        return true;
    }
    if s.is_empty() {
        return false;
    }
    let mut rest = s;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return false;
        }
        let Some(unit) = ["ns", "us", "µs", "μs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| after.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            return false;
        };
        rest = &after[unit.len()..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmover::status::{Role, StatusFile};
    use chrono::{TimeZone, Utc};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn counters() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("chunksTotal".to_owned(), "16".to_owned()),
            ("volumeDigest".to_owned(), "ab".repeat(32)),
        ])
    }

    fn start() -> anyhow::Result<chrono::DateTime<Utc>> {
        Utc.with_ymd_and_hms(2026, 11, 24, 18, 31, 54)
            .single()
            .context("bad test time")
    }

    /// A status file after one sync, written by the real `StatusFile`.
    fn written_status(role: Role, ok: bool) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("status.json");
        let mut s = StatusFile::load(Some(path.clone()), role)?;
        let t0 = start()?;
        s.begin(t0)?;
        if role == Role::Destination {
            s.set_rsync_tls_address("10.96.0.12".to_owned());
        }
        let t1 = t0 + chrono::Duration::milliseconds(24_089);
        if ok {
            s.succeed(t1, counters(), "sent 1 bytes received 2 bytes".to_owned())?;
        } else {
            s.fail(t1, "keys do not match", counters(), "handshake".to_owned())?;
        }
        Ok((dir, path))
    }

    /// A valid status to mutate.
    fn valid() -> Value {
        json!({
            "lastSyncTime": "2026-11-24T18:31:54Z",
            "lastSyncDuration": "24.08989161s",
            "latestMoverStatus": {"result": "Successful", "logs": "done"},
            "conditions": [{
                "type": "Synchronizing", "status": "False", "reason": "WaitingForManual",
                "message": "Waiting for manual trigger", "lastTransitionTime": "2026-11-24T18:31:54Z"
            }],
            "external": {"chunksTotal": "16"},
            "nextSyncTime": "2026-11-24T18:35:00Z",
            "lastManualSync": "manual-1"
        })
    }

    /// Asserts rejection, unless the CRDs are absent; the error must mention `needle`.
    fn assert_rejected(status: &Value, kind: Kind, needle: &str) -> anyhow::Result<()> {
        if validator(kind)?.is_none() {
            println!("skipped: ../shared/volsync not found, status schema not checked");
            return Ok(());
        }
        match check_status_json(status, kind) {
            Ok(_) => bail!("accepted an invalid status: {status}"),
            Err(e) => {
                let text = format!("{e:#}");
                anyhow::ensure!(text.contains(needle), "error lacks {needle:?}: {text}");
                Ok(())
            }
        }
    }

    #[test]
    fn successful_status_file_validates_for_both_kinds() -> anyhow::Result<()> {
        for (role, kind) in [
            (Role::Source, Kind::Source),
            (Role::Destination, Kind::Destination),
        ] {
            let (_dir, path) = written_status(role, true)?;
            check_status_file(&path, kind)?;
        }
        Ok(())
    }

    #[test]
    fn failed_status_file_validates_for_both_kinds() -> anyhow::Result<()> {
        for (role, kind) in [
            (Role::Source, Kind::Source),
            (Role::Destination, Kind::Destination),
        ] {
            let (_dir, path) = written_status(role, false)?;
            check_status_file(&path, kind)?;
        }
        Ok(())
    }

    #[test]
    fn scheduled_and_manual_status_file_validates_for_both_kinds() -> anyhow::Result<()> {
        for (role, kind) in [
            (Role::Source, Kind::Source),
            (Role::Destination, Kind::Destination),
        ] {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("status.json");
            let mut s = StatusFile::load(Some(path.clone()), role)?;
            s.set_schedule(Some(blockmover::schedule::Schedule::parse("*/5 * * * *")?));
            s.set_manual(Some("2026-11-24T18:31:54.123456789Z".to_owned()));
            s.begin(start()?)?;
            s.succeed(
                start()? + chrono::Duration::seconds(3),
                counters(),
                String::new(),
            )?;
            let json: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            anyhow::ensure!(json.get("nextSyncTime").is_some(), "{json}");
            anyhow::ensure!(json.get("lastManualSync").is_some(), "{json}");
            check_status_file(&path, kind)?;
        }
        Ok(())
    }

    #[test]
    fn bad_next_sync_time_and_non_string_manual_are_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["nextSyncTime"] = json!("in five minutes");
        assert_rejected(&s, Kind::Source, "/nextSyncTime")?;
        let mut s = valid();
        s["lastManualSync"] = json!(42);
        assert_rejected(&s, Kind::Destination, "/lastManualSync")
    }

    #[test]
    fn valid_fixture_is_accepted() -> anyhow::Result<()> {
        check_status_json(&valid(), Kind::Source)?;
        check_status_json(&valid(), Kind::Destination)?;
        Ok(())
    }

    #[test]
    fn misspelled_field_is_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["lastSyncTme"] = json!("2026-11-24T18:31:54Z");
        assert_rejected(&s, Kind::Source, "lastSyncTme")?;
        let mut s = valid();
        s["latestMoverStatus"]["log"] = json!("x");
        assert_rejected(&s, Kind::Destination, "log")
    }

    #[test]
    fn non_string_external_value_is_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["external"]["chunksTotal"] = json!(16);
        assert_rejected(&s, Kind::Source, "/external/chunksTotal")
    }

    #[test]
    fn bad_timestamp_is_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["lastSyncTime"] = json!("2026-11-24 18:31:54");
        assert_rejected(&s, Kind::Source, "/lastSyncTime")?;
        let mut s = valid();
        s["conditions"][0]["lastTransitionTime"] = json!("yesterday");
        assert_rejected(&s, Kind::Destination, "lastTransitionTime")
    }

    #[test]
    fn unknown_mover_result_is_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["latestMoverStatus"]["result"] = json!("Succeeded");
        assert_rejected(&s, Kind::Source, "Succeeded")
    }

    #[test]
    fn non_go_duration_is_rejected() -> anyhow::Result<()> {
        let mut s = valid();
        s["lastSyncDuration"] = json!("24.1 seconds");
        assert_rejected(&s, Kind::Source, "lastSyncDuration")
    }

    #[test]
    fn rsync_tls_address_is_accepted_for_destination_only() -> anyhow::Result<()> {
        let mut s = valid();
        s["rsyncTLS"] = json!({"address": "10.96.0.12", "keySecret": "psk"});
        check_status_json(&s, Kind::Destination)?;
        // The ReplicationSource schema has rsyncTLS.keySecret but no address.
        assert_rejected(&s, Kind::Source, "address")
    }

    #[test]
    fn go_duration_parser_accepts_go_output_and_rejects_other_text() {
        for ok in [
            "0s",
            "0",
            "1.5s",
            "1m2.5s",
            "2h3m4.000000005s",
            "500µs",
            "42ns",
            "1.5ms",
            "-1s",
        ] {
            assert!(is_go_duration(ok), "{ok}");
        }
        for bad in ["", "s", "1", "1.5", "1 s", "1x", "1m2", ".s", "+"] {
            assert!(!is_go_duration(bad), "{bad}");
        }
    }
}
