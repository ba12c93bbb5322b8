//! Wrapped data keys and the envelopes that bind them to a path.
//!
//! A [`WrappedKey`] is what a key provider returns: the id of the key-encryption key and the
//! provider's opaque ciphertext. An [`Envelope`] adds the canonical path whose encryption
//! context the key was wrapped under. A file header holds one envelope per (trusted key,
//! bound path) pair: several keys for multi-region volumes, several paths for hard links or a
//! rename in progress.

use super::codec::{Reader, Writer};
use super::context::CanonicalPath;
use super::FormatError;

/// Longest key id accepted (KMS ARNs are about 100 bytes).
pub const MAX_KEY_ID: usize = 2048;
/// Longest wrapped key accepted (the KMS CiphertextBlob maximum).
pub const MAX_WRAPPED: usize = 6144;

/// A data key wrapped by a key provider. Not secret, but opaque.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WrappedKey {
    pub key_id: String,
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Wrapped bytes stay out of logs: they are useless to read and noisy.
        write!(f, "WrappedKey({}, {} bytes)", self.key_id, self.blob.len())
    }
}

impl WrappedKey {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.lp16(self.key_id.as_bytes()).lp16(&self.blob);
    }

    pub(crate) fn decode(
        r: &mut Reader,
        bad: &dyn Fn(&str) -> FormatError,
    ) -> Result<Self, FormatError> {
        let key_id = r.lp16().map_err(|_| bad("truncated key id"))?;
        let key_id = std::str::from_utf8(key_id)
            .map_err(|_| bad("key id is not UTF-8"))?
            .to_string();
        let blob = r.lp16().map_err(|_| bad("truncated wrapped key"))?.to_vec();
        let key = WrappedKey { key_id, blob };
        key.validate().map_err(|e| bad(&e))?;
        Ok(key)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.key_id.is_empty() || self.key_id.len() > MAX_KEY_ID {
            return Err("key id empty or too long".into());
        }
        if self.blob.is_empty() || self.blob.len() > MAX_WRAPPED {
            return Err("wrapped key empty or too long".into());
        }
        Ok(())
    }
}

/// A wrapped data key and the path its encryption context named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub path: CanonicalPath,
    pub key: WrappedKey,
}

impl Envelope {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.lp16(self.path.as_str().as_bytes());
        self.key.encode(w);
    }

    pub(crate) fn decode(
        r: &mut Reader,
        bad: &dyn Fn(&str) -> FormatError,
    ) -> Result<Self, FormatError> {
        let path = r.lp16().map_err(|_| bad("truncated envelope path"))?;
        let path = std::str::from_utf8(path).map_err(|_| bad("envelope path is not UTF-8"))?;
        let path = CanonicalPath::from_encoded(path).map_err(|e| bad(&e.to_string()))?;
        if path.is_root() {
            return Err(bad("envelope bound to the volume root"));
        }
        let key = WrappedKey::decode(r, bad)?;
        Ok(Envelope { path, key })
    }
}
