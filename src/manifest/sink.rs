//! Where a manifest's bytes go while it is written, and how a sealed one is published: a temporary file beside the
//! role's files (written back as it grows, fsynced, renamed, the directory fsynced) or the memory store.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::store::{file_in, trailer_of, Files, Memory, Which};
use super::{ManifestError, Role};
use crate::durable;

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
