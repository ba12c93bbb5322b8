//! The key layer: who wraps data keys, and how kmsfs talks to them.
//!
//! A [`KeyProvider`] is one key service (the local master-key provider, AWS KMS, or the
//! fault-injecting wrapper used by tests) with the four calls envelope encryption needs. The
//! [`keyring::Keyring`] is a volume's trusted set of keys in preference order; it is the only
//! caller of providers, and it adds what every call needs whatever the provider: the trusted-key
//! check, bounded concurrency, retries with jittered exponential backoff under a deadline, call
//! statistics, and the bounded plaintext key cache of [`cache`].
//!
//! Errors keep the distinctions an operator acts on (context mismatch, untrusted key, access
//! denied, throttled, unavailable) and never carry key material.

pub mod aws;
pub mod cache;
pub mod fault;
pub mod keyring;
pub mod local;
mod locked;
pub mod spec;

use std::fmt;

use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::secret::DataKey;

/// The calls a provider serves, for errors, statistics and fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KmsOp {
    GenerateDataKey,
    Encrypt,
    Decrypt,
    ReEncrypt,
    /// Resolving an alias or key id to its ARN (init, and pinning with `--key`).
    DescribeKey,
}

impl KmsOp {
    pub const ALL: [KmsOp; 5] = [
        KmsOp::GenerateDataKey,
        KmsOp::Encrypt,
        KmsOp::Decrypt,
        KmsOp::ReEncrypt,
        KmsOp::DescribeKey,
    ];
}

impl fmt::Display for KmsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What went wrong with a key call, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyErrorKind {
    /// The wrapped key does not open under this context: the file was moved, copied from
    /// another volume, or its envelope was tampered with.
    ContextMismatch,
    /// The envelope names a key the volume does not trust; it is never sent to a provider.
    UntrustedKey,
    /// The wrapped key was made under a different key than the one it claims.
    IncorrectKey,
    AccessDenied,
    KeyDisabled,
    NotFound,
    Throttled,
    Timeout,
    Unavailable,
    /// The provider answered with something malformed (e.g. a key that is not 32 bytes).
    InvalidResponse,
}

impl KeyErrorKind {
    /// Worth another attempt after a pause.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            KeyErrorKind::Throttled | KeyErrorKind::Timeout | KeyErrorKind::Unavailable
        )
    }

    /// The data is not authentic for where it was found (as opposed to a service problem).
    pub fn is_integrity(self) -> bool {
        matches!(
            self,
            KeyErrorKind::ContextMismatch | KeyErrorKind::UntrustedKey | KeyErrorKind::IncorrectKey
        )
    }

    fn describe(self) -> &'static str {
        match self {
            KeyErrorKind::ContextMismatch => "context mismatch",
            KeyErrorKind::UntrustedKey => "untrusted key",
            KeyErrorKind::IncorrectKey => "wrapped under a different key",
            KeyErrorKind::AccessDenied => "access denied",
            KeyErrorKind::KeyDisabled => "key disabled",
            KeyErrorKind::NotFound => "key not found",
            KeyErrorKind::Throttled => "throttled",
            KeyErrorKind::Timeout => "timed out",
            KeyErrorKind::Unavailable => "key service unavailable",
            KeyErrorKind::InvalidResponse => "invalid response from key service",
        }
    }
}

impl fmt::Display for KeyErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failed key call: which call, under which key, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub kind: KeyErrorKind,
    pub op: KmsOp,
    pub key_id: String,
    pub detail: String,
}

impl KeyError {
    pub fn new(kind: KeyErrorKind, op: KmsOp, key_id: &str, detail: impl Into<String>) -> Self {
        KeyError {
            kind,
            op,
            key_id: key_id.to_string(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} with key {}", self.kind, self.op, self.key_id)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for KeyError {}

/// A key service. Calls block; providers that are async inside (AWS) run their own runtime.
/// Providers do not retry: the keyring does, uniformly.
pub trait KeyProvider: Send + Sync {
    /// A fresh data key and its wrapping under `key_id`, bound to `ctx`.
    fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KeyError>;

    /// Wraps an existing data key under another key (extra envelopes of multi-key volumes).
    fn encrypt(
        &self,
        key_id: &str,
        key: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError>;

    /// Unwraps `wrapped` under the key it names, which must be one this provider holds.
    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KeyError>;

    /// Rewraps without exposing the data key to the caller: to another context (rename) or
    /// another key of this provider (rewrap).
    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        from_ctx: &EncryptionContext,
        to_key_id: &str,
        to_ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError>;

    /// Whether `re_encrypt` can move a key wrapped under `from_key` to `to_key` inside the
    /// provider (without the data key passing through kmsfs's memory).
    fn can_re_encrypt(&self, from_key: &str, to_key: &str) -> bool;

    /// Whether calls are answered in this process (no network, microseconds): creates then
    /// always wait for their keys, however loaded the machine (see
    /// [`crate::core::instance::KeyRequests`]).
    fn answers_in_process(&self) -> bool {
        false
    }
}

/// Stands in for a trusted key that cannot be reached (a missing local key file), so calls
/// under it fail with the reason instead of the key looking untrusted.
pub struct UnavailableKey {
    pub reason: String,
}

impl UnavailableKey {
    fn fail<T>(&self, op: KmsOp, key_id: &str) -> Result<T, KeyError> {
        Err(KeyError::new(
            KeyErrorKind::NotFound,
            op,
            key_id,
            self.reason.clone(),
        ))
    }
}

impl KeyProvider for UnavailableKey {
    fn answers_in_process(&self) -> bool {
        true
    }

    fn generate_data_key(
        &self,
        key_id: &str,
        _: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        self.fail(KmsOp::GenerateDataKey, key_id)
    }

    fn encrypt(
        &self,
        key_id: &str,
        _: &DataKey,
        _: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.fail(KmsOp::Encrypt, key_id)
    }

    fn decrypt(&self, wrapped: &WrappedKey, _: &EncryptionContext) -> Result<DataKey, KeyError> {
        self.fail(KmsOp::Decrypt, &wrapped.key_id)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        _: &EncryptionContext,
        _: &str,
        _: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.fail(KmsOp::ReEncrypt, &wrapped.key_id)
    }

    fn can_re_encrypt(&self, _: &str, _: &str) -> bool {
        false
    }
}
