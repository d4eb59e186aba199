//! Integration tests: real `blockmover` agents on loopback with real TLS, sparse files and loop devices.
mod bench;
mod chaos;
mod common;
mod container;
mod contention;
mod entrypoint;
mod faults;
mod hardening;
mod hostile;
mod local;
mod loopdev;
mod pressure;
mod resume;
mod schedule;
mod schema;
mod security;
mod sync;
