//! Manifest format versions: what format 2 checks, and format 1 files still read.

use anyhow::Context;

use super::super::format::{checksum_v1, FIXED_HEADER_LEN};
use super::*;

/// The bytes of the destination manifest in `store`, rewritten as format 1 wrote them: magic `BMMANIF1` and the
/// checksum over the header and the plain BLAKE3 hash of the digests.
fn as_format_1(store: &Store) -> anyhow::Result<Vec<u8>> {
    let path = store.path(Role::Destination).context("path")?;
    let mut b = std::fs::read(path)?;
    b[..8].copy_from_slice(b"BMMANIF1");
    let digests_at = FIXED_HEADER_LEN + IDENTITY.len();
    let end = b.len() - 32;
    let trailer = checksum_v1(&b[..digests_at], &blake3::hash(&b[digests_at..end]));
    b[end..].copy_from_slice(&trailer);
    Ok(b)
}

#[test]
fn the_checksum_of_format_2_covers_the_header_which_holds_the_volume_digest() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(40);
    write(&store, Role::Destination, g, IDENTITY, 3)?;
    let b = std::fs::read(store.path(Role::Destination).context("path")?)?;
    let digests_at = FIXED_HEADER_LEN + IDENTITY.len();
    assert_eq!(&b[..8], b"BMMANIF2");
    assert_eq!(&b[29..61], &volume_digest(g, 3).0);
    let want = blake3::derive_key("blockmover v2 2026-12 manifest checksum", &b[..digests_at]);
    assert_eq!(&b[b.len() - 32..], &want);
    Ok(())
}

#[test]
fn a_format_1_manifest_is_still_read_and_the_next_one_is_format_2() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::dir(dir.path())?;
    let g = geometry(300);
    write(&store, Role::Destination, g, IDENTITY, 5)?;
    let path = store.path(Role::Destination).context("path")?;
    let v1 = as_format_1(&store)?;
    std::fs::write(&path, &v1)?;
    let mut reader = store.load(Role::Destination, &expect(g))?;
    assert_eq!(reader.header().volume_digest, volume_digest(g, 5));
    assert_streams(&mut reader, 5)?;

    // Format 1's checksum still covers its digests: one flipped digest bit is refused either way.
    let mut bad = v1.clone();
    bad[FIXED_HEADER_LEN + IDENTITY.len() + 70] ^= 0x04;
    std::fs::write(&path, &bad)?;
    assert!(unusable(&store, g)
        .to_string()
        .contains("checksum mismatch"));
    // A format 1 file with format 2's magic (or the reverse) has the wrong checksum.
    let mut swapped = v1;
    swapped[..8].copy_from_slice(b"BMMANIF2");
    std::fs::write(&path, &swapped)?;
    assert!(unusable(&store, g)
        .to_string()
        .contains("checksum mismatch"));

    write(&store, Role::Destination, g, IDENTITY, 6)?;
    assert_eq!(&std::fs::read(&path)?[..8], b"BMMANIF2");
    assert_streams(&mut store.load(Role::Destination, &expect(g))?, 6)?;
    Ok(())
}
