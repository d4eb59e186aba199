//! blockmover: replicate block volumes over TLS, sending only the 4 KiB blocks that changed.
//!
//! Data flow (`proto/PROTOCOL.md` is the wire specification):
//! [`source`] reads a snapshot ([`volume`], [`scan`]) and hashes chunks ([`chunk`]); the [`destination`] hashes its
//! target at the same time, compares, asks for the changed blocks, verifies and writes them, fsyncs, and both
//! agents record a VolSync-shaped [`status`]. Frames are in [`codec`], TLS and the PSK proof in [`tls`] and [`net`].
#![deny(missing_docs)]

pub mod adapt;
pub mod agent;
pub mod changes;
pub mod chunk;
pub mod codec;
pub mod delta;
pub mod destination;
pub mod durable;
pub mod error;
pub mod listing;
pub mod manifest;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod progress;
pub mod ratelimit;
pub mod sample;
pub mod scan;
pub mod schedule;
pub mod snapshot;
pub mod source;
pub mod stats;
pub mod status;
pub mod tls;
pub mod volume;
pub mod zstream;

pub use error::{Error, Result};
