//! What a session compares against: the whole target (a full comparison) or the image both agents' manifests
//! describe (a delta), and why a delta was not possible. Carried by HELLO (the source's offer) and READY (the
//! session's kind), see "Delta sessions" in `proto/PROTOCOL.md`.

use std::fmt;

use crate::chunk::Digest;

/// How a sync finds what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Both sides hash their whole volume and compare every chunk.
    Full,
    /// Delta by manifest: the source hashes its snapshot and announces only the chunks that differ from its
    /// manifest; the destination does not hash its target.
    Manifest,
    /// Delta by change list: the source reads and hashes only the chunks a change list names.
    ChangeList,
}

impl SyncKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            SyncKind::Full => 0,
            SyncKind::Manifest => 1,
            SyncKind::ChangeList => 2,
        }
    }

    /// The kind of a wire code, `None` for a code this build does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(SyncKind::Full),
            1 => Some(SyncKind::Manifest),
            2 => Some(SyncKind::ChangeList),
            _ => None,
        }
    }

    /// Whether the session skips what the manifests prove equal.
    pub fn is_delta(self) -> bool {
        self != SyncKind::Full
    }

    /// The name in statuses, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Manifest => "delta-manifest",
            SyncKind::ChangeList => "delta-changelist",
        }
    }
}

impl fmt::Display for SyncKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a session runs a full comparison (the wire code in HELLO and READY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// No reason: the session is a delta.
    None,
    /// The source keeps no state.
    SourceNoState,
    /// The source has no usable manifest (missing, damaged, foreign, other geometry: its log says which).
    SourceNoManifest,
    /// The source was asked for a full comparison (`--verify full`).
    SourceVerify,
    /// The source's periodic verification is due (`--verify-every`).
    SourcePeriodic,
    /// The destination keeps no state.
    DestinationNoState,
    /// The destination has no usable manifest for its target.
    DestinationNoManifest,
    /// The destination was asked for a full comparison.
    DestinationVerify,
    /// The destination's periodic verification is due.
    DestinationPeriodic,
    /// Both have manifests, of different images.
    BasesDiffer,
    /// The destination's target does not hold what its manifest says (its spot check read other bytes).
    DestinationTargetChanged,
    /// The source's change tracker could not say what changed (an NBD dirty bitmap that is not exported, a kept
    /// clone that is missing, a CSI service that failed: the source's log and status say which).
    SourceTrackerFailed,
    /// A code this build does not know.
    Unknown(u8),
}

impl Fallback {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Fallback::None => 0,
            Fallback::SourceNoState => 1,
            Fallback::SourceNoManifest => 2,
            Fallback::SourceVerify => 3,
            Fallback::SourcePeriodic => 4,
            Fallback::DestinationNoState => 5,
            Fallback::DestinationNoManifest => 6,
            Fallback::DestinationVerify => 7,
            Fallback::DestinationPeriodic => 8,
            Fallback::BasesDiffer => 9,
            Fallback::DestinationTargetChanged => 10,
            Fallback::SourceTrackerFailed => 11,
            Fallback::Unknown(c) => c,
        }
    }

    /// The reason of a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Fallback::None,
            1 => Fallback::SourceNoState,
            2 => Fallback::SourceNoManifest,
            3 => Fallback::SourceVerify,
            4 => Fallback::SourcePeriodic,
            5 => Fallback::DestinationNoState,
            6 => Fallback::DestinationNoManifest,
            7 => Fallback::DestinationVerify,
            8 => Fallback::DestinationPeriodic,
            9 => Fallback::BasesDiffer,
            10 => Fallback::DestinationTargetChanged,
            11 => Fallback::SourceTrackerFailed,
            c => Fallback::Unknown(c),
        }
    }

    /// A short key for statuses and metric labels.
    pub fn key(self) -> &'static str {
        match self {
            Fallback::None => "none",
            Fallback::SourceNoState => "source-no-state",
            Fallback::SourceNoManifest => "source-no-manifest",
            Fallback::SourceVerify => "source-verify",
            Fallback::SourcePeriodic => "source-periodic",
            Fallback::DestinationNoState => "destination-no-state",
            Fallback::DestinationNoManifest => "destination-no-manifest",
            Fallback::DestinationVerify => "destination-verify",
            Fallback::DestinationPeriodic => "destination-periodic",
            Fallback::BasesDiffer => "bases-differ",
            Fallback::DestinationTargetChanged => "destination-target-changed",
            Fallback::SourceTrackerFailed => "source-tracker-failed",
            Fallback::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Fallback::None => "a delta was agreed",
            Fallback::SourceNoState => "the source keeps no state (no --state-dir)",
            Fallback::SourceNoManifest => "the source has no usable manifest",
            Fallback::SourceVerify => "the source asked for a full comparison (--verify full)",
            Fallback::SourcePeriodic => {
                "the source's periodic full comparison is due (--verify-every)"
            }
            Fallback::DestinationNoState => "the destination keeps no state (no --state-dir)",
            Fallback::DestinationNoManifest => {
                "the destination has no usable manifest of its target"
            }
            Fallback::DestinationVerify => {
                "the destination asked for a full comparison (--verify full)"
            }
            Fallback::DestinationPeriodic => {
                "the destination's periodic full comparison is due (--verify-every)"
            }
            Fallback::BasesDiffer => "the two manifests describe different images",
            Fallback::DestinationTargetChanged => {
                "the destination's target does not hold what its manifest says (spot check)"
            }
            Fallback::SourceTrackerFailed => "the source's change tracker failed",
            Fallback::Unknown(c) => return write!(f, "reason {c}"),
        };
        f.write_str(text)
    }
}

/// The source's offer in HELLO: the kind of sync it can run and the image its manifest describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// [`SyncKind::Full`] when the source cannot or will not run a delta (then `reason` says why).
    pub kind: SyncKind,
    /// Why the source asks for a full comparison ([`Fallback::None`] for a delta offer).
    pub reason: Fallback,
    /// The volume digest of the source's manifest (all zeros without one).
    pub base: Digest,
}

impl Offer {
    /// An offer of a full comparison, for `reason`.
    pub fn full(reason: Fallback) -> Self {
        Offer {
            kind: SyncKind::Full,
            reason,
            base: Digest([0; 32]),
        }
    }
}
