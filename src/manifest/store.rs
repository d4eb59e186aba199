//! Where manifests live: a state directory, memory, or nowhere, behind the one [`Store`] API.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::format::{self, Src, BUFFER_LEN};
use super::{Expect, ManifestError, Patch, Reader, Role, Unusable, Writer};
use crate::chunk::Geometry;
use crate::durable;

/// Where an agent keeps its manifests, one per [`Role`]. Cloning shares the store (the memory store's manifests
/// too).
#[derive(Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Nothing,
    Dir(PathBuf),
    Memory(Arc<Memory>),
}

/// The memory store: the bytes a state directory would hold, at most `limit` per manifest.
pub(super) struct Memory {
    limit: u64,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    source: Files,
    destination: Files,
}

/// A role's files in memory: the base, its changes, and a base set aside.
#[derive(Default, Clone)]
struct Files {
    base: Option<Arc<[u8]>>,
    changes: Option<Arc<[u8]>>,
    aside: Option<Arc<[u8]>>,
}

impl Memory {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic while holding the lock cannot leave a slot half-written: each is replaced whole.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes `role`'s files under the lock.
    fn with<T>(&self, role: Role, f: impl FnOnce(&mut Files) -> T) -> T {
        let mut slots = self.slots();
        match role {
            Role::Source => f(&mut slots.source),
            Role::Destination => f(&mut slots.destination),
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Nothing => f.write_str("Store::None"),
            Inner::Dir(dir) => write!(f, "Store::Dir({})", dir.display()),
            Inner::Memory(m) => write!(f, "Store::Memory {{ limit: {} }}", m.limit),
        }
    }
}

impl Store {
    /// No state: [`Store::load`] finds [`Unusable::Missing`], commits and invalidations do nothing.
    pub fn none() -> Self {
        Store {
            inner: Inner::Nothing,
        }
    }

    /// Whether this store keeps manifests at all (a state directory or memory).
    pub fn keeps_state(&self) -> bool {
        !matches!(self.inner, Inner::Nothing)
    }

    /// Manifests in the state directory `path`, created (mode 0700, with its parents) if absent. Fails now, naming
    /// the directory, if it cannot be created or written, rather than at the end of the first sync.
    pub fn dir(path: impl Into<PathBuf>) -> Result<Self, ManifestError> {
        let path = path.into();
        create_dir(&path)
            .and_then(|()| durable::check_dir_writable(&path))
            .map_err(|source| ManifestError::StateDir {
                path: path.clone(),
                source,
            })?;
        Ok(Store {
            inner: Inner::Dir(path),
        })
    }

    /// Manifests kept in memory, for a long-running agent without a state directory: the same bytes as the file,
    /// one per role; a manifest whose file would exceed `limit_bytes` is not kept.
    pub fn memory(limit_bytes: u64) -> Self {
        Store {
            inner: Inner::Memory(Arc::new(Memory {
                limit: limit_bytes,
                slots: Mutex::default(),
            })),
        }
    }

    /// The base file of `role`'s manifest in a state directory (`source.manifest`, `destination.manifest`).
    pub fn path(&self, role: Role) -> Option<PathBuf> {
        match &self.inner {
            Inner::Dir(dir) => Some(file_in(dir, role, Which::Base)),
            Inner::Nothing | Inner::Memory(_) => None,
        }
    }

    /// The source's block digests file in a state directory (`source.blocks`, see [`super::BlockFile`]).
    pub fn blocks_path(&self) -> Option<PathBuf> {
        match &self.inner {
            Inner::Dir(dir) => Some(dir.join("source.blocks")),
            Inner::Nothing | Inner::Memory(_) => None,
        }
    }

    /// The changes file of `role`'s manifest in a state directory (`source.manifest.changes`, ...).
    pub fn changes_path(&self, role: Role) -> Option<PathBuf> {
        match &self.inner {
            Inner::Dir(dir) => Some(file_in(dir, role, Which::Changes)),
            Inner::Nothing | Inner::Memory(_) => None,
        }
    }

    /// `role`'s manifest, if it is whole and describes `expect` (see [`Unusable`] for every other case). Checks
    /// the base file's header, length, checksum and page table, and the changes file whole; the digests are
    /// checked page by page as they are read (a caller that reads them all can check them first with
    /// [`Reader::verify_all`]).
    pub fn load(&self, role: Role, expect: &Expect) -> Result<Reader, Unusable> {
        let (base, changes) = match &self.inner {
            Inner::Nothing => return Err(Unusable::Missing),
            Inner::Memory(m) => {
                let files = m.with(role, |f| f.clone());
                let base = files.base.ok_or(Unusable::Missing)?;
                let base = format::open_base(Src::Memory(base))?;
                let changes = match files.changes {
                    Some(c) => format::open_changes(Src::Memory(c), &base)?.ok_or(()),
                    None => Err(()),
                };
                (base, changes.ok())
            }
            Inner::Dir(dir) => {
                let path = file_in(dir, role, Which::Base);
                let base = open_nofollow(&path)?.ok_or(Unusable::Missing)?;
                let base = format::open_base(Src::File(base)).map_err(|u| u.at(&path))?;
                let path = file_in(dir, role, Which::Changes);
                let changes = match open_nofollow(&path)? {
                    None => None,
                    Some(file) => {
                        let changes = format::open_changes(Src::File(file), &base)
                            .map_err(|u| u.at(&path))?;
                        if changes.is_none() {
                            tracing::info!(
                                "ignoring {}: it applies to an earlier base, which was since rewritten",
                                path.display()
                            );
                        }
                        changes
                    }
                };
                (base, changes)
            }
        };
        let reader = Reader::new(base, changes);
        format::check_expected(reader.header(), role, expect).map_err(|u| {
            match self.path(role) {
                Some(path) => u.at(&path),
                None => u,
            }
        })?;
        Ok(reader)
    }

    /// The next manifest as changes to `base` (loaded from this store), for a delta.
    pub fn patch(&self, base: Reader) -> Patch {
        Patch::new(base, self.clone())
    }

    /// A writer of `role`'s next manifest, of a volume of `geometry`; `identity` (at most
    /// [`super::MAX_IDENTITY_LEN`] bytes) is what it describes, the string a later [`Expect`] must match.
    pub fn writer(
        &self,
        role: Role,
        geometry: Geometry,
        identity: &str,
    ) -> Result<Writer, ManifestError> {
        Writer::new(role, geometry, identity, |header_len, file_len| {
            let placeholder = vec![0u8; header_len as usize];
            match &self.inner {
                Inner::Nothing => Ok(Sink::Nothing),
                Inner::Memory(memory) => {
                    let buf = (file_len <= memory.limit).then(|| {
                        let mut buf = Vec::with_capacity(file_len as usize);
                        buf.extend_from_slice(&placeholder);
                        buf
                    });
                    Ok(Sink::Memory {
                        memory: Arc::clone(memory),
                        buf,
                        file_len,
                    })
                }
                Inner::Dir(dir) => {
                    let path = file_in(dir, role, Which::Base);
                    // A state directory removed while the agent runs is made again: removing it forgets the state.
                    let opened = create_dir(dir)
                        .and_then(|()| durable::create_temp(&path))
                        .and_then(|tmp| {
                            let mut out = BufWriter::with_capacity(BUFFER_LEN, tmp);
                            out.write_all(&placeholder)?;
                            Ok(out)
                        });
                    match opened {
                        Ok(out) => Ok(Sink::File {
                            out,
                            path,
                            writeback: Writeback::default(),
                        }),
                        Err(source) => Err(ManifestError::Write { path, source }),
                    }
                }
            }
        })
    }

    /// Writes a changes file (`body`, complete) and makes it durable under a temporary name; publishing it also
    /// puts back the base set aside if it is the one whose checksum is `base_checksum`.
    pub(super) fn seal_changes(
        &self,
        role: Role,
        body: Vec<u8>,
        base_checksum: [u8; 32],
    ) -> Result<Sealed, ManifestError> {
        match &self.inner {
            Inner::Nothing => Ok(Sealed::Nothing),
            Inner::Memory(memory) if body.len() as u64 > memory.limit => Ok(Sealed::TooLarge {
                memory: Arc::clone(memory),
                role,
                file_len: body.len() as u64,
            }),
            Inner::Memory(memory) => Ok(Sealed::MemoryChanges {
                memory: Arc::clone(memory),
                role,
                buf: body,
                base_checksum,
            }),
            Inner::Dir(dir) => {
                let path = file_in(dir, role, Which::Changes);
                let written = create_dir(dir)
                    .and_then(|()| durable::create_temp(&path))
                    .and_then(|mut tmp| {
                        tmp.write_all(&body)?;
                        tmp.as_file().sync_all()?;
                        Ok(tmp)
                    });
                match written {
                    Ok(tmp) => Ok(Sealed::Changes {
                        tmp,
                        dir: dir.clone(),
                        role,
                        base_checksum,
                    }),
                    Err(source) => Err(ManifestError::Write { path, source }),
                }
            }
        }
    }

    /// Forgets `role`'s manifest durably (its base, changes and a base set aside), so that it is not trusted
    /// after a change it does not describe. The base goes first, on its own: without it nothing is usable.
    pub fn invalidate(&self, role: Role) -> Result<(), ManifestError> {
        match &self.inner {
            Inner::Nothing => Ok(()),
            Inner::Memory(m) => {
                m.with(role, |f| *f = Files::default());
                Ok(())
            }
            Inner::Dir(dir) => {
                for which in [Which::Base, Which::Changes, Which::Aside] {
                    let path = file_in(dir, role, which);
                    durable::remove_file(&path)
                        .map_err(|source| ManifestError::Remove { path, source })?;
                }
                Ok(())
            }
        }
    }

    /// Before the destination first writes its target in a session: its manifest no longer describes the target,
    /// so the base is set aside (renamed, durably), which makes the manifest unusable. A delta's [`Patch`] still
    /// reads it through the descriptor it holds, and publishing the patch's changes file puts it back; a crash
    /// before that leaves no base, so the next sync compares in full.
    pub fn set_aside(&self, role: Role) -> Result<(), ManifestError> {
        match &self.inner {
            Inner::Nothing => Ok(()),
            Inner::Memory(m) => {
                m.with(role, |f| {
                    if let Some(base) = f.base.take() {
                        f.aside = Some(base);
                    }
                });
                Ok(())
            }
            Inner::Dir(dir) => {
                let (base, aside) = (
                    file_in(dir, role, Which::Base),
                    file_in(dir, role, Which::Aside),
                );
                // No base (or no directory: someone removed it) is nothing to set aside.
                match std::fs::rename(&base, &aside) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    moved => moved.and_then(|()| File::open(dir)?.sync_all()),
                }
                .map_err(|source| ManifestError::Remove { path: base, source })
            }
        }
    }
}

/// The files of a role's manifest.
#[derive(Clone, Copy)]
enum Which {
    /// Every digest and the page table.
    Base,
    /// The digests that differ from the base.
    Changes,
    /// The base, set aside while the destination writes its target.
    Aside,
}

/// `role`'s file `which` in `dir`.
fn file_in(dir: &Path, role: Role, which: Which) -> PathBuf {
    dir.join(format!("{}.manifest{}", role.as_str(), which.suffix()))
}

impl Which {
    /// What follows the base file's name in this file's.
    fn suffix(self) -> &'static str {
        match self {
            Which::Base => "",
            Which::Changes => ".changes",
            Which::Aside => ".aside",
        }
    }
}

/// Opens `path` for reading without following a symbolic link; `None` if there is none.
fn open_nofollow(path: &Path) -> Result<Option<File>, Unusable> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path);
    match opened {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Unusable::Unreadable(e.to_string()).at(path)),
    }
}

/// The last 32 bytes of the file at `path` (a base's checksum), `None` if it cannot be read.
fn trailer_of(path: &Path) -> Option<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let file = open_nofollow(path).ok()??;
    let len = file.metadata().ok()?.len();
    let mut t = [0u8; 32];
    file.read_exact_at(&mut t, len.checked_sub(32)?).ok()?;
    Some(t)
}

/// Where a [`Writer`] puts its bytes: the header's placeholder is already there, then the digests.
pub(super) enum Sink {
    /// [`Store::none`]: nothing is written or checked.
    Nothing,
    /// A temporary file beside `path`, removed if the writer drops.
    File {
        out: BufWriter<tempfile::NamedTempFile>,
        path: PathBuf,
        writeback: Writeback,
    },
    /// The memory store's next manifest; `None` once it would exceed the limit.
    Memory {
        memory: Arc<Memory>,
        buf: Option<Vec<u8>>,
        file_len: u64,
    },
}

impl Sink {
    /// Whether this is [`Store::none`]'s sink.
    pub(super) fn is_nothing(&self) -> bool {
        matches!(self, Sink::Nothing)
    }

    /// Appends digest bytes.
    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        match self {
            Sink::Nothing | Sink::Memory { buf: None, .. } => Ok(()),
            Sink::Memory { buf: Some(buf), .. } => {
                buf.extend_from_slice(bytes);
                Ok(())
            }
            Sink::File {
                out,
                path,
                writeback,
            } => {
                out.write_all(bytes)
                    .map_err(|source| ManifestError::Write {
                        path: path.clone(),
                        source,
                    })?;
                writeback.wrote(out.get_ref().as_file(), bytes.len() as u64);
                Ok(())
            }
        }
    }

    /// Appends the trailer, writes the header over its placeholder and makes the bytes durable (for a file), ready
    /// for [`Sealed::publish`] to make them `role`'s manifest.
    pub(super) fn seal(
        self,
        role: Role,
        header: &[u8],
        trailer: &[u8],
    ) -> Result<Sealed, ManifestError> {
        match self {
            Sink::Nothing => Ok(Sealed::Nothing),
            Sink::Memory {
                memory,
                buf: None,
                file_len,
            } => Ok(Sealed::TooLarge {
                memory,
                role,
                file_len,
            }),
            Sink::Memory {
                memory,
                buf: Some(mut buf),
                ..
            } => {
                buf[..header.len()].copy_from_slice(header);
                buf.extend_from_slice(trailer);
                Ok(Sealed::Memory { memory, role, buf })
            }
            Sink::File { mut out, path, .. } => {
                let sealed = out
                    .write_all(trailer)
                    .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
                    .and_then(|mut tmp| {
                        let file: &mut File = tmp.as_file_mut();
                        file.seek(SeekFrom::Start(0))?;
                        file.write_all(header)?;
                        file.sync_all()?;
                        Ok(tmp)
                    });
                match sealed {
                    Ok(tmp) => Ok(Sealed::File { tmp, path }),
                    Err(source) => Err(ManifestError::Write { path, source }),
                }
            }
        }
    }
}

/// Bytes of a manifest being written after which the kernel is asked to start writing them back.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts the writeback of a large manifest while it is still being written, so that the fsync that seals it
/// waits only for the last [`WRITEBACK_STEP`] or so. A 1 TiB volume's manifest is 512 MiB: sealed at the end of a
/// delta by change list, its fsync alone took 2.5-3 s of a 4.7 s sync on this machine's disk. Only a hint: the
/// seal's fsync is what makes the file durable and reports write errors.
#[derive(Default)]
pub(super) struct Writeback {
    /// Digest bytes handed to the writer since the last hint.
    pending: u64,
    /// Digest bytes hinted so far: the next hint starts there, at or before the first byte not yet hinted (the
    /// header is not counted), and runs to the end of the file.
    from: u64,
}

impl Writeback {
    fn wrote(&mut self, file: &File, n: u64) {
        self.pending += n;
        if self.pending < WRITEBACK_STEP {
            return;
        }
        // SYNC_FILE_RANGE_WRITE starts writeback of the dirty pages of the range and returns without waiting;
        // a length of 0 means to the end of the file. Errors are left to the fsync.
        // (rustix has no sync_file_range.)
        // SAFETY: a plain syscall on a descriptor `file` keeps open for the call; it touches no memory of ours.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(file),
                self.from as libc::off64_t,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.from += self.pending;
        self.pending = 0;
    }
}

/// A manifest complete and durable (for a file) under a temporary name; [`Sealed::publish`] makes it the role's.
pub(super) enum Sealed {
    Nothing,
    TooLarge {
        memory: Arc<Memory>,
        role: Role,
        file_len: u64,
    },
    Memory {
        memory: Arc<Memory>,
        role: Role,
        buf: Vec<u8>,
    },
    MemoryChanges {
        memory: Arc<Memory>,
        role: Role,
        buf: Vec<u8>,
        base_checksum: [u8; 32],
    },
    File {
        tmp: tempfile::NamedTempFile,
        path: PathBuf,
    },
    Changes {
        tmp: tempfile::NamedTempFile,
        dir: PathBuf,
        role: Role,
        base_checksum: [u8; 32],
    },
}

impl Sealed {
    pub(super) fn publish(self) -> Result<(), ManifestError> {
        match self {
            Sealed::Nothing => Ok(()),
            Sealed::TooLarge {
                memory,
                role,
                file_len,
            } => {
                memory.with(role, |f| *f = Files::default());
                tracing::info!(
                    role = role.as_str(),
                    "the {} manifest ({file_len} bytes) is too large to keep in memory (limit {} bytes): the next \
                     sync compares in full; give the agent a --state-dir to keep manifests on disk",
                    role.as_str(),
                    memory.limit
                );
                Ok(())
            }
            Sealed::Memory { memory, role, buf } => {
                memory.with(role, |f| {
                    *f = Files {
                        base: Some(Arc::from(buf)),
                        ..Files::default()
                    }
                });
                Ok(())
            }
            Sealed::MemoryChanges {
                memory,
                role,
                buf,
                base_checksum,
            } => {
                memory.with(role, |f| {
                    f.changes = Some(Arc::from(buf));
                    if let Some(aside) = f.aside.take() {
                        if aside[aside.len().saturating_sub(32)..] == base_checksum {
                            f.base = Some(aside);
                        }
                    }
                });
                Ok(())
            }
            Sealed::File { tmp, path } => {
                durable::publish(tmp, &path, durable::Existing::Replace).map_err(|source| {
                    ManifestError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                // What described the previous base would pair with nothing now (a changes file names its base's
                // checksum); removed so that it does not linger.
                for which in [Which::Changes, Which::Aside] {
                    let mut stale = path.clone().into_os_string();
                    stale.push(which.suffix());
                    let stale = PathBuf::from(stale);
                    if let Err(e) = durable::remove_file(&stale) {
                        tracing::warn!("cannot remove {}: {e}", stale.display());
                    }
                }
                Ok(())
            }
            Sealed::Changes {
                tmp,
                dir,
                role,
                base_checksum,
            } => {
                let path = file_in(&dir, role, Which::Changes);
                durable::publish(tmp, &path, durable::Existing::Replace).map_err(|source| {
                    ManifestError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                // The changes are in place; the base they apply to goes back where it is read, if it was set aside.
                let (base, aside) = (
                    file_in(&dir, role, Which::Base),
                    file_in(&dir, role, Which::Aside),
                );
                match trailer_of(&aside) {
                    None => Ok(()),
                    Some(t) if t != base_checksum => {
                        // Left by an earlier base (a compaction that died before removing it): it pairs with
                        // nothing. Only without a base in place does the next sync compare in full.
                        if let Err(e) = durable::remove_file(&aside) {
                            tracing::warn!("cannot remove {}: {e}", aside.display());
                        }
                        if !base.exists() {
                            tracing::warn!(
                                "{} held another base than the new changes': the next sync compares in full",
                                aside.display()
                            );
                        }
                        Ok(())
                    }
                    Some(_) => std::fs::rename(&aside, &base)
                        .and_then(|()| File::open(&dir)?.sync_all())
                        .map_err(|source| ManifestError::Write { path: base, source }),
                }
            }
        }
    }
}

/// Creates a state directory (mode 0700, with its parents) unless it exists.
fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}
