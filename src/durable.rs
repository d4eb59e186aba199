//! Files replaced atomically and durably: the status file, the trigger file, the key file ([`write_file`]), and
//! files streamed by their writer, such as manifests ([`create_temp`], then [`persist`]).
//!
//! A file is written to a temporary with a random name in the same directory, created with `O_CREAT|O_EXCL|
//! O_NOFOLLOW` and mode 0600 (never a predictable `<path>.tmp`: a user who can write the directory could plant a
//! symlink there and make this process, often root, overwrite what it points to), then fsynced, given its final
//! mode through its own descriptor, renamed over the path, and the directory is fsynced. A reader sees the old
//! file or the new one, never a torn one, and a crash leaves at worst a stray `.NAME.XXXXXX.tmp` beside it.
//! [`remove_file`] is the durable unlink: the directory is fsynced, so the file stays gone after a crash.
//!
//! Errors are the bare OS errors (`No such file or directory`, `Read-only file system`); callers add the path.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What [`write_file`] does when `path` already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically, by rename): the new file has the new mode whatever the old one had.
    Replace,
    /// Leave it and fail with [`io::ErrorKind::AlreadyExists`].
    Keep,
}

/// Writes `bytes` to `path` atomically and durably, with permissions `mode` (see the module doc).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> io::Result<()> {
    let mut tmp = create_temp(path)?;
    if mode != 0o600 {
        // Through the descriptor, so neither the umask nor a renamed path is involved.
        tmp.as_file()
            .set_permissions(Permissions::from_mode(mode))?;
    }
    tmp.as_file_mut().write_all(bytes)?;
    persist(tmp, path, existing)
}

/// A new empty temporary file (mode 0600) beside `path`, for a caller that streams the contents and then calls
/// [`persist`]; dropped unpersisted, it is removed.
pub fn create_temp(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    temp_in(parent_dir(path), path)
}

/// Fsyncs `tmp` (from [`create_temp`] on the same `path`), renames it to `path` and fsyncs the directory.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path, existing: Existing) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    publish(tmp, path, existing)
}

/// The second half of [`persist`], for a caller that fsynced `tmp` earlier (while it waited for something else):
/// renames it to `path` and fsyncs the directory.
pub fn publish(tmp: tempfile::NamedTempFile, path: &Path, existing: Existing) -> io::Result<()> {
    // On failure the temporary is removed when the returned handle drops.
    match existing {
        Existing::Replace => tmp.persist(path).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map_err(|e| e.error)?,
    };
    File::open(parent_dir(path))?.sync_all()
}

/// Removes `path` if it exists and fsyncs its directory (also when it was already absent: an earlier removal's
/// directory entry may not have reached the disk yet). A directory that is gone holds nothing to remove.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match File::open(parent_dir(path)) {
        Ok(dir) => dir.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Checks that files can be created in `dir` (creates a temporary there and removes it).
pub fn check_dir_writable(dir: &Path) -> io::Result<()> {
    temp_in(dir, Path::new("probe")).map(drop)
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A new temporary `.<name of path>.XXXXXX.tmp` in `dir`, mode 0600, removed on drop unless persisted.
fn temp_in(dir: &Path, path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or(path.as_os_str()));
    prefix.push(".");
    // `make_in` rather than `NamedTempFile::new_in`: the same random name and O_EXCL, plus O_NOFOLLOW, and the
    // OS error comes back as it is (`new_in` appends the temporary's path to its message).
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .make_in(dir, |p| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(p)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_replaced_file_gets_the_new_mode_and_leaves_no_temporary() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key.txt");
        std::fs::write(&path, b"old")?;
        std::fs::set_permissions(&path, Permissions::from_mode(0o666))?;
        let old_ino = std::fs::metadata(&path)?.ino();
        write_file(&path, b"new", 0o600, Existing::Replace)?;
        let meta = std::fs::metadata(&path)?;
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_ne!(meta.ino(), old_ino, "a new file, not the old one rewritten");
        assert_eq!(std::fs::read(&path)?, b"new");
        write_file(&path, b"public", 0o644, Existing::Replace)?;
        assert_eq!(std::fs::metadata(&path)?.mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "no temporary left"
        );
        Ok(())
    }

    #[test]
    fn keep_refuses_an_existing_file_and_leaves_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key.txt");
        std::fs::write(&path, b"old")?;
        let err = write_file(&path, b"new", 0o600, Existing::Keep).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path)?, b"old");
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "no temporary left"
        );
        Ok(())
    }

    #[test]
    fn remove_file_removes_and_tolerates_an_absent_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.manifest");
        std::fs::write(&path, b"x")?;
        remove_file(&path)?;
        assert!(!path.exists());
        remove_file(&path)?;
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }

    #[test]
    fn a_missing_directory_is_the_bare_os_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let gone = dir.path().join("gone");
        let err = check_dir_writable(&gone).expect_err("missing");
        assert_eq!(err.to_string(), "No such file or directory (os error 2)");
        let err =
            write_file(&gone.join("s.json"), b"x", 0o644, Existing::Replace).expect_err("missing");
        assert_eq!(err.raw_os_error(), Some(2));
        check_dir_writable(dir.path())?;
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            0,
            "the probe is removed"
        );
        Ok(())
    }
}
