//! The crate's error type: one line for humans, one exit code per class.
//!
//! Every error names what it is about (a path, a key, a file) and why, in one sentence, and
//! never carries key material. Exit codes (documented in man/kmsfs.1):
//! 0 success, 1 operational error, 2 bad usage, 3 integrity failure (tampered, moved,
//! untrusted key, config authentication), 4 key service or key file unavailable or denied.

use std::io;

use thiserror::Error;

use crate::format::FormatError;
use crate::keys::KeyError;

pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTEGRITY: i32 = 3;
pub const EXIT_KEYS: i32 = 4;

#[derive(Debug, Error)]
pub enum Error {
    /// Bad arguments: a malformed `--context`, an unparsable key, a bad block size.
    #[error("{0}")]
    Usage(String),
    /// The request is well-formed but refused: not a volume, not empty, already exists.
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// Bytes on the backing store failed to parse or authenticate.
    #[error("{path}: {source}")]
    Format { path: String, source: FormatError },
    /// A key call failed (context mismatch, untrusted key, denied, throttled, ...).
    #[error("{path}: {source}")]
    Key { path: String, source: KeyError },
    /// A key call not about one file (resolving a key at init, pinning).
    #[error("{0}")]
    KeyService(KeyError),
    /// The file's envelopes are bound to other paths: it was moved or copied on the store.
    #[error("{path}: context mismatch: the file is bound to {bound} (moved or copied on the backing store?)")]
    Moved { path: String, bound: String },
    /// The volume is not protected by the key the operator pinned with `--key`.
    #[error("{0}")]
    KeyPin(String),
    /// The mount daemon failed before detaching; its exit code and message.
    #[error("{message}")]
    Daemon { code: i32, message: String },
    /// A local key file is missing, unreadable or unsafe.
    #[error("{0}")]
    KeyFile(String),
    /// A check (fsck) found data that is not authentic where it is.
    #[error("{0}")]
    Integrity(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn format(path: impl std::fmt::Display, source: FormatError) -> Self {
        Error::Format {
            path: path.to_string(),
            source,
        }
    }

    pub fn key(path: impl std::fmt::Display, source: KeyError) -> Self {
        Error::Key {
            path: path.to_string(),
            source,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Daemon { code, .. } => *code,
            Error::Refused(_) | Error::Io { .. } => EXIT_ERROR,
            Error::Format { .. } | Error::Moved { .. } | Error::KeyPin(_) | Error::Integrity(_) => {
                EXIT_INTEGRITY
            }
            Error::Key { source, .. } if source.kind.is_integrity() => EXIT_INTEGRITY,
            Error::KeyService(e) if e.kind.is_integrity() => EXIT_INTEGRITY,
            Error::Key { .. } | Error::KeyService(_) | Error::KeyFile(_) => EXIT_KEYS,
        }
    }

    /// Whether this is an integrity failure (the data is not authentic where it was found).
    pub fn is_integrity(&self) -> bool {
        self.exit_code() == EXIT_INTEGRITY
    }
}

impl Error {
    /// The errno a FUSE reply carries for this error: integrity failures and key-service
    /// failures are EIO (the contract: what is not authentic, or cannot be unwrapped, is
    /// never returned) except a refusal by policy, which is EACCES; I/O errors keep their own
    /// errno.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Usage(_) => libc::EINVAL,
            Error::Refused(_) => libc::EPERM,
            Error::Key { source, .. } | Error::KeyService(source)
                if source.kind == crate::keys::KeyErrorKind::AccessDenied =>
            {
                libc::EACCES
            }
            Error::Format {
                source:
                    crate::format::FormatError::TooLarge(_) | crate::format::FormatError::NoRoom { .. },
                ..
            } => libc::EMLINK,
            _ => libc::EIO,
        }
    }
}

/// An error with just an errno (from a syscall on the backing store).
pub fn os(what: impl Into<String>, errno: i32) -> Error {
    Error::io(what, io::Error::from_raw_os_error(errno))
}
