//! The error policy: one enum for the data path, typed context in fields, and whether a retry can help.
//!
//! Messages are lowercase one-liners that do not repeat their source. An error is logged once, where it is
//! handled (in `main` or the destination's session loop), and recorded in the status file.
//! [`Error::is_retryable`] separates failures a retry may cure (network, timeouts, a vanished peer) from those it
//! cannot (keys, configuration, digests, versions); `main` turns that into the exit code.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::codec::AbortCode;

/// Everything that can end a sync early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume, target or key file could not be opened.
    #[error("cannot open {what} {}: {source}", path.display())]
    Open {
        /// What the file is ("volume", "target", "key file").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading, writing, zeroing or flushing a volume failed.
    #[error("{op} {} at offset {offset}: {source}", path.display())]
    Io {
        /// The operation ("read", "write", "zero", "fsync").
        op: &'static str,
        /// The file or device.
        path: PathBuf,
        /// Byte offset of the failed operation.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The target cannot hold the volume.
    #[error("target too small: {} holds {target_size} bytes, the volume needs {volume_size}", path.display())]
    TargetTooSmall {
        /// The target path.
        path: PathBuf,
        /// Its size in bytes.
        target_size: u64,
        /// The volume size in bytes.
        volume_size: u64,
    },
    /// The target is held by another exclusive user (another destination, device-mapper, md, a process): it may
    /// let go, so a retry may succeed.
    #[error("target {} is in use by {holder}: refusing to share it with a second writer", path.display())]
    TargetInUse {
        /// The target path.
        path: PathBuf,
        /// Who holds it, e.g. `another process (pid 42, blockmover)`, as far as `/proc` and `/sys` tell.
        holder: String,
    },
    /// The target block device holds a mounted file system.
    #[error(
        "target {} is mounted at {}: refusing to overwrite a mounted filesystem",
        path.display(),
        mount.display()
    )]
    TargetMounted {
        /// The target path.
        path: PathBuf,
        /// Where it (or one of its partitions) is mounted.
        mount: PathBuf,
    },
    /// The key file is malformed or unsafe.
    #[error("key file {}: {reason}", path.display())]
    Key {
        /// The key file path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A change list (`--changed-extents`) that cannot be used.
    #[error("change list {}: {reason}", path.display())]
    ChangeList {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A change tracker (NBD dirty bitmap, reflink extents, CSI changed block tracking) could not say what
    /// changed. The source falls back to a full comparison ([`crate::codec::Fallback::SourceTrackerFailed`]),
    /// never to a partial sync; this error only ends a sync where no fallback exists.
    #[error("change tracker {tracker}: {reason}")]
    Tracker {
        /// What the tracker is ([`crate::changes::Tracker::describe`]).
        tracker: String,
        /// What went wrong.
        reason: String,
    },
    /// An NBD export (`source --volume nbd://...`) could not be opened or read. `retryable` when the server went
    /// away, froze or is shutting down; not for a missing export, a protocol violation or a read error it reports.
    #[error("nbd export {export}: {reason}")]
    Nbd {
        /// The export's URI.
        export: String,
        /// What went wrong (one line).
        reason: String,
        /// Whether a retry may help.
        retryable: bool,
    },
    /// A quiesce hook (`--pre-snapshot`, `--post-snapshot`) failed or ran over its timeout.
    #[error("{which} hook failed: {reason}")]
    Hook {
        /// `pre-snapshot` or `post-snapshot`.
        which: &'static str,
        /// Its exit status and last stderr line, or why it could not run.
        reason: String,
        /// It timed out or exited 75.
        retryable: bool,
    },
    /// The point-in-time copy (`--snapshot`) could not be taken.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// zstd could not set up or run a compression lane (out of memory, in practice).
    #[error("compression: {0}")]
    Compression(String),
    /// The state directory (`--state-dir`) cannot be used.
    #[error("state: {0}")]
    State(String),
    /// A manifest page read during a delta does not hold what its validated page table says (the file changed or
    /// went bad on disk): the manifest is dropped, and the retry compares in full.
    #[error("manifest damaged: {0}; it was dropped, and the retry compares in full")]
    ManifestDamaged(String),
    /// Bad configuration (flags, sizes).
    #[error("configuration: {0}")]
    Config(String),
    /// The peer's PSK proof did not verify.
    #[error("authentication failed: pre-shared keys do not match ({0})")]
    KeysDoNotMatch(String),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: peer speaks version {peer}, this build speaks version {ours}"
    )]
    VersionMismatch {
        /// The version in the peer's frame.
        peer: u8,
        /// Ours.
        ours: u8,
    },
    /// The peer sent something the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A rebuilt chunk does not hash to the digest the source announced. TLS rules out corruption in transit, so
    /// the chunk changed between the source's scan and its DATA (a live volume), or the target changed under the
    /// destination: a later sync may succeed, hence retryable.
    #[error("digest mismatch on chunk {chunk}: the rebuilt chunk does not hash to the source's digest (the volume or the target changed during the sync)")]
    DigestMismatch {
        /// The chunk index.
        chunk: u64,
    },
    /// The whole-volume digests of both sides differ.
    #[error("volume digest mismatch: source {source_digest}, destination {destination_digest}")]
    VolumeDigestMismatch {
        /// The source's digest (hex).
        source_digest: String,
        /// The destination's digest (hex).
        destination_digest: String,
    },
    /// A network phase took too long.
    #[error("{phase} timed out after {}s", after.as_secs_f64())]
    Timeout {
        /// The phase ("connect", "tls handshake", "authentication", "hello", "idle read", "close").
        phase: &'static str,
        /// The limit that was hit.
        after: Duration,
    },
    /// A socket or TLS operation failed.
    #[error("network error during {phase}: {source}")]
    Net {
        /// The phase.
        phase: &'static str,
        /// The OS or TLS error.
        source: io::Error,
    },
    /// The TCP connection to the destination could not be made.
    #[error("network error during connect to {addr}: {source}")]
    Connect {
        /// The address tried (`host:port` as given).
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A chunk of the source volume read for DATA no longer hashes to the digest announced when it was scanned:
    /// something writes the volume during the sync (no snapshot, `copyMethod: Direct`).
    #[error("the volume changed during the sync (chunk {chunk}): sync from a snapshot")]
    VolumeChanged {
        /// The chunk index.
        chunk: u64,
    },
    /// `--read-back`: the target's bytes, read back after the final fsync, do not hash to the source's volume
    /// digest: something else wrote the target during the sync.
    #[error("read-back of the target found {} differing from the volume (digest {found}, expected {expected}): something else wrote the target during the sync", path.display())]
    ReadBackMismatch {
        /// The target.
        path: PathBuf,
        /// The volume digest of the bytes read back (hex).
        found: String,
        /// The source's volume digest (hex).
        expected: String,
    },
    /// The target's size changed during the sync: something else truncated or extended it.
    #[error("target {} changed size during the sync ({before} -> {after} bytes): something else writes it", path.display())]
    TargetResized {
        /// The target.
        path: PathBuf,
        /// Its size when the sync started.
        before: u64,
        /// Its size at the end.
        after: u64,
    },
    /// The peer closed the connection before the session ended.
    #[error("peer closed the connection during {0}")]
    PeerClosed(&'static str),
    /// The peer ended the session with an ABORT frame.
    #[error("peer aborted the sync: {message}")]
    PeerAbort {
        /// The ABORT code.
        code: AbortCode,
        /// The peer's reason.
        message: String,
    },
    /// TLS configuration failed.
    #[error("tls setup: {0}")]
    TlsSetup(String),
    /// A signal asked us to stop.
    #[error("interrupted by {0}")]
    Cancelled(&'static str),
    /// The source reconnected while this session was still open (it froze, or its connection went half-open).
    #[error("superseded by a new connection from the source")]
    Superseded,
    /// The status file could not be read or written.
    #[error(transparent)]
    Status(#[from] crate::status::StatusError),
}

impl Error {
    /// Whether a later retry of the same sync may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::Net { .. }
            | Error::Connect { .. }
            | Error::VolumeChanged { .. }
            | Error::DigestMismatch { .. }
            | Error::ReadBackMismatch { .. }
            | Error::TargetResized { .. }
            | Error::PeerClosed(_)
            | Error::Cancelled(_)
            | Error::Superseded
            | Error::ManifestDamaged(_)
            | Error::TargetInUse { .. } => true,
            Error::PeerAbort { code, .. } => code.is_retryable(),
            Error::Nbd { retryable, .. } => *retryable,
            Error::Hook { retryable, .. } => *retryable,
            // A full disk, a read-only or failing device stay that way until someone acts.
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// The ABORT code that tells the peer why this side gives up.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            Error::VersionMismatch { .. } => AbortCode::Version,
            Error::TargetTooSmall { .. } => AbortCode::TargetTooSmall,
            Error::Io { .. }
            | Error::Open { .. }
            | Error::Status(_)
            | Error::State(_)
            | Error::Compression(_) => AbortCode::Io,
            Error::TargetInUse { .. } => AbortCode::Busy,
            Error::DigestMismatch { .. } | Error::VolumeDigestMismatch { .. } => AbortCode::Digest,
            // Both are cured by a later sync (from a snapshot; once the other writer is gone): the peer may retry.
            Error::VolumeChanged { .. }
            | Error::ReadBackMismatch { .. }
            | Error::ManifestDamaged(_)
            | Error::TargetResized { .. } => AbortCode::Cancelled,
            Error::KeysDoNotMatch(_) => AbortCode::Auth,
            // The source's export went away (a retry may find it again), or it failed a read.
            Error::Nbd {
                retryable: true, ..
            } => AbortCode::Cancelled,
            Error::Nbd { .. } => AbortCode::Io,
            Error::Cancelled(_) | Error::Superseded => AbortCode::Cancelled,
            Error::Config(_)
            | Error::ChangeList { .. }
            | Error::Hook { .. }
            | Error::Snapshot(_)
            | Error::Key { .. }
            | Error::TlsSetup(_)
            | Error::TargetMounted { .. } => AbortCode::Config,
            _ => AbortCode::Protocol,
        }
    }

    /// A compression lane's zstd error.
    pub fn compression(source: io::Error) -> Self {
        Error::Compression(source.to_string())
    }

    /// Wraps a socket error with the phase it happened in, turning a bare EOF into [`Error::PeerClosed`].
    pub fn net(phase: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Error::PeerClosed(phase)
        } else {
            Error::Net { phase, source }
        }
    }
}

/// The data path's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_are_retryable_and_digest_failures_are_not() {
        assert!(Error::PeerClosed("data").is_retryable());
        assert!(Error::net("read", io::Error::from(io::ErrorKind::ConnectionReset)).is_retryable());
        assert!(Error::DigestMismatch { chunk: 3 }.is_retryable());
        assert!(!Error::VolumeDigestMismatch {
            source_digest: "a".into(),
            destination_digest: "b".into()
        }
        .is_retryable());
        assert!(!Error::KeysDoNotMatch("x".into()).is_retryable());
        assert!(!Error::VersionMismatch { peer: 2, ours: 1 }.is_retryable());
    }

    #[test]
    fn a_target_in_use_is_retryable_and_a_mounted_one_is_not() {
        let busy = Error::TargetInUse {
            path: "/dev/loop7".into(),
            holder: "another process (pid 42, blockmover)".into(),
        };
        assert!(busy.is_retryable());
        assert!(busy
            .to_string()
            .starts_with("target /dev/loop7 is in use by another process (pid 42, blockmover): "));
        let mounted = Error::TargetMounted {
            path: "/dev/loop7".into(),
            mount: "/mnt/x".into(),
        };
        assert!(!mounted.is_retryable());
        assert_eq!(
            mounted.to_string(),
            "target /dev/loop7 is mounted at /mnt/x: refusing to overwrite a mounted filesystem"
        );
    }

    #[test]
    fn eof_becomes_peer_closed() {
        let e = Error::net("hello", io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(matches!(e, Error::PeerClosed("hello")));
    }
}
