//! CSI changed block tracking (issue 12, item 3): `source --cbt-*` asks a SnapshotMetadata gRPC service
//! (KEP-3314) for the allocated ranges of a first sync and the changed ranges of an incremental. The service is
//! [`server::MetadataServer`], a test server that speaks the real protocol over TLS (a CSI sidecar cannot run
//! here) and computes its answers from real snapshot files; the agents are real processes over real TLS.
//!
//! - [`syncs`]: a first sync reads only the allocated chunks; a delta reads only the changed chunks (FIXED_LENGTH
//!   and VARIABLE_LENGTH, paged by `max_results`); a cut stream is resumed; a bad range, a wrong token, a stream
//!   cut too often and a server that is down each make the sync a full comparison that says why; a service that
//!   leaves a changed range out is believed, and `--verify full` repairs it and counts what it missed.
//! - [`trust`]: the service's certificate (CA, name, an IP endpoint), a silent service (timeouts), usage errors.

mod generated;
/// The generated SnapshotMetadata server (`proto/snapshot_metadata.proto`; committed, checked by [`generated`]).
#[allow(clippy::all, clippy::pedantic)]
#[rustfmt::skip]
mod pb;
mod server;
mod syncs;
mod trust;

use std::path::PathBuf;

use anyhow::Result;

use crate::delta::Pair;
use server::MetadataServer;

/// The token the test server accepts.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.test-service-account-token";

/// A [`Pair`], a SnapshotMetadata server and the snapshots taken of the volume.
pub struct Cbt {
    pub p: Pair,
    pub server: MetadataServer,
    pub token: PathBuf,
    taken: u32,
}

impl Cbt {
    /// A random volume of `size` bytes, a zero target, state directories, a server and a token file.
    pub fn new(size: u64, seed: u64) -> Result<Cbt> {
        let p = Pair::new(size, seed)?;
        let server = MetadataServer::start(p.fx.dir.path(), TOKEN)?;
        let token = p.fx.dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n"))?;
        Ok(Cbt {
            p,
            server,
            token,
            taken: 0,
        })
    }

    /// Takes snapshot `snap-K` (CSI handle `handle-K`) of the volume as it is now: a copy the server serves.
    pub fn snapshot(&mut self) -> Result<u32> {
        self.taken += 1;
        let k = self.taken;
        let path = self.p.fx.dir.path().join(format!("snap-{k}.img"));
        std::fs::copy(&self.p.fx.volume, &path)?;
        self.server
            .snapshot(&format!("snap-{k}"), &format!("handle-{k}"), &path);
        Ok(k)
    }

    /// The source flags for a sync of snapshot `k`, incremental from snapshot `base`.
    pub fn flags(&self, k: u32, base: Option<u32>) -> Vec<String> {
        let mut f: Vec<String> = [
            "--cbt-endpoint",
            &self.server.addr.to_string(),
            "--cbt-server-name",
            "localhost",
            "--cbt-ca",
            &self.server.ca.to_string_lossy(),
            "--cbt-token-file",
            &self.token.to_string_lossy(),
            "--cbt-namespace",
            "apps",
            "--cbt-snapshot",
            &format!("snap-{k}"),
            "--cbt-timeout",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(b) = base {
            f.extend(["--cbt-base-snapshot-id".to_owned(), format!("handle-{b}")]);
        }
        f
    }

    /// [`Pair::sync`] with `flags` and `extra` on the source.
    pub fn sync(&self, flags: &[String], extra: &[&str]) -> Result<crate::delta::Outcome> {
        let mut s: Vec<&str> = flags.iter().map(String::as_str).collect();
        s.extend_from_slice(extra);
        self.p.sync(&s, &[])
    }

    /// [`Pair::sync_unchecked`] with `flags` on the source (for a service that lies).
    pub fn sync_unchecked(&self, flags: &[String]) -> Result<crate::delta::Outcome> {
        let s: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.p.sync_unchecked(&s, &[])
    }
}
