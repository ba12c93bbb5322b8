//! Types that hold secret key material.
//!
//! Every secret lives in a heap box so moving the wrapper never leaves a stray copy on the
//! stack, is zeroized when dropped, and prints as `<redacted>`: a `{:?}` in a log line can
//! never leak key bytes. Nothing here implements `Display`, `Clone` is explicit and rare.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Length of a data encryption key (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// A plaintext data encryption key (DEK) as returned by `GenerateDataKey` / `Decrypt`.
pub struct DataKey(Box<Zeroizing<[u8; DATA_KEY_LEN]>>);

impl DataKey {
    /// Takes ownership of key bytes; the caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: &[u8; DATA_KEY_LEN]) -> Self {
        let mut key = Box::new(Zeroizing::new([0u8; DATA_KEY_LEN]));
        key.copy_from_slice(bytes);
        DataKey(key)
    }

    /// Builds a key from a slice, refusing anything that is not exactly 32 bytes (a provider
    /// that returns a short or long key is broken or hostile).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: &[u8; DATA_KEY_LEN] = bytes.try_into().ok()?;
        Some(Self::from_bytes(arr))
    }

    /// A fresh key from the operating system's CSPRNG. Only key providers call this: a file's
    /// DEK always comes from its provider's `generate_data_key`.
    pub fn random() -> Self {
        let mut key = Box::new(Zeroizing::new([0u8; DATA_KEY_LEN]));
        getrandom::getrandom(&mut key[..]).expect("the OS random number generator failed");
        DataKey(key)
    }

    pub fn expose(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }

    /// An explicit copy (e.g. to hand one cached key to several waiters).
    pub fn duplicate(&self) -> Self {
        Self::from_bytes(self.expose())
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A 32-byte key derived from a data key (MAC keys); zeroized on drop, never printed.
pub struct DerivedKey(Box<Zeroizing<[u8; 32]>>);

impl DerivedKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        let mut bytes = bytes;
        let key = DerivedKey(Box::new(Zeroizing::new(bytes)));
        bytes.zeroize();
        key
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = DataKey::from_bytes(&[0xAB; 32]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "DataKey(<redacted>)");
        assert!(!shown.to_lowercase().contains("ab"));
        let derived = DerivedKey::new([0xCD; 32]);
        assert_eq!(format!("{derived:?}"), "DerivedKey(<redacted>)");
    }

    #[test]
    fn from_slice_refuses_wrong_lengths() {
        assert!(DataKey::from_slice(&[1; 31]).is_none());
        assert!(DataKey::from_slice(&[1; 33]).is_none());
        assert_eq!(DataKey::from_slice(&[7; 32]).unwrap().expose(), &[7; 32]);
    }

    #[test]
    fn random_keys_differ() {
        assert_ne!(DataKey::random().expose(), DataKey::random().expose());
    }
}
