//! Patches: a delta's manifest kept as a changes file beside its base, compaction into a new base, the base set
//! aside while the destination writes, and every way the pair can be left wrong.

use anyhow::Context;

use super::*;

/// The digests of volume `seed` with `changed` chunks taken from volume `to`.
fn image(g: Geometry, seed: u64, to: u64, changed: &[u64]) -> Vec<Digest> {
    (0..g.chunk_count())
        .map(|i| match changed.contains(&i) {
            true => digest(to, i),
            false => digest(seed, i),
        })
        .collect()
}

fn flat(g: Geometry, ds: &[Digest]) -> Digest {
    let mut v = VolumeDigest::new(g);
    ds.iter().for_each(|d| v.push(d));
    v.finish()
}

/// Loads `role`'s manifest, sets `changed` to volume `to`'s digests, checks the patch's volume digest against the
/// flat one of the new image and commits it. Returns the new image.
fn patch_to(
    store: &Store,
    role: Role,
    g: Geometry,
    to: u64,
    changed: &[u64],
) -> anyhow::Result<Vec<Digest>> {
    let mut base = store.load(role, &expect(g))?;
    let mut now: Vec<Digest> = (0..g.chunk_count())
        .map(|i| base.digest(i))
        .collect::<io::Result<_>>()?;
    changed
        .iter()
        .for_each(|&c| now[c as usize] = digest(to, c));
    let mut patch = store.patch(base);
    for &c in changed {
        patch.set(c, digest(to, c))?;
    }
    let d = patch.volume_digest()?;
    assert_eq!(
        d,
        flat(g, &now),
        "the patch's volume digest is the flat one"
    );
    let mut m = meta(g, to);
    m.volume_digest = d;
    m.kind = SyncKind::ChangeList;
    patch.commit(m)?;
    Ok(now)
}

fn assert_holds(store: &Store, role: Role, g: Geometry, want: &[Digest]) -> anyhow::Result<()> {
    let mut r = store.load(role, &expect(g))?;
    r.verify_all()?;
    assert_eq!(r.header().volume_digest, flat(g, want));
    let mut all = vec![0u8; want.len() * 32];
    r.next_digests(&mut all)?;
    for (i, d) in want.iter().enumerate() {
        assert_eq!(&all[i * 32..i * 32 + 32], &d.0, "chunk {i}");
    }
    Ok(())
}

/// Changes at the edges: chunk 0 (in the page with the prefix), a digest across a page boundary (511), its
/// neighbours, and the last chunk.
const EDGES: [u64; 6] = [0, 510, 511, 512, 1500, 2999];

#[test]
fn a_delta_writes_a_changes_file_and_leaves_the_base_as_it_was() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(3000);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    let base_path = store.path(Role::Source).context("path")?;
    let base_bytes = std::fs::read(&base_path)?;

    let now = patch_to(&store, Role::Source, g, 2, &EDGES)?;
    assert_eq!(
        std::fs::read(&base_path)?,
        base_bytes,
        "the base is not rewritten"
    );
    assert_eq!(
        names(dir.path())?,
        ["source.manifest", "source.manifest.changes"]
    );
    let changes = std::fs::read(store.changes_path(Role::Source).context("path")?)?;
    let pages = crate::chunk::pages::Pages::new(g).count();
    assert_eq!(
        changes.len() as u64,
        92 + IDENTITY.len() as u64 + 32 + 8 + 32 * pages + 40 * 6 + 32
    );
    assert_eq!(&changes[..8], b"BMCHANG3");
    assert_holds(&store, Role::Source, g, &now)?;
    let r = store.load(Role::Source, &expect(g))?;
    assert_eq!(r.changed(), 6);
    assert_eq!(r.header().kind, SyncKind::ChangeList);

    // A second delta merges its changes with the first's (chunk 511 changed again, 7 new).
    let now = patch_to(&store, Role::Source, g, 3, &[7, 511])?;
    assert_eq!(std::fs::read(&base_path)?, base_bytes);
    assert_eq!(store.load(Role::Source, &expect(g))?.changed(), 7);
    assert_eq!(now[511], digest(3, 511));
    assert_eq!(now[510], digest(2, 510));
    assert_holds(&store, Role::Source, g, &now)?;
    Ok(())
}

#[test]
fn past_a_sixteenth_of_the_chunks_the_changes_are_compacted_into_a_new_base() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(3000);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    let first: Vec<u64> = (0..150).map(|i| i * 19).collect();
    patch_to(&store, Role::Source, g, 2, &first)?;
    assert_eq!(store.load(Role::Source, &expect(g))?.changed(), 150);
    // 150 + 50 > 3000 / 16: a new base, and no changes file.
    let second: Vec<u64> = (0..50).map(|i| i * 19 + 1).collect();
    let now = patch_to(&store, Role::Source, g, 3, &second)?;
    assert_eq!(names(dir.path())?, ["source.manifest"]);
    assert_eq!(store.load(Role::Source, &expect(g))?.changed(), 0);
    assert_holds(&store, Role::Source, g, &now)?;
    Ok(())
}

#[test]
fn any_flipped_bit_of_a_changes_file_makes_the_manifest_unusable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(600);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    patch_to(&store, Role::Destination, g, 2, &[3, 511, 599])?;
    let path = store.changes_path(Role::Destination).context("path")?;
    let whole = std::fs::read(&path)?;
    // Every byte is covered by the checksum, checked first: a damaged field (the base it names, the identity's
    // length) must not pass for changes of another base, which would leave the base alone as the manifest.
    for at in 0..whole.len() {
        for bit in [0x02u8, 0x80] {
            let mut bad = whole.clone();
            bad[at] ^= bit;
            std::fs::write(&path, &bad)?;
            match store.load(Role::Destination, &expect(g)) {
                Ok(_) => panic!("byte {at} ^ {bit:#x}: a damaged changes file was accepted"),
                Err(u) => assert!(
                    matches!(&u, Unusable::Damaged(why) if why.contains("destination.manifest.changes")),
                    "byte {at}: {u}"
                ),
            }
        }
    }
    std::fs::write(&path, &whole[..whole.len() - 1])?;
    assert!(matches!(unusable(&store, g), Unusable::Damaged(_)));
    Ok(())
}

#[test]
fn changes_left_over_from_an_earlier_base_are_ignored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(600);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    patch_to(&store, Role::Source, g, 2, &[5])?;
    let path = store.changes_path(Role::Source).context("path")?;
    let changes = std::fs::read(&path)?;
    // A full comparison's new base removes the changes; put back (a crash between the rename and the removal),
    // they name the base they applied to and pair with nothing.
    write(&store, Role::Source, g, IDENTITY, 4)?;
    assert!(!path.exists());
    std::fs::write(&path, &changes)?;
    assert_holds(&store, Role::Source, g, &image(g, 4, 4, &[]))?;
    Ok(())
}

#[test]
fn a_base_set_aside_is_unusable_until_the_patch_is_published() -> anyhow::Result<()> {
    for memory in [false, true] {
        let dir = tempfile::tempdir()?;
        let store = match memory {
            false => Store::dir(dir.path())?,
            true => Store::memory(1 << 20),
        };
        let g = geometry(2000);
        write(&store, Role::Destination, g, IDENTITY, 1)?;
        patch_to(&store, Role::Destination, g, 2, &[9])?;

        // The destination is about to write: the manifest no longer stands, but its patch still reads the base.
        let base = store.load(Role::Destination, &expect(g))?;
        store.set_aside(Role::Destination)?;
        assert_eq!(unusable(&store, g), Unusable::Missing, "memory {memory}");
        let mut patch = store.patch(base);
        patch.set(10, digest(3, 10))?;
        let mut m = meta(g, 3);
        m.volume_digest = patch.volume_digest()?;
        let sealed = patch.seal(m.clone())?;
        assert_eq!(
            unusable(&store, g),
            Unusable::Missing,
            "sealed, not published"
        );
        sealed.publish()?;
        let mut want = image(g, 1, 2, &[9]);
        want[10] = digest(3, 10);
        assert_holds(&store, Role::Destination, g, &want)?;
        if !memory {
            assert_eq!(
                names(dir.path())?,
                ["destination.manifest", "destination.manifest.changes"]
            );
        }

        // Set aside and never published (the session failed, or the agent died): nothing is usable, and a full
        // comparison's new base clears what is left.
        store.set_aside(Role::Destination)?;
        assert_eq!(unusable(&store, g), Unusable::Missing);
        write(&store, Role::Destination, g, IDENTITY, 5)?;
        assert_holds(&store, Role::Destination, g, &image(g, 5, 5, &[]))?;
        if !memory {
            assert_eq!(names(dir.path())?, ["destination.manifest"]);
        }
        store.invalidate(Role::Destination)?;
        assert_eq!(unusable(&store, g), Unusable::Missing);
    }
    Ok(())
}

#[test]
fn a_crash_between_the_changes_and_the_base_coming_back_leaves_nothing_usable() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(800);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let base = store.load(Role::Destination, &expect(g))?;
    store.set_aside(Role::Destination)?;
    let mut patch = store.patch(base);
    patch.set(1, digest(2, 1))?;
    let mut m = meta(g, 2);
    m.volume_digest = patch.volume_digest()?;
    patch.commit(m)?;
    // Undo the last step of the publish: the new changes are in place, their base is not.
    let (base, aside) = (
        store.path(Role::Destination).context("path")?,
        dir.path().join("destination.manifest.aside"),
    );
    std::fs::rename(&base, &aside)?;
    assert_eq!(unusable(&store, g), Unusable::Missing);
    Ok(())
}

#[test]
fn a_damaged_base_page_under_changes_fails_its_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(2000);
    write(&store, Role::Source, g, IDENTITY, 1)?;
    patch_to(&store, Role::Source, g, 2, &[600])?;
    let path = store.path(Role::Source).context("path")?;
    let mut b = std::fs::read(&path)?;
    // A digest of page 1 (chunks 511..1023), not the changed one.
    b[92 + IDENTITY.len() + 32 * 700 + 5] ^= 0x40;
    std::fs::write(&path, &b)?;
    let mut r = store.load(Role::Source, &expect(g))?;
    assert_eq!(r.digest(5)?, digest(1, 5), "page 0 is whole");
    let e = r.digest(600).expect_err("page 1 is damaged");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(r.verify_all().is_err());
    Ok(())
}

#[test]
fn setting_aside_in_a_state_directory_that_was_removed_is_not_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gone = dir.path().join("state");
    let store = Store::dir(&gone)?;
    let g = geometry(100);
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    std::fs::remove_dir_all(&gone)?;
    store.set_aside(Role::Destination)?;
    assert_eq!(unusable(&store, g), Unusable::Missing);
    Ok(())
}

#[test]
fn an_aside_file_left_by_an_earlier_base_is_removed_and_the_base_in_place_stays_usable(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(800);
    let aside = dir.path().join("destination.manifest.aside");
    write(&store, Role::Destination, g, IDENTITY, 1)?;
    let earlier = std::fs::read(store.path(Role::Destination).context("path")?)?;
    write(&store, Role::Destination, g, IDENTITY, 2)?;
    // A compaction that died after renaming the new base in, before removing the aside file it replaced.
    std::fs::write(&aside, earlier)?;
    let now = patch_to(&store, Role::Destination, g, 3, &[4, 700])?;
    assert_eq!(
        names(dir.path())?,
        ["destination.manifest", "destination.manifest.changes"]
    );
    assert_holds(&store, Role::Destination, g, &now)?;
    Ok(())
}
