//! The on-disk format, pure and byte-exact.
//!
//! This layer turns bytes into validated structures and back, and seals and opens blocks. It
//! does no I/O, calls no key service and knows nothing of FUSE: callers hand it bytes and keys.
//! Randomness (nonces, file ids) is passed in, so every encoding is reproducible for the test
//! vectors in `tests/vectors/` and docs/FORMAT.md, which is the normative description of the
//! layouts implemented here.
//!
//! Errors are deliberately coarse in kind (`InvalidHeader`, `DecryptionFailed`, ...) but carry
//! enough detail (which block, which field) for the one log line an operator needs.

pub mod block;
pub mod codec;
pub mod config;
pub mod context;
pub mod envelope;
pub mod header;
pub mod kdf;
pub mod kind_tag;
pub mod names;
pub mod object;

use thiserror::Error;

/// Why bytes read from the backing store were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("invalid volume config: {0}")]
    InvalidConfig(String),
    #[error("volume config uses unknown feature flag '{0}' (written by a newer kmsfs?)")]
    UnknownFeature(String),
    #[error("{what} of format version {version}, which this kmsfs does not read (it reads version 3 only)")]
    UnsupportedVersion { what: &'static str, version: u16 },
    #[error("volume config authentication failed (the config was edited or is not this volume's)")]
    ConfigAuthFailed,
    #[error("header authentication failed: {0}")]
    HeaderAuthFailed(String),
    #[error("key commitment mismatch (the header does not belong to this data key)")]
    CommitmentMismatch,
    #[error("authentication failed at block {0}")]
    DecryptionFailed(u64),
    #[error("invalid ciphertext length {0} (truncated or extended file)")]
    InvalidLength(u64),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("encoding limit exceeded: {0}")]
    TooLarge(String),
    /// A header slot too small for what it must hold; `need` is the slot size that holds it.
    #[error("no header room: {why}")]
    NoRoom { need: u32, why: String },
}
