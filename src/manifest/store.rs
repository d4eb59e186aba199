//! Where manifests live: a state directory, memory, or nowhere, behind the one [`Store`] API.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::format::{self, Src, BUFFER_LEN};
use super::sink::{Sealed, Sink, Writeback};
use super::{Expect, ManifestError, Patch, Reader, Role, Unusable, Writer};
use crate::chunk::Geometry;
use crate::durable;

/// Where an agent keeps its manifests, one per [`Role`]. Cloning shares the store (the memory store's manifests
/// too).
#[derive(Clone)]
pub struct Store {
    inner: Inner,
    /// A state directory also holds the agent's block digests file (see [`super::BlockFile`]).
    block_digests: bool,
}

#[derive(Clone)]
enum Inner {
    Nothing,
    Dir(PathBuf),
    Memory(Arc<Memory>),
}

/// The memory store: the bytes a state directory would hold, at most `limit` per manifest.
pub(super) struct Memory {
    pub(super) limit: u64,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    source: Files,
    destination: Files,
}

/// A role's files in memory: the base, its changes, and a base set aside.
#[derive(Default, Clone)]
pub(super) struct Files {
    pub(super) base: Option<Arc<[u8]>>,
    pub(super) changes: Option<Arc<[u8]>>,
    pub(super) aside: Option<Arc<[u8]>>,
}

impl Memory {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic while holding the lock cannot leave a slot half-written: each is replaced whole.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes `role`'s files under the lock.
    pub(super) fn with<T>(&self, role: Role, f: impl FnOnce(&mut Files) -> T) -> T {
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
            block_digests: false,
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
            block_digests: true,
        })
    }

    /// This store without block digests files (`--block-digests off`): none is kept, and those of both roles left
    /// in its state directory are removed (their space freed; a sync then reads what it reads without them).
    pub fn without_block_digests(mut self) -> Self {
        for role in [Role::Source, Role::Destination] {
            let Some(path) = self.blocks_path(role) else {
                continue;
            };
            match durable::remove_file(&path) {
                Ok(()) => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        self.block_digests = false;
        self
    }

    /// Manifests kept in memory, for a long-running agent without a state directory: the same bytes as the file,
    /// one per role; a manifest whose file would exceed `limit_bytes` is not kept.
    pub fn memory(limit_bytes: u64) -> Self {
        Store {
            inner: Inner::Memory(Arc::new(Memory {
                limit: limit_bytes,
                slots: Mutex::default(),
            })),
            block_digests: false,
        }
    }

    /// The base file of `role`'s manifest in a state directory (`source.manifest`, `destination.manifest`).
    pub fn path(&self, role: Role) -> Option<PathBuf> {
        match &self.inner {
            Inner::Dir(dir) => Some(file_in(dir, role, Which::Base)),
            Inner::Nothing | Inner::Memory(_) => None,
        }
    }

    /// `role`'s block digests file in a state directory (`source.blocks`, ..., see [`super::BlockFile`]); `None`
    /// without one, or [`Store::without_block_digests`].
    pub fn blocks_path(&self, role: Role) -> Option<PathBuf> {
        let name = match role {
            Role::Source => "source.blocks",
            Role::Destination => "destination.blocks",
        };
        match &self.inner {
            Inner::Dir(dir) if self.block_digests => Some(dir.join(name)),
            Inner::Dir(_) | Inner::Nothing | Inner::Memory(_) => None,
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
                // Its block digests prove nothing without it (see `BlockFile`): removed to free their space.
                if let Some(path) = self.blocks_path(role) {
                    if let Err(e) = std::fs::remove_file(&path) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!("cannot remove {}: {e}", path.display());
                        }
                    }
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
pub(super) enum Which {
    /// Every digest and the page table.
    Base,
    /// The digests that differ from the base.
    Changes,
    /// The base, set aside while the destination writes its target.
    Aside,
}

/// `role`'s file `which` in `dir`.
pub(super) fn file_in(dir: &Path, role: Role, which: Which) -> PathBuf {
    dir.join(format!("{}.manifest{}", role.as_str(), which.suffix()))
}

impl Which {
    /// What follows the base file's name in this file's.
    pub(super) fn suffix(self) -> &'static str {
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
pub(super) fn trailer_of(path: &Path) -> Option<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let file = open_nofollow(path).ok()??;
    let len = file.metadata().ok()?.len();
    let mut t = [0u8; 32];
    file.read_exact_at(&mut t, len.checked_sub(32)?).ok()?;
    Some(t)
}

/// Creates a state directory (mode 0700, with its parents) unless it exists.
fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}
