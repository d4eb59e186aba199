//! What the source offers before a session (its manifest, its change list) and what it announces once the
//! destination agreed on the kind of sync: every chunk, or only the chunks that differ from the base.

use std::sync::Arc;

use crate::changes::{ChangedChunks, Tracker};
use crate::chunk::{Digest, Geometry, VolumeDigest};
use crate::codec::{Fallback, Offer, SyncKind};
use crate::delta::{self, Policy};
use crate::error::{Error, Result};
use crate::manifest::{self, Expect, Meta, Patch, Reader, Role, Store, Writer};

/// What the source knows before it connects.
pub struct Plan {
    /// What HELLO offers.
    pub offer: Offer,
    /// The validated manifest of the image last synced, if any.
    base: Option<Reader>,
    /// The change list since that image, if a tracker gave one.
    changes: Option<ChangedChunks>,
    /// Why the tracker gave no change list (the session is then a full comparison).
    tracker_failure: Option<String>,
    store: Arc<Store>,
    identity: String,
    geometry: Geometry,
}

impl Plan {
    /// Loads the source's manifest and change list and decides what to offer. A manifest that cannot be used is
    /// logged and means a full comparison; a change list that cannot be read or names ranges past the volume is an
    /// error (a tracker's list that is wrong must not pass for an empty one), but a tracker that cannot answer
    /// ([`Error::Tracker`]) means a full comparison.
    pub fn prepare(
        store: Arc<Store>,
        tracker: Option<&dyn Tracker>,
        verify: &Policy,
        source: &str,
        geometry: Geometry,
    ) -> Result<Plan> {
        // This volume is a source now: a manifest this state directory kept while it was a destination describes
        // a target that has since been written (the failover), and must never be trusted again.
        store.invalidate(Role::Destination).map_err(state_error)?;
        let identity = delta::source_identity(source);
        let mut plan = Plan {
            offer: Offer::full(Fallback::SourceNoState),
            base: None,
            changes: None,
            tracker_failure: None,
            store: store.clone(),
            identity,
            geometry,
        };
        if !store.keeps_state() {
            return Ok(plan);
        }
        let expect = Expect {
            identity: plan.identity.clone(),
            geometry,
            stamp: 0,
        };
        let base = match store.load(Role::Source, &expect) {
            Ok(r) => r,
            Err(why) => {
                if why != manifest::Unusable::Missing {
                    tracing::warn!("ignoring the source's manifest: {why}");
                }
                plan.offer = Offer::full(Fallback::SourceNoManifest);
                return Ok(plan);
            }
        };
        let h = base.header();
        // The change list is asked for only against a usable base (without one every chunk is compared anyway).
        // A full comparison with a list still uses it: it tells which changed chunks the list missed.
        if let Some(t) = tracker {
            match t.changed(geometry, &h.volume_digest) {
                Ok(changes) => plan.changes = Some(changes),
                Err(Error::Tracker { tracker, reason }) => {
                    tracing::warn!("change tracker {tracker}: {reason}; running a full comparison");
                    plan.tracker_failure = Some(reason);
                }
                Err(e) => return Err(e),
            }
        }
        let due = verify.periodic_due(h.deltas_since_full, h.last_full_unix_ms, delta::now_ms());
        plan.offer = if verify.full_requested() {
            Offer::full(Fallback::SourceVerify)
        } else if due {
            Offer::full(Fallback::SourcePeriodic)
        } else if plan.tracker_failure.is_some() {
            Offer::full(Fallback::SourceTrackerFailed)
        } else {
            Offer {
                kind: if plan.changes.is_some() {
                    SyncKind::ChangeList
                } else {
                    SyncKind::Manifest
                },
                reason: Fallback::None,
                base: h.volume_digest,
            }
        };
        // Any session but a delta by change list reads every digest of the base: checked first, so that a damaged
        // one means a full comparison rather than a failure halfway through. A delta by change list reads only the
        // pages of the chunks it touches, and checks them as it reads them.
        let mut base = base;
        if plan.offer.kind != SyncKind::ChangeList {
            if let Err(e) = base.verify_all() {
                tracing::warn!("ignoring the source's manifest: damaged manifest: {e}");
                plan.offer = Offer::full(Fallback::SourceNoManifest);
                plan.changes = None;
                return Ok(plan);
            }
        }
        plan.base = Some(base);
        Ok(plan)
    }

    /// Why the tracker could not give a change list, if it failed.
    pub fn tracker_failure(&self) -> Option<&str> {
        self.tracker_failure.as_deref()
    }

    /// The announcer for a session of `kind` (the destination's answer to the offer).
    pub fn settle(self, kind: SyncKind) -> Result<Announcer> {
        if kind != SyncKind::Full && kind != self.offer.kind {
            return Err(Error::Protocol(format!(
                "READY asks for a {kind} sync; the source offered {}",
                self.offer.kind
            )));
        }
        let (mut base, selection, check) = match kind {
            // A full comparison with a change list also tells which changed chunks the list missed. It reads every
            // digest of a base that, offered for a delta by change list, was not checked whole: checked now, and
            // a damaged one costs the check, not the sync.
            SyncKind::Full if self.offer.kind == SyncKind::ChangeList => {
                match self.base.and_then(checked_whole) {
                    Some(base) => (Some(base), None, self.changes),
                    None => (None, None, None),
                }
            }
            SyncKind::Full if self.changes.is_some() => (self.base, None, self.changes),
            SyncKind::Full => (None, None, None),
            SyncKind::Manifest => (self.base, None, None),
            SyncKind::ChangeList => (self.base, self.changes, None),
        };
        let previous = base.as_ref().map(|b| {
            let h = b.header();
            (h.last_full_unix_ms, h.deltas_since_full)
        });
        // A delta keeps its next manifest as changes to the base; a full comparison writes it whole.
        let patch = match kind.is_delta() {
            true => base.take().map(|b| self.store.patch(b)),
            false => None,
        };
        let writer = match patch {
            Some(_) => None,
            None => match self
                .store
                .writer(Role::Source, self.geometry, &self.identity)
            {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!("the source's manifest will not be kept: {e}");
                    None
                }
            },
        };
        Ok(Announcer {
            kind,
            geometry: self.geometry,
            base,
            selection,
            check,
            cursor: 0,
            digest: VolumeDigest::new(self.geometry),
            writer,
            patch,
            store: self.store.clone(),
            sealed: None,
            missed: 0,
            started_ms: delta::now_ms(),
            previous,
            block_file: std::sync::OnceLock::new(),
        })
    }
}

/// `base` if every page of it holds what its page table says (already checked for any offer but a change list).
fn checked_whole(mut base: Reader) -> Option<Reader> {
    match base.verify_all() {
        Ok(()) => Some(base),
        Err(e) => {
            tracing::warn!(
                "the change list is not checked against the source's manifest: damaged manifest: {e}"
            );
            None
        }
    }
}

/// Turns what the scan found into what is announced, and keeps the next manifest.
pub struct Announcer {
    kind: SyncKind,
    geometry: Geometry,
    /// A full comparison's base (with a change list to check), read in chunk order alongside the scan.
    base: Option<Reader>,
    /// A delta's base, and the next manifest as changes to it.
    patch: Option<Patch>,
    store: Arc<Store>,
    /// The chunks to read (a change list), or all of them.
    selection: Option<ChangedChunks>,
    /// A change list to check against a full scan: chunks that differ from the base and are not in it.
    check: Option<ChangedChunks>,
    /// The next chunk whose final digest is not known yet.
    cursor: u64,
    digest: VolumeDigest,
    writer: Option<Writer>,
    /// The manifest written and fsynced under a temporary name, for the volume digest of our END.
    sealed: Option<(Digest, manifest::Sealed)>,
    missed: u64,
    started_ms: u64,
    /// The base's last full comparison and deltas since.
    previous: Option<(u64, u32)>,
    /// The block digests file, once opened.
    block_file: std::sync::OnceLock<Option<Arc<manifest::BlockFile>>>,
}

impl Announcer {
    /// Whether this session pushes blocks (BLOCKS): those its change list names, or those that differ from the
    /// base (see `source::push`).
    pub fn pushes(&self) -> bool {
        self.pushes_listed() || self.pushes_differing()
    }

    /// Whether this session pushes the blocks its change list names.
    pub fn pushes_listed(&self) -> bool {
        super::push::pushes(self.selection.as_ref())
    }

    /// Whether this delta by manifest pushes the blocks of a changed chunk whose digests differ from the base's
    /// (protocol 8): only with the base's block digests to compare with (a block digests file that held entries
    /// when the session opened it).
    pub fn pushes_differing(&self) -> bool {
        self.kind == SyncKind::Manifest && self.block_file().is_some_and(|f| !f.was_empty())
    }

    /// The block digests file of the source's state directory (see [`manifest::BlockFile`]), `None` without one
    /// or when it cannot be opened (logged: a delta by change list then reads listed chunks whole). Opened once
    /// per session.
    pub fn block_file(&self) -> Option<Arc<manifest::BlockFile>> {
        self.block_file
            .get_or_init(|| {
                manifest::BlockFile::in_store(&self.store, manifest::Role::Source, self.geometry)
            })
            .clone()
    }

    /// A delta's base block digests from `file`, each checked against the base before use (a second reader of
    /// the base: this one streams it alongside the scan).
    pub fn known_blocks(
        &mut self,
        file: &Arc<manifest::BlockFile>,
    ) -> Option<Arc<manifest::KnownBlocks>> {
        let base = self.patch.as_mut()?.base().try_clone().ok()?;
        Some(Arc::new(manifest::KnownBlocks::new(base, file.clone())))
    }

    /// Whether this session announces only chunks that differ from the base (a delta), not every chunk.
    pub fn is_delta(&self) -> bool {
        self.kind != SyncKind::Full
    }

    /// The chunks to read: a change list, or `None` for all.
    pub fn take_selection(&mut self) -> Option<ChangedChunks> {
        self.selection.take()
    }

    /// Takes the digests of scanned chunks (in increasing order) and returns those to announce: in a full
    /// comparison all, in a delta those that differ from the base. Chunks skipped before a scanned one (not in the
    /// change list) take the base's digest.
    pub fn feed(
        &mut self,
        scanned: impl IntoIterator<Item = (u64, Digest)>,
    ) -> Result<Vec<(u64, Digest)>> {
        let mut out = Vec::new();
        for (chunk, digest) in scanned {
            if let Some(patch) = &mut self.patch {
                let store = &self.store;
                let base = patch
                    .base()
                    .digest(chunk)
                    .map_err(|e| base_error(store, chunk, e))?;
                if base != digest {
                    out.push((chunk, digest));
                    patch
                        .set(chunk, digest)
                        .map_err(|e| base_error(store, chunk, e))?;
                }
                continue;
            }
            self.skip_to(chunk)?;
            let base = self.next_base()?;
            let differs = base != Some(digest);
            if let (Some(list), true, Some(_)) = (&self.check, differs, base) {
                if !list.contains(chunk) {
                    self.missed += 1;
                    if self.missed <= 8 {
                        tracing::warn!(
                            "chunk {chunk} changed but is not in the change list: repaired by this full comparison"
                        );
                    }
                }
            }
            if self.kind == SyncKind::Full || differs {
                out.push((chunk, digest));
            }
            self.settle(digest);
        }
        Ok(out)
    }

    /// All chunks are fed: the rest take the base's digests. Returns the volume digest for END.
    pub fn finish(&mut self) -> Result<Digest> {
        if let Some(patch) = &mut self.patch {
            let count = self.geometry.chunk_count();
            return patch
                .volume_digest()
                .map_err(|e| base_error(&self.store, count, e));
        }
        self.skip_to(self.geometry.chunk_count())?;
        Ok(self.digest.finish())
    }

    /// Chunks of a change list's sync that changed but were not in the list (found by a full comparison).
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Writes the manifest of the image the source announced (`volume_digest`, its END) and makes it durable under
    /// a temporary name, while the destination makes the target durable: only [`Announcer::commit`] makes it the
    /// source's manifest. A manifest that cannot be written is logged: the next sync is then a full comparison,
    /// which is slower, not wrong.
    pub fn seal(&mut self, volume_digest: Digest) {
        if self.writer.is_none() && self.patch.is_none() {
            return;
        }
        let (last_full, deltas) =
            delta::verification_after(self.kind, self.previous, self.started_ms);
        let meta = Meta {
            volume_digest,
            stamp: 0,
            kind: self.kind,
            last_full_unix_ms: last_full,
            deltas_since_full: deltas,
        };
        let sealed = match (self.patch.take(), self.writer.take()) {
            (Some(patch), _) => patch.seal(meta),
            (None, Some(writer)) => writer.seal(meta),
            (None, None) => return,
        };
        match sealed {
            Ok(sealed) => self.sealed = Some((volume_digest, sealed)),
            Err(e) => tracing::warn!("the source's manifest was not kept: {e}"),
        }
    }

    /// Keeps the manifest of the image both sides now hold (after a COMMIT equal to our END): the one sealed for
    /// `volume_digest`, published now.
    pub fn commit(&mut self, volume_digest: Digest) {
        if self.writer.is_some() || self.patch.is_some() {
            self.seal(volume_digest);
        }
        match self.sealed.take() {
            Some((sealed_for, sealed)) if sealed_for == volume_digest => {
                if let Err(e) = sealed.publish() {
                    tracing::warn!("the source's manifest was not kept: {e}");
                }
            }
            // Sealed for another image: dropped, so the previous manifest stays.
            Some(_) => {
                tracing::warn!("the source's manifest was not kept: it describes another image")
            }
            None => {}
        }
    }

    /// Chunks from the cursor up to `chunk` were not scanned: they take the base's digests, copied in bulk.
    fn skip_to(&mut self, chunk: u64) -> Result<()> {
        if self.cursor >= chunk {
            return Ok(());
        }
        let Some(base) = &mut self.base else {
            return Err(Error::Protocol(format!(
                "chunk {} was not scanned and there is no base",
                self.cursor
            )));
        };
        let from = self.cursor;
        manifest::copy_base(base, chunk - from, &mut self.digest, &mut self.writer)
            .map_err(|e| base_error(&self.store, from, e))?;
        self.cursor = chunk;
        Ok(())
    }

    fn next_base(&mut self) -> Result<Option<Digest>> {
        match &mut self.base {
            Some(r) => r
                .next_digest()
                .map(Some)
                .map_err(|e| base_error(&self.store, self.cursor, e)),
            None => Ok(None),
        }
    }

    fn settle(&mut self, digest: Digest) {
        self.digest.push(&digest);
        if let Some(w) = &mut self.writer {
            if let Err(e) = w.push(&digest) {
                tracing::warn!("the source's manifest will not be kept: {e}");
                self.writer = None;
            }
        }
        self.cursor += 1;
    }
}

/// A delta's base that cannot be read at `chunk` (damaged or changed on disk since it was validated): dropped from
/// `store`, so that the retry compares in full.
fn base_error(store: &Store, chunk: u64, e: std::io::Error) -> Error {
    if let Err(e) = store.invalidate(Role::Source) {
        tracing::warn!("cannot drop the source's manifest: {e}");
    }
    Error::ManifestDamaged(format!("the source's, at chunk {chunk}: {e}"))
}

/// A state directory that cannot be used is a configuration problem for someone to fix.
pub fn state_error(e: manifest::ManifestError) -> Error {
    Error::State(e.to_string())
}
