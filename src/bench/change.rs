//! The change between two syncs: written into the volume, described as the byte ranges it wrote (the change list
//! `source --changed-extents` reads), and undone on the target, so that several incremental syncs of one change
//! (stateless, with manifests, with a change list, through a delaying proxy) all start from the same state.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;

use blockmover::sample;

use super::files::durable;
use super::report::trim_float;
use super::BenchArgs;

const BLOCK: u64 = 4096;

/// Writes the change for rate `percent` (the `index`-th change of the run) into the volume; returns the distinct
/// 4 KiB blocks written, sorted.
pub fn apply(
    args: &BenchArgs,
    volume: &Path,
    size: u64,
    percent: f64,
    index: u64,
) -> anyhow::Result<Vec<u64>> {
    let rate = percent / 100.0;
    let clustered = rate * args.clustered_share;
    let scattered = rate - clustered;
    let mut blocks = Vec::new();
    let content = sample::Content {
        text_share: args.change_text_share,
    };
    if scattered > 0.0 {
        let seed = args.seed.wrapping_add(1 + index);
        blocks.extend(sample::scattered_change_of(volume, size, scattered, seed, content)?.blocks);
    }
    if clustered > 0.0 {
        let seed = args.seed.wrapping_add(1001 + index);
        blocks.extend(
            sample::clustered_change_of(volume, size, clustered, args.run_blocks, seed, content)?
                .blocks,
        );
    }
    blocks.sort_unstable();
    blocks.dedup();
    debug_assert!(blocks.last().is_none_or(|b| *b < size.div_ceil(BLOCK)));
    Ok(blocks)
}

/// `1% of 4 KiB blocks: scattered 4 KiB writes`, with the clustered share when there is one.
pub fn describe(args: &BenchArgs, rates: &[f64]) -> String {
    let rates = rates
        .iter()
        .map(|r| format!("{}%", trim_float(*r)))
        .collect::<Vec<_>>()
        .join(", ");
    let runs = match args.run_blocks {
        (min, max) if min == max => format!("{min}"),
        (min, max) => format!("{min}-{max}"),
    };
    let how = if args.clustered_share <= 0.0 {
        "scattered 4 KiB writes".to_owned()
    } else {
        format!(
            "{:.0}% scattered 4 KiB writes, {:.0}% in runs of {runs} blocks",
            (1.0 - args.clustered_share) * 100.0,
            args.clustered_share * 100.0,
        )
    };
    let content = match args.change_text_share {
        t if t <= 0.0 => "random bytes".to_owned(),
        t => format!("{:.0}% of the writes text, the rest random", t * 100.0),
    };
    format!("{rates} of 4 KiB blocks, {how}; {content}")
}

/// The byte ranges `(offset, length)` of sorted, distinct `blocks`, adjacent blocks merged, the last clipped to
/// `size`.
pub fn extents(blocks: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        let (at, end) = (b * BLOCK, ((b + 1) * BLOCK).min(size));
        match out.last_mut() {
            Some((o, l)) if *o + *l == at => *l = end - *o,
            _ => out.push((at, end - at)),
        }
    }
    out
}

/// Writes `{"extents": [[offset, length], ...]}` to `path`: the change list a tracker would hand the source.
pub fn write_extents(path: &Path, extents: &[(u64, u64)]) -> anyhow::Result<()> {
    let json = serde_json::json!({ "extents": extents });
    std::fs::write(path, serde_json::to_vec(&json)?)
        .with_context(|| format!("cannot write the change list {}", path.display()))
}

/// What a sync of one change did to the target and the state directories, undoable: the target's bytes in the
/// changed ranges before the sync (kept in a file, not in memory), its mtime (a destination's manifest is stale
/// when the target file's mtime moved), and copies of the state directories.
pub struct Rollback {
    target: PathBuf,
    extents: Vec<(u64, u64)>,
    saved: PathBuf,
    mtime: SystemTime,
    states: Vec<(PathBuf, PathBuf)>,
}

impl Rollback {
    /// Keeps what the target holds in `extents` (those are the only bytes a sync of the change can alter: the
    /// target equals the volume before the change), its mtime, and a copy of each of `states`, in `aside`.
    pub fn take(
        target: &Path,
        extents: Vec<(u64, u64)>,
        states: &[&Path],
        aside: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(aside)?;
        let saved = aside.join("rollback.bin");
        let file =
            File::open(target).with_context(|| format!("cannot open {}", target.display()))?;
        let mtime = file.metadata()?.modified()?;
        let mut out = BufWriter::new(File::create(&saved)?);
        let mut buf = vec![0u8; 1 << 20];
        for &(at, len) in &extents {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at + done)?;
                out.write_all(&buf[..n])?;
                done += n as u64;
            }
        }
        out.flush()?;
        let mut copies = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let copy = aside.join(format!("state-{i}"));
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(state, &copy)?;
            copies.push((state.to_path_buf(), copy));
        }
        Ok(Rollback {
            target: target.to_owned(),
            extents,
            saved,
            mtime,
            states: copies,
        })
    }

    /// Puts the target's bytes, its mtime and the state directories back as they were when taken (fsynced, outside
    /// the timed part).
    pub fn restore(&self) -> anyhow::Result<()> {
        let file = File::options()
            .write(true)
            .open(&self.target)
            .with_context(|| format!("cannot open {}", self.target.display()))?;
        let mut saved = std::io::BufReader::new(File::open(&self.saved)?);
        let mut buf = vec![0u8; 1 << 20];
        for &(at, len) in &self.extents {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                saved.read_exact(&mut buf[..n])?;
                file.write_all_at(&buf[..n], at + done)?;
                done += n as u64;
            }
        }
        file.sync_all()?;
        file.set_modified(self.mtime)
            .with_context(|| format!("cannot set the mtime of {}", self.target.display()))?;
        drop(file);
        durable(&self.target)?;
        for (live, copy) in &self.states {
            match std::fs::remove_dir_all(live) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot clear {}", live.display()))
                }
                _ => {}
            }
            copy_dir(copy, live)?;
        }
        Ok(())
    }

    /// Removes what was kept.
    pub fn discard(self) -> anyhow::Result<()> {
        std::fs::remove_file(&self.saved)?;
        for (_, copy) in &self.states {
            std::fs::remove_dir_all(copy)?;
        }
        Ok(())
    }
}

/// Copies the directory tree `from` to `to` (regular files and directories), each file fsynced.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("cannot copy {}", src.display()))?;
            durable(&dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_merge_into_extents_clipped_to_the_volume() {
        assert_eq!(extents(&[], 1 << 20), vec![]);
        assert_eq!(
            extents(&[0, 1, 2, 5, 7, 8], 1 << 20),
            vec![(0, 3 * 4096), (5 * 4096, 4096), (7 * 4096, 2 * 4096)]
        );
        assert_eq!(extents(&[2], 2 * 4096 + 100), vec![(2 * 4096, 100)]);
    }

    #[test]
    fn a_rollback_puts_back_the_bytes_the_mtime_and_the_state() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let target = dir.path().join("t.img");
        std::fs::write(&target, vec![1u8; 64 << 10])?;
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("sub"))?;
        std::fs::write(state.join("sub/m"), b"before")?;
        let mtime = std::fs::metadata(&target)?.modified()?;
        let back = Rollback::take(
            &target,
            extents(&[1, 2, 9], 64 << 10),
            &[&state],
            &dir.path().join("aside"),
        )?;
        let f = File::options().write(true).open(&target)?;
        f.write_all_at(&[9u8; 4096 * 2], 4096)?;
        f.write_all_at(&[9u8; 4096], 9 * 4096)?;
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))?;
        drop(f);
        std::fs::write(state.join("sub/m"), b"after")?;
        std::fs::write(state.join("new"), b"x")?;
        back.restore()?;
        assert_eq!(std::fs::read(&target)?, vec![1u8; 64 << 10]);
        assert_eq!(std::fs::metadata(&target)?.modified()?, mtime);
        assert_eq!(std::fs::read(state.join("sub/m"))?, b"before");
        assert!(!state.join("new").exists());
        back.discard()?;
        assert!(!dir.path().join("aside/rollback.bin").exists());
        Ok(())
    }
}
