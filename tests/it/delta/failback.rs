//! Issue 11, case 7: failover and failback with the same state directories. A (volume `a.img`, state `SA`) syncs
//! to B (`b.img`, `SB`); then both are written and B, the new primary, syncs back to A; later A, primary again,
//! syncs to B. Each swap must be a full comparison (each agent dropped the other role's manifest from its state
//! directory), the syncs in between deltas, and the two files equal after every sync.

use std::path::{Path, PathBuf};

use anyhow::Result;
use blockmover::sample::file_digest;

use super::{scattered, scribble, sync_files, End, Outcome, MIB, SOURCE_NO_MANIFEST};
use crate::common::{keygen, random_volume, sparse_file};

const VOLUME: u64 = 16 * MIB;

/// One site: its image, its state directory, a status file per role.
struct Site {
    image: PathBuf,
    state: String,
    source_status: PathBuf,
    destination_status: PathBuf,
}

impl Site {
    fn new(dir: &Path, name: &str) -> Site {
        Site {
            image: dir.join(format!("{name}.img")),
            state: dir
                .join(format!("state-{name}"))
                .to_string_lossy()
                .into_owned(),
            source_status: dir.join(format!("{name}-source-status.json")),
            destination_status: dir.join(format!("{name}-destination-status.json")),
        }
    }

    /// Which manifests its state directory holds: (source, destination), each with its block digests file.
    fn manifests(&self) -> [(bool, bool); 2] {
        let dir = Path::new(&self.state);
        let has = |name: &str| dir.join(name).exists();
        [
            (has("source.manifest"), has("source.blocks")),
            (has("destination.manifest"), has("destination.blocks")),
        ]
    }
}

/// `from` -> `to`, both with their state directories; afterwards both images are equal.
fn sync(psk: &Path, from: &Site, to: &Site) -> Result<Outcome> {
    let out = sync_files(
        psk,
        End {
            path: &from.image,
            status: &from.source_status,
            flags: &["--state-dir", &from.state],
        },
        End {
            path: &to.image,
            status: &to.destination_status,
            flags: &["--state-dir", &to.state],
        },
    )?;
    assert_eq!(
        file_digest(&to.image, VOLUME)?,
        file_digest(&from.image, VOLUME)?,
        "{} differs from {} after the sync",
        to.image.display(),
        from.image.display()
    );
    println!(
        "{} -> {}: {} {}",
        from.image.display(),
        to.image.display(),
        out.kind(),
        out.reason()
    );
    // The source holds only its source manifest, the destination only its destination manifest: a role swap
    // removes the other role's block digests with its manifest.
    let (yes, no) = ((true, true), (false, false));
    assert_eq!(from.manifests(), [yes, no], "{}", from.state);
    assert_eq!(to.manifests(), [no, yes], "{}", to.state);
    Ok(out)
}

#[test]
fn failback_compares_in_full_each_time_the_roles_swap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let (a, b) = (Site::new(dir.path(), "a"), Site::new(dir.path(), "b"));
    random_volume(&a.image, VOLUME, 0xde7_0001)?;
    sparse_file(&b.image, VOLUME)?;
    let mut seed = 0;
    let mut write = |site: &Site| -> Result<()> {
        seed += 1;
        scribble(&site.image, &scattered(VOLUME, 4, seed), seed)?;
        Ok(())
    };

    sync(&psk, &a, &b)?.expect_full(SOURCE_NO_MANIFEST);
    write(&a)?;
    sync(&psk, &a, &b)?.expect_delta("delta-manifest");

    // Failover: A goes on being written (its last writes never reach B), B becomes the primary and is written.
    write(&a)?;
    write(&b)?;
    write(&b)?;
    let back = sync(&psk, &b, &a)?;
    back.expect_full(SOURCE_NO_MANIFEST);
    // B's writes and A's unsent writes are all repaired: 8 blocks of B, 4 of A.
    assert_eq!(back.src("blocksSent"), 12, "{}", back.describe());
    write(&b)?;
    let out = sync(&psk, &b, &a)?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), 4, "{}", out.describe());

    // Failback: A is the primary again.
    write(&a)?;
    sync(&psk, &a, &b)?.expect_full(SOURCE_NO_MANIFEST);
    write(&a)?;
    sync(&psk, &a, &b)?.expect_delta("delta-manifest");
    Ok(())
}
