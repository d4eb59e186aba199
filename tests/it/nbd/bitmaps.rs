//! What a dirty bitmap looks like over NBD, through the library's own client and tracker against the real
//! `qemu-nbd`: an enabled bitmap names exactly the written granules; a disabled one is exported all the same
//! (qemu-nbd `-B` accepts it) under the same context name, with nothing that tells it is disabled, and it misses
//! the writes made while disabled. That is the README's finding: a disabled bitmap is not detectable over NBD.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use blockmover::changes::{NbdTracker, Tracker};
use blockmover::chunk::{Digest, Geometry};
use blockmover::nbd::{Address, Client, Options};

use super::{qemu_tools, Image, CHUNK, MIB};

fn tracker(img: &Image, bitmap: &str) -> Result<(NbdTracker, Geometry)> {
    let options = Options {
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(10),
        contexts: vec![
            "base:allocation".into(),
            format!("qemu:dirty-bitmap:{bitmap}"),
        ],
    };
    let client = Client::connect(
        &Address::parse(&img.uri()).map_err(anyhow::Error::msg)?,
        &options,
    )?;
    let geometry = Geometry::new(client.size(), CHUNK as u32).map_err(anyhow::Error::msg)?;
    Ok((
        NbdTracker::new(Arc::new(client), Some(bitmap.into())),
        geometry,
    ))
}

#[test]
fn an_enabled_bitmap_names_the_writes_and_a_disabled_one_silently_misses_them() -> Result<()> {
    if !qemu_tools() {
        return Ok(());
    }
    let mut img = Image::new(16 * MIB)?;
    img.bitmap("--add", "off")?; // created enabled
    img.write(&[(0x5a, 3 * CHUNK + 100, 10)])?;
    img.bitmap("--disable", "off")?;
    img.write(&[(0x5b, 100 * CHUNK, 4096)])?;

    img.serve(Some("b0"))?;
    let (b0, geometry) = tracker(&img, "b0")?;
    let changed = b0.changed(geometry, &Digest([0; 32]))?;
    assert_eq!(
        changed.ranges(),
        &[(3, 4), (100, 101)],
        "the enabled bitmap saw both writes"
    );
    let allocated = b0.allocated(geometry)?.expect("base:allocation is offered");
    // Within the two written 64 KiB clusters (qemu may report less: the rest of a cluster that reads as zeros
    // is NBD_STATE_ZERO), and covering every written byte.
    let inside = |(o, l): (u64, u64)| {
        [3 * CHUNK, 100 * CHUNK]
            .iter()
            .any(|c| o >= *c && o + l <= c + CHUNK)
    };
    assert!(allocated.iter().all(|e| inside(*e)), "{allocated:?}");
    let covers = |at: u64, len: u64| allocated.iter().any(|(o, l)| *o <= at && at + len <= o + l);
    assert!(
        covers(3 * CHUNK + 100, 10) && covers(100 * CHUNK, 4096),
        "{allocated:?}"
    );
    drop(b0);
    img.stop()?;

    img.serve(Some("off"))?;
    let (off, geometry) = tracker(&img, "off")?;
    let changed = off.changed(geometry, &Digest([0; 32]))?;
    assert_eq!(
        changed.ranges(),
        &[(3, 4)],
        "the disabled bitmap is exported like any other and misses the write made while it was disabled"
    );
    Ok(())
}
