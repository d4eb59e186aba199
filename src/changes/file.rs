//! A change list in a file: `{"extents": [[offset, length], ...]}` in bytes (what a script around
//! `rbd diff --format json` or any other tracker writes).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ChangedChunks, Tracker};
use crate::chunk::{Digest, Geometry};
use crate::error::{Error, Result};

/// The largest change list file read (64 MiB: about four million extents).
const MAX_FILE: u64 = 64 << 20;

/// `source --changed-extents FILE`.
#[derive(Clone, Debug)]
pub struct ExtentsFile {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extents {
    extents: Vec<(u64, u64)>,
}

impl ExtentsFile {
    /// The change list at `path` (read when the sync needs it).
    pub fn new(path: PathBuf) -> Self {
        ExtentsFile { path }
    }

    fn bad(&self, reason: String) -> Error {
        Error::ChangeList {
            path: self.path.clone(),
            reason,
        }
    }
}

impl Tracker for ExtentsFile {
    fn describe(&self) -> String {
        format!("extents file {}", self.path.display())
    }

    fn changed(&self, geometry: Geometry, _base: &Digest) -> Result<ChangedChunks> {
        use std::io::Read;
        let file = std::fs::File::open(&self.path).map_err(|source| Error::Open {
            what: "change list",
            path: self.path.clone(),
            source,
        })?;
        let mut text = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|e| self.bad(e.to_string()))?;
        if text.len() as u64 > MAX_FILE {
            return Err(self.bad(format!("larger than {MAX_FILE} bytes")));
        }
        let parsed: Extents = serde_json::from_slice(&text)
            .map_err(|e| self.bad(format!("not {{\"extents\": [[offset, length], ...]}}: {e}")))?;
        ChangedChunks::from_extents(&parsed.extents, geometry).map_err(|e| self.bad(e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_parsed_and_its_errors_name_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let geo = Geometry::new(8 * 65536, 65536).map_err(anyhow::Error::msg)?;
        let p = dir.path().join("c.json");
        std::fs::write(&p, r#"{"extents": [[70000, 5], [0, 4096]]}"#)?;
        let c = ExtentsFile::new(p.clone()).changed(geo, &Digest([0; 32]))?;
        assert_eq!(c.ranges(), &[(0, 2)]);
        std::fs::write(&p, r#"{"extents": [[0, 1], [524288, 1]]}"#)?;
        let e = ExtentsFile::new(p.clone())
            .changed(geo, &Digest([0; 32]))
            .expect_err("past the end");
        assert!(
            e.to_string().contains("c.json") && e.to_string().contains("past the end"),
            "{e}"
        );
        assert!(!e.is_retryable());
        std::fs::write(&p, r#"{"ranges": []}"#)?;
        let e = ExtentsFile::new(p.clone())
            .changed(geo, &Digest([0; 32]))
            .expect_err("wrong shape");
        assert!(e.to_string().contains("not {\"extents\""), "{e}");
        let e = ExtentsFile::new(dir.path().join("absent"))
            .changed(geo, &Digest([0; 32]))
            .expect_err("absent");
        assert!(e.to_string().contains("cannot open change list"), "{e}");
        Ok(())
    }
}
