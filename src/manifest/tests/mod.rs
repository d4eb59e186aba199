//! Unit tests of the manifest format and stores (state directories in `tempfile` directories).

mod changes;
mod versions;

use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use super::format::{encode_header, FIXED_HEADER_LEN};
use super::*;
use crate::chunk::VolumeDigest;

const IDENTITY: &str = "target=/dev/vdb uuid=1234";

/// A geometry of `chunks` chunks of 4 KiB, the last one short.
fn geometry(chunks: u64) -> Geometry {
    Geometry::new(chunks * 4096 - 100, 4096).expect("valid geometry")
}

/// Digest of chunk `i` in a volume seeded `seed`.
fn digest(seed: u64, i: u64) -> Digest {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..].copy_from_slice(&i.to_le_bytes());
    Digest::of(&b)
}

fn volume_digest(g: Geometry, seed: u64) -> Digest {
    let mut v = VolumeDigest::new(g);
    (0..g.chunk_count()).for_each(|i| v.push(&digest(seed, i)));
    v.finish()
}

fn meta(g: Geometry, seed: u64) -> Meta {
    Meta {
        volume_digest: volume_digest(g, seed),
        kind: SyncKind::Manifest,
        last_full_unix_ms: 1_700_000_000_123,
        deltas_since_full: 7,
        stamp: 99,
    }
}

/// Writes and commits the manifest of volume `seed` of geometry `g`.
fn write(store: &Store, role: Role, g: Geometry, identity: &str, seed: u64) -> anyhow::Result<()> {
    let mut w = store.writer(role, g, identity)?;
    for i in 0..g.chunk_count() {
        w.push(&digest(seed, i))?;
    }
    w.commit(meta(g, seed))?;
    Ok(())
}

/// Bytes of a format-3 base file of `chunks` chunks of [`geometry`] with [`IDENTITY`].
fn base_len(chunks: u64) -> u64 {
    let pages = crate::chunk::pages::Pages::new(geometry(chunks)).count();
    92 + IDENTITY.len() as u64 + 32 * chunks + 32 * pages + 32
}

fn expect(g: Geometry) -> Expect {
    Expect {
        identity: IDENTITY.into(),
        geometry: g,
        stamp: 99,
    }
}

/// Checks that `reader` streams exactly the digests of volume `seed`, then refuses to go further.
fn assert_streams(reader: &mut Reader, seed: u64) -> anyhow::Result<()> {
    for i in 0..reader.chunk_count() {
        assert_eq!(reader.next_digest()?, digest(seed, i), "chunk {i}");
    }
    let past = reader.next_digest().expect_err("past the end");
    assert_eq!(past.kind(), io::ErrorKind::InvalidInput);
    Ok(())
}

fn names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// Loads the destination manifest expecting `g`, which must fail.
fn unusable(store: &Store, g: Geometry) -> Unusable {
    match store.load(Role::Destination, &expect(g)) {
        Ok(_) => panic!("the manifest was accepted"),
        Err(u) => u,
    }
}

#[test]
fn round_trip_streams_the_digests_and_the_header_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(1000);
    write(&store, Role::Destination, g, IDENTITY, 1)?;

    let path = store
        .path(Role::Destination)
        .context("a dir store has paths")?;
    let file = std::fs::metadata(&path)?;
    assert_eq!(file.len(), base_len(1000));
    assert_eq!(file.mode() & 0o777, 0o600);
    assert_eq!(names(dir.path())?, ["destination.manifest"]);

    let mut reader = store.load(Role::Destination, &expect(g))?;
    let h = reader.header().clone();
    assert_eq!(h.role, Role::Destination);
    assert_eq!(h.geometry, g);
    assert_eq!(h.volume_digest, volume_digest(g, 1));
    assert_eq!(h.kind, SyncKind::Manifest);
    assert_eq!(h.last_full_unix_ms, 1_700_000_000_123);
    assert_eq!(h.deltas_since_full, 7);
    assert_eq!(h.identity, IDENTITY);
    assert!(
        h.written_unix_ms > 1_700_000_000_000,
        "{}",
        h.written_unix_ms
    );
    assert_streams(&mut reader, 1)?;
    Ok(())
}

#[test]
fn the_header_fields_sit_at_the_documented_offsets() {
    let g = Geometry::new(0x0102_0304_0506, 65536).expect("valid geometry");
    let h = Header {
        role: Role::Source,
        geometry: g,
        volume_digest: Digest([0xAB; 32]),
        written_unix_ms: 0x1111_2222_3333_4444,
        last_full_unix_ms: 0x5555_6666_7777_8888,
        deltas_since_full: 0x0A0B_0C0D,
        kind: SyncKind::ChangeList,
        stamp: 0x0102_0304_0506_0708,
        identity: "id".into(),
    };
    let b = encode_header(super::format::MAGIC, &h);
    assert_eq!(b.len(), FIXED_HEADER_LEN + 2);
    assert_eq!(&b[0..8], b"BMMANIF3");
    assert_eq!(b[8], 1);
    assert_eq!(&b[9..17], &0x0102_0304_0506u64.to_be_bytes());
    assert_eq!(&b[17..21], &65536u32.to_be_bytes());
    assert_eq!(&b[21..29], &g.chunk_count().to_be_bytes());
    assert_eq!(&b[29..61], &[0xAB; 32]);
    assert_eq!(&b[61..69], &0x1111_2222_3333_4444u64.to_be_bytes());
    assert_eq!(&b[69..77], &0x5555_6666_7777_8888u64.to_be_bytes());
    assert_eq!(&b[77..81], &[0x0A, 0x0B, 0x0C, 0x0D]);
    assert_eq!(b[81], 2);
    assert_eq!(&b[82..90], &0x0102_0304_0506_0708u64.to_be_bytes());
    assert_eq!(&b[90..92], &[0, 2]);
    assert_eq!(&b[92..], b"id");
}

#[test]
fn a_truncated_or_extended_file_is_damaged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(20);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let path = store.path(Role::Destination).context("path")?;
    let whole = std::fs::read(&path)?;
    let header_end = FIXED_HEADER_LEN + IDENTITY.len();
    for cut in [
        0,
        7,
        83,
        84,
        header_end - 1,
        header_end,
        header_end + 100,
        whole.len() - 1,
    ] {
        std::fs::write(&path, &whole[..cut])?;
        let u = unusable(&store, g);
        assert!(matches!(u, Unusable::Damaged(_)), "cut at {cut}: {u}");
    }
    let mut longer = whole.clone();
    longer.push(0);
    std::fs::write(&path, &longer)?;
    let u = unusable(&store, g);
    assert!(
        matches!(&u, Unusable::Damaged(why) if why.contains("announces")),
        "{u}"
    );
    std::fs::write(&path, &whole)?;
    store.load(Role::Destination, &expect(g))?;
    Ok(())
}

#[test]
fn any_flipped_bit_in_header_digests_or_trailer_is_damaged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(5);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let path = store.path(Role::Destination).context("path")?;
    let whole = std::fs::read(&path)?;
    let digests_at = FIXED_HEADER_LEN + IDENTITY.len();
    let digests = digests_at..digests_at + 32 * 5;
    for at in 0..whole.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = whole.clone();
            bad[at] ^= bit;
            std::fs::write(&path, &bad)?;
            let why = damage(&store, g);
            // The header, page table and trailer are checked on loading; a digest when its page is read.
            let expected = match digests.contains(&at) {
                true => "its digests do not give its value in the page table",
                false => "damaged manifest: ",
            };
            assert!(why.contains(expected), "byte {at} ^ {bit:#x}: {why}");
        }
    }
    // The sections by name, for a reader of the messages.
    for (at, why) in [
        (0, "bad magic"),
        (40, "checksum mismatch"),
        (
            digests_at + 33,
            "page 0 of the manifest: its digests do not give its value",
        ),
        (whole.len() - 40, "checksum mismatch"),
        (whole.len() - 1, "checksum mismatch"),
    ] {
        let mut bad = whole.clone();
        bad[at] ^= 0x10;
        std::fs::write(&path, &bad)?;
        let u = damage(&store, g);
        assert!(u.contains(why), "{u}");
        assert!(
            at == digests_at + 33 || u.contains("destination.manifest"),
            "{u}"
        );
    }
    Ok(())
}

/// Why the destination manifest in `store` is refused: on loading, or when every page is read.
fn damage(store: &Store, g: Geometry) -> String {
    match store.load(Role::Destination, &expect(g)) {
        Err(u) => u.to_string(),
        Ok(mut r) => match r.verify_all() {
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                e.to_string()
            }
            Ok(()) => panic!("the manifest was accepted"),
        },
    }
}

#[test]
fn a_manifest_of_the_other_role_is_foreign() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(8);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    std::fs::rename(
        store.path(Role::Source).context("path")?,
        store.path(Role::Destination).context("path")?,
    )?;
    let u = unusable(&store, g);
    assert_eq!(
        u,
        Unusable::Foreign(format!(
            "{}: written by the source, this is the destination",
            dir.path().join("destination.manifest").display()
        ))
    );
    Ok(())
}

#[test]
fn a_manifest_of_another_identity_is_foreign() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(8);
    write(&store, Role::Destination, g, "target=/dev/vdc", 1)?;
    let u = unusable(&store, g);
    assert!(
        matches!(&u, Unusable::Foreign(why) if why.contains("/dev/vdc")),
        "{u}"
    );
    Ok(())
}

#[test]
fn a_manifest_whose_object_changed_since_is_stale() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(8);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let later = Expect {
        stamp: 100,
        ..expect(g)
    };
    let u = store
        .load(Role::Destination, &later)
        .err()
        .context("stale")?;
    assert!(
        matches!(&u, Unusable::Stale(why) if why.contains("stamp was 99, it is 100")),
        "{u}"
    );
    assert!(store.load(Role::Destination, &expect(g)).is_ok());
    Ok(())
}

#[test]
fn a_manifest_of_another_volume_or_chunk_size_is_of_another_geometry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(8);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let bigger = Geometry::new(g.volume_size() + 1, 4096).expect("valid geometry");
    let coarser = Geometry::new(g.volume_size(), 8192).expect("valid geometry");
    for other in [bigger, coarser] {
        let u = unusable(&store, other);
        assert!(matches!(u, Unusable::Geometry(_)), "{other:?}: {u}");
    }
    store.load(Role::Destination, &expect(g))?;
    Ok(())
}

#[test]
fn commit_with_wrong_digest_count_is_refused_and_keeps_the_old_manifest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(10);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    for pushed in [9, 11] {
        let mut w = store.writer(Role::Destination, g, IDENTITY)?;
        for i in 0..pushed {
            w.push(&digest(2, i))?;
        }
        let err = w.commit(meta(g, 2)).expect_err("wrong count");
        assert!(
            matches!(err, ManifestError::Count { pushed: p, expected: 10 } if p == pushed),
            "{err}"
        );
    }
    assert_eq!(names(dir.path())?, ["destination.manifest"]);
    assert_streams(&mut store.load(Role::Destination, &expect(g))?, 1)?;
    Ok(())
}

#[test]
fn commit_with_a_volume_digest_that_does_not_match_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(10);
    let mut w = store.writer(Role::Source, g, IDENTITY)?;
    for i in 0..10 {
        w.push(&digest(1, i))?;
    }
    let err = w.commit(meta(g, 2)).expect_err("wrong digest");
    assert!(matches!(err, ManifestError::VolumeDigest { .. }), "{err}");
    assert!(names(dir.path())?.is_empty());
    Ok(())
}

#[test]
fn a_dropped_writer_leaves_nothing_behind() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(10);
    let mut w = store.writer(Role::Destination, g, IDENTITY)?;
    for i in 0..5 {
        w.push(&digest(1, i))?;
    }
    assert_eq!(names(dir.path())?.len(), 1, "the temporary while writing");
    drop(w);
    assert!(names(dir.path())?.is_empty());
    assert_eq!(unusable(&store, g), Unusable::Missing);
    Ok(())
}

#[test]
fn invalidate_removes_the_manifest_and_load_then_finds_none() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(4);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    write(&store, Role::Source, g, IDENTITY, 1)?;
    store.invalidate(Role::Destination)?;
    assert_eq!(names(dir.path())?, ["source.manifest"]);
    assert_eq!(unusable(&store, g), Unusable::Missing);
    assert_eq!(Unusable::Missing.to_string(), "no manifest");
    store.invalidate(Role::Destination)?;
    store.load(Role::Source, &expect(g))?;
    Ok(())
}

#[test]
fn a_reader_keeps_its_manifest_while_a_new_one_is_committed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(300);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let mut old = store.load(Role::Destination, &expect(g))?;
    write(&store, Role::Destination, g, IDENTITY, 2)?;
    assert_streams(&mut old, 1)?;
    assert_streams(&mut store.load(Role::Destination, &expect(g))?, 2)?;
    Ok(())
}

#[test]
fn a_file_changed_in_place_after_validation_fails_the_read_of_its_page() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(6);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let mut reader = store.load(Role::Destination, &expect(g))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(store.path(Role::Destination).context("path")?)?;
    file.seek(SeekFrom::Start(
        (FIXED_HEADER_LEN + IDENTITY.len() + 32) as u64,
    ))?;
    file.write_all(&[0xEE; 32])?;
    let err = reader.next_digest().expect_err("changed");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    Ok(())
}

#[test]
fn identities_longer_than_the_format_allows_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(2);
    let longest = "i".repeat(MAX_IDENTITY_LEN);
    write(&store, Role::Source, g, &longest, 1)?;
    let reader = store.load(
        Role::Source,
        &Expect {
            identity: longest.clone(),
            geometry: g,
            stamp: 99,
        },
    )?;
    assert_eq!(reader.header().identity, longest);
    let err = store
        .writer(Role::Source, g, &format!("{longest}x"))
        .err()
        .context("too long")?;
    assert!(
        matches!(err, ManifestError::IdentityTooLong { len: 4097 }),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_state_dir_is_created_private_and_an_unusable_one_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nested = dir.path().join("a/b");
    Store::dir(&nested)?;
    assert_eq!(
        std::fs::metadata(&nested)?.permissions().mode() & 0o777,
        0o700
    );
    assert!(names(&nested)?.is_empty(), "the probe is removed");

    let file = dir.path().join("file");
    std::fs::write(&file, b"x")?;
    let err = Store::dir(file.join("state")).expect_err("under a file");
    assert!(matches!(err, ManifestError::StateDir { .. }));
    assert!(err.to_string().starts_with(&format!(
        "cannot use state directory {}: ",
        file.join("state").display()
    )));
    Ok(())
}

#[test]
fn memory_store_round_trip_is_shared_by_its_clones() -> anyhow::Result<()> {
    let g = geometry(100);
    let store = Store::memory(1 << 20);
    assert_eq!(unusable(&store, g), Unusable::Missing);
    write(&store, Role::Destination, g, IDENTITY, 3)?;
    let mut reader = store.load(Role::Destination, &expect(g))?;
    assert_eq!(reader.header().volume_digest, volume_digest(g, 3));
    assert_eq!(reader.header().deltas_since_full, 7);
    assert_streams(&mut reader, 3)?;
    assert_eq!(store.path(Role::Destination), None);

    // The other role and the clone's view.
    assert_eq!(
        store.load(Role::Source, &expect(g)).err(),
        Some(Unusable::Missing)
    );
    let shared = store.clone();
    shared.invalidate(Role::Destination)?;
    assert_eq!(unusable(&store, g), Unusable::Missing);
    Ok(())
}

#[test]
fn memory_store_drops_a_manifest_over_its_limit() -> anyhow::Result<()> {
    let small = geometry(10);
    let big = geometry(11);
    let store = Store::memory(base_len(10));
    write(&store, Role::Destination, small, IDENTITY, 1)?;
    store.load(Role::Destination, &expect(small))?;
    // Over the limit: commit succeeds, nothing is kept, and the older manifest no longer stands for the image.
    write(&store, Role::Destination, big, IDENTITY, 1)?;
    assert_eq!(unusable(&store, big), Unusable::Missing);
    assert_eq!(unusable(&store, small), Unusable::Missing);
    Ok(())
}

#[test]
fn the_none_store_keeps_nothing() -> anyhow::Result<()> {
    let store = Store::none();
    let g = geometry(3);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    // Not even checked: there is nothing to protect.
    let w = store.writer(Role::Destination, g, IDENTITY)?;
    w.commit(meta(g, 9))?;
    assert_eq!(unusable(&store, g), Unusable::Missing);
    store.invalidate(Role::Destination)?;
    Ok(())
}

#[test]
fn a_mebi_digest_manifest_streams_through_a_fixed_buffer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(1 << 20);
    write(&store, Role::Source, g, IDENTITY, 5)?;
    let path = store.path(Role::Source).context("path")?;
    assert_eq!(std::fs::metadata(path)?.len(), base_len(1 << 20));
    assert_streams(&mut store.load(Role::Source, &expect(g))?, 5)?;
    Ok(())
}

#[test]
fn readers_writers_and_stores_can_move_to_blocking_threads() {
    fn send<T: Send + 'static>() {}
    fn shared<T: Send + Sync + 'static>() {}
    send::<Reader>();
    send::<Writer>();
    shared::<Store>();
}

#[test]
fn digests_written_and_read_in_bulk_are_the_ones_written_and_read_one_by_one() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(5000);
    let all: Vec<u8> = (0..g.chunk_count()).flat_map(|i| digest(3, i).0).collect();
    // Written in uneven runs, one digest among them, and more than the volume has (counted, then refused).
    let mut w = store.writer(Role::Source, g, IDENTITY)?;
    w.push_many(&all[..32 * 1000])?;
    w.push(&digest(3, 1000))?;
    w.push_many(&all[32 * 1001..])?;
    w.commit(meta(g, 3))?;
    let mut r = store.load(Role::Source, &expect(g))?;
    let mut back = vec![0u8; all.len()];
    let (head, rest) = back.split_at_mut(32 * 2048);
    r.next_digests(head)?;
    let (one, tail) = rest.split_at_mut(32);
    one.copy_from_slice(&r.next_digest()?.0);
    r.next_digests(tail)?;
    assert!(back == all, "the digests read in bulk differ");
    let past = r.next_digests(&mut [0u8; 32]).expect_err("past the end");
    assert_eq!(past.kind(), io::ErrorKind::InvalidInput);

    let mut r = store.load(Role::Source, &expect(g))?;
    let past = r
        .next_digests(&mut vec![0u8; all.len() + 32])
        .expect_err("a run past the end");
    assert_eq!(past.kind(), io::ErrorKind::InvalidInput);

    let mut w = store.writer(Role::Source, g, IDENTITY)?;
    w.push_many(&all)?;
    w.push(&digest(3, 0))?;
    assert!(w.commit(meta(g, 3)).is_err(), "one digest too many");
    Ok(())
}

#[test]
fn a_sealed_manifest_is_durable_under_a_temporary_name_and_replaces_the_old_one_only_when_published(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(300);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    let next = |seed: u64| -> anyhow::Result<Sealed> {
        let mut w = store.writer(Role::Source, g, IDENTITY)?;
        for i in 0..g.chunk_count() {
            w.push(&digest(seed, i))?;
        }
        Ok(w.seal(meta(g, seed))?)
    };
    // Dropped unpublished (the destination refused the sync): the old manifest stays, and no temporary is left.
    drop(next(2)?);
    assert_streams(&mut store.load(Role::Source, &expect(g))?, 1)?;
    assert_eq!(names(dir.path())?, vec!["source.manifest".to_owned()]);
    // Sealed: still the old one until published, then the new one.
    let sealed = next(3)?;
    assert_eq!(
        names(dir.path())?.len(),
        2,
        "the sealed temporary sits beside it"
    );
    assert_streams(&mut store.load(Role::Source, &expect(g))?, 1)?;
    sealed.publish()?;
    assert_streams(&mut store.load(Role::Source, &expect(g))?, 3)?;
    assert_eq!(names(dir.path())?, vec!["source.manifest".to_owned()]);
    Ok(())
}
