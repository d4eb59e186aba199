//! Manifest format versions: what format 3 checks, and format 1 and 2 files still read.

use anyhow::Context;

use super::super::format::{checksum_v1, checksum_v2, FIXED_HEADER_LEN};
use super::*;
use crate::chunk::pages::Pages;

/// The bytes of the destination manifest in `store` (format 3, no changes), rewritten as format 2 wrote them: magic
/// `BMMANIF2`, no page table, the checksum over the header only.
fn as_format_2(store: &Store, g: Geometry) -> anyhow::Result<Vec<u8>> {
    let path = store.path(Role::Destination).context("path")?;
    let b = std::fs::read(path)?;
    let digests_end = FIXED_HEADER_LEN + IDENTITY.len() + 32 * g.chunk_count() as usize;
    let mut v2 = b[..digests_end].to_vec();
    v2[..8].copy_from_slice(b"BMMANIF2");
    let trailer = checksum_v2(&v2[..FIXED_HEADER_LEN + IDENTITY.len()]);
    v2.extend_from_slice(&trailer);
    Ok(v2)
}

/// The same as format 1 wrote it: magic `BMMANIF1` and the checksum over the header and the plain BLAKE3 hash of
/// the digests.
fn as_format_1(store: &Store, g: Geometry) -> anyhow::Result<Vec<u8>> {
    let mut b = as_format_2(store, g)?;
    b[..8].copy_from_slice(b"BMMANIF1");
    let digests_at = FIXED_HEADER_LEN + IDENTITY.len();
    let end = b.len() - 32;
    let trailer = checksum_v1(&b[..digests_at], &blake3::hash(&b[digests_at..end]));
    b[end..].copy_from_slice(&trailer);
    Ok(b)
}

#[test]
fn format_3_holds_the_page_table_and_its_checksum_covers_header_and_table() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(1500);
    write(&store, Role::Destination, g, IDENTITY, 3)?;
    let b = std::fs::read(store.path(Role::Destination).context("path")?)?;
    let header_end = FIXED_HEADER_LEN + IDENTITY.len();
    let table_at = header_end + 32 * 1500;
    let pages = Pages::new(g);
    assert_eq!(pages.count(), 3);
    assert_eq!(&b[..8], b"BMMANIF3");
    assert_eq!(&b[29..61], &volume_digest(g, 3).0);
    let table: Vec<[u8; 32]> = b[table_at..b.len() - 32]
        .chunks_exact(32)
        .map(|v| v.try_into().expect("32 bytes"))
        .collect();
    assert_eq!(pages.root(&table), volume_digest(g, 3));
    let mut h = blake3::Hasher::new_derive_key("blockmover v3 2026-12 manifest checksum");
    h.update(&b[..header_end]);
    h.update(&b[table_at..b.len() - 32]);
    assert_eq!(&b[b.len() - 32..], h.finalize().as_bytes());
    Ok(())
}

#[test]
fn format_1_and_2_manifests_are_still_read_and_the_next_one_is_format_3() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(1300);
    write(&store, Role::Destination, g, IDENTITY, 5)?;
    let path = store.path(Role::Destination).context("path")?;
    let (v1, v2) = (as_format_1(&store, g)?, as_format_2(&store, g)?);
    for old in [&v1, &v2] {
        std::fs::write(&path, old)?;
        let mut reader = store.load(Role::Destination, &expect(g))?;
        assert_eq!(reader.header().volume_digest, volume_digest(g, 5));
        assert_streams(&mut reader, 5)?;
    }

    // Format 1's checksum covers its digests; format 2's digests must give its volume digest: one flipped digest
    // bit is refused on loading either way (neither has a page table to check pages against later).
    for (old, why) in [
        (&v1, "checksum mismatch"),
        (&v2, "do not give its volume digest"),
    ] {
        let mut bad = old.clone();
        bad[FIXED_HEADER_LEN + IDENTITY.len() + 70] ^= 0x04;
        std::fs::write(&path, &bad)?;
        let u = unusable(&store, g).to_string();
        assert!(u.contains(why), "{u}");
    }
    // A format 1 file with format 2's magic has the wrong checksum.
    let mut swapped = v1;
    swapped[..8].copy_from_slice(b"BMMANIF2");
    std::fs::write(&path, &swapped)?;
    assert!(unusable(&store, g)
        .to_string()
        .contains("checksum mismatch"));

    // A delta on a format-2 base writes a whole format-3 base, not changes to a base without a page table.
    std::fs::write(&path, &v2)?;
    let mut patch = store.patch(store.load(Role::Destination, &expect(g))?);
    patch.set(7, digest(6, 7))?;
    let mut m = meta(g, 5);
    m.volume_digest = patch.volume_digest()?;
    patch.commit(m)?;
    assert_eq!(&std::fs::read(&path)?[..8], b"BMMANIF3");
    assert_eq!(names(dir.path())?, ["destination.manifest"]);
    let mut r = store.load(Role::Destination, &expect(g))?;
    assert_eq!(r.changed(), 0);
    assert_eq!(r.digest(7)?, digest(6, 7));
    assert_eq!(r.digest(8)?, digest(5, 8));
    Ok(())
}
