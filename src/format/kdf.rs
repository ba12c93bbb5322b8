//! Keys derived with HKDF-SHA256.
//!
//! A file's DEK is never used directly: the block key and the key commitment are each expanded
//! from it with the file id as salt and a distinct label, so one header (one commitment) can
//! never open to two different plaintexts, and a DEK moved to another file id derives nothing
//! useful there.
//!
//! Header slots are MACed under a key derived from the *volume* key (volume header key, then
//! per file id), not from the DEK: so rewrapping a file's envelopes to a new KMS key takes
//! `ReEncrypt` alone and the DEK never leaves the key service, and the slot in force is chosen
//! before any key call. The slot's envelopes still need the key service to open, and the
//! commitment still binds the DEK they give to the file.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle_eq::ct_eq;

use crate::secret::{DataKey, DerivedKey};

pub const LABEL_CONTENT: &[u8] = b"kmsfs/v1 content key";
pub const LABEL_COMMITMENT: &[u8] = b"kmsfs/v1 key commitment";
pub const LABEL_HEADER_KEY: &[u8] = b"kmsfs/v1 volume header key";
pub const LABEL_HEADER_MAC: &[u8] = b"kmsfs/v1 header mac";
pub const LABEL_CONFIG_MAC: &[u8] = b"kmsfs/v1 config mac";
pub const LABEL_REBIND_RECORD_MAC: &[u8] = b"kmsfs/v1 rebind record mac";
pub const LABEL_OBJECT_WRAP: &[u8] = b"kmsfs/v2 object wrap key";

fn expand(dek: &DataKey, salt: &[u8], label: &[u8]) -> DerivedKey {
    expand_bytes(dek.expose(), salt, label)
}

fn expand_bytes(ikm: &[u8; 32], salt: &[u8], label: &[u8]) -> DerivedKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = [0u8; 32];
    hk.expand(label, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    DerivedKey::new(out)
}

/// The AES-256-GCM key for a file's blocks.
pub fn content_key(dek: &DataKey, file_id: &[u8; 16]) -> DerivedKey {
    expand(dek, file_id, LABEL_CONTENT)
}

/// The key commitment stored in the header (public, but binds the DEK to the file id).
pub fn commitment(dek: &DataKey, file_id: &[u8; 16]) -> [u8; 32] {
    *expand(dek, file_id, LABEL_COMMITMENT).expose()
}

/// Whether `dek` is the key the header committed to (constant time).
pub fn commitment_matches(dek: &DataKey, file_id: &[u8; 16], stored: &[u8; 32]) -> bool {
    ct_eq(&commitment(dek, file_id), stored)
}

/// The key of the header slots' MAC.
/// The volume's header key: the root of every file's header MAC key.
pub fn volume_header_key(volume_key: &DataKey, volume_id: &[u8; 16]) -> DerivedKey {
    expand(volume_key, volume_id, LABEL_HEADER_KEY)
}

/// The key that MACs the header slots of the file `file_id`.
pub fn header_mac_key(volume_header_key: &DerivedKey, file_id: &[u8; 16]) -> DerivedKey {
    expand_bytes(volume_header_key.expose(), file_id, LABEL_HEADER_MAC)
}

/// The key of the rebind records' MAC (docs/FORMAT.md), derived from the volume header key.
pub fn rebind_record_mac_key(volume_header_key: &DerivedKey, volume_id: &[u8; 16]) -> DerivedKey {
    expand_bytes(
        volume_header_key.expose(),
        volume_id,
        LABEL_REBIND_RECORD_MAC,
    )
}

/// The key of the kind tags (docs/FORMAT.md), derived from the volume header key.
pub fn kind_tag_key(volume_header_key: &DerivedKey, volume_id: &[u8; 16]) -> DerivedKey {
    expand_bytes(
        volume_header_key.expose(),
        volume_id,
        super::kind_tag::LABEL_KIND_TAG_KEY,
    )
}

/// Seals a 32-byte key once: AES-256-GCM with the all-zero nonce under the key
/// HKDF-SHA256(IKM = `ikm`, salt = `salt`, info = `label`). The key wrap of local master keys
/// and of volume-wrapped object keys: each wrap has a fresh random 32-byte salt, so each
/// derived key seals once and the fixed nonce never repeats under it. Returns ciphertext ‖ tag.
pub fn seal_key_once(
    ikm: &[u8; 32],
    salt: &[u8],
    label: &[u8],
    aad: &[u8],
    key: &DataKey,
) -> [u8; 48] {
    let mut sealed = key.expose().to_vec();
    once_aead(ikm, salt, label)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad),
            &mut sealed,
        )
        .expect("AES-GCM seals 32 bytes");
    sealed.try_into().expect("32 bytes and a 16-byte tag")
}

/// Opens what [`seal_key_once`] sealed; None if it does not authenticate.
pub fn open_key_once(
    ikm: &[u8; 32],
    salt: &[u8],
    label: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Option<DataKey> {
    let mut buf = zeroize::Zeroizing::new(sealed.to_vec());
    let plain = once_aead(ikm, salt, label)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?;
    DataKey::from_slice(plain)
}

fn once_aead(ikm: &[u8; 32], salt: &[u8], label: &[u8]) -> LessSafeKey {
    let key = expand_bytes(ikm, salt, label);
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.expose()).expect("a 32-byte key is an AES-256 key"),
    )
}

/// The key of the volume config's MAC, derived from the volume key.
pub fn config_mac_key(volume_key: &DataKey, volume_id: &[u8; 16]) -> DerivedKey {
    expand(volume_key, volume_id, LABEL_CONFIG_MAC)
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac(key: &DerivedKey, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Verifies an HMAC-SHA256 tag in constant time.
pub fn hmac_verify(key: &DerivedKey, parts: &[&[u8]], tag: &[u8; 32]) -> bool {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(tag).is_ok()
}

mod subtle_eq {
    /// Constant-time equality of two 32-byte values.
    pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_separate_keys() {
        let dek = DataKey::from_bytes(&[1; 32]);
        let id = [2; 16];
        let a = *content_key(&dek, &id).expose();
        let b = commitment(&dek, &id);
        let vol = volume_header_key(&dek, &id);
        let c = *header_mac_key(&vol, &id).expose();
        let d = *config_mac_key(&dek, &id).expose();
        for (x, y) in [(a, b), (a, c), (b, c), (a, d), (c, d), (*vol.expose(), c)] {
            assert_ne!(x, y);
        }
        assert_ne!(c, *header_mac_key(&vol, &[3; 16]).expose());
        // The file id salts every derivation.
        assert_ne!(a, *content_key(&dek, &[3; 16]).expose());
        assert!(commitment_matches(&dek, &id, &b));
        assert!(!commitment_matches(&DataKey::from_bytes(&[9; 32]), &id, &b));
    }

    #[test]
    fn hmac_detects_change() {
        let key = DerivedKey::new([5; 32]);
        let tag = hmac(&key, &[b"ab", b"c"]);
        assert!(hmac_verify(&key, &[b"a", b"bc"], &tag));
        assert!(!hmac_verify(&key, &[b"abd"], &tag));
    }
}
