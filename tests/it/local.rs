//! The local side of hardening (issue 10): one writer per target, file identity instead of path text, temporary
//! files that follow no symlink, start-up checks of the status directory and the key file, flag ranges.
//!
//! Real processes of the release binary. Where the destination opens its target only when a source connects
//! (before the change that opens it at start-up), a refusal is accepted either at start-up or when its source
//! connects; what must never happen is a Successful sync whose target differs from its volume. Tests that need
//! root (loop devices, mounts, device nodes) are in `devices`; `target` holds the one-writer and same-file
//! checks, `files` the temporary files, the status directory, the key file and the flags. Their process helpers
//! are `common`'s ([`crate::common::Destination::start`], [`crate::common::run_bin`]).

mod devices;
mod files;
mod target;

use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Safety net for a process expected to exit at once (a start-up check, a usage error).
const PROMPT: Duration = Duration::from_secs(20);

/// Where the first destination's sync is held, so that it holds the target: past HELLO and the first NEEDs.
const STALL_AT: u64 = 2 * MIB;
