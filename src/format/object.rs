//! Data keys wrapped under the volume: for objects that are not files.
//!
//! A symlink, fifo, socket, device node or directory record is stored like a file (a header
//! and blocks: the symlink's target, or nothing), so it is bound to its path and volume the
//! same way and moves with rename. Its data key does not come from the key service: it is
//! random, and wrapped under a key derived from the volume key, with the object's encryption
//! context as associated data, under the pseudo key id [`OBJECT_KEY_ID`]. Creating, reading
//! and renaming such an object costs no key call. docs/FORMAT.md argues why this is sound:
//! whoever can unwrap these keys can already forge every header MAC, and the kinds that hold
//! user data never accept this key id (see [`super::header::key_fits_kind`]).
//!
//! Each wrap derives its own AES-256-GCM key from a fresh random 32-byte salt, so a key is
//! used for exactly one encryption and the all-zero nonce is safe; no wrap budget applies.

use super::context::EncryptionContext;
use super::envelope::WrappedKey;
use super::kdf;
use crate::secret::{DataKey, DerivedKey};

/// The key id of envelopes wrapped under the volume (never a key-service key: `kmsfs:` ids
/// are refused as trusted keys).
pub const OBJECT_KEY_ID: &str = "kmsfs:volume";
/// The name, in every backing directory, of that directory's record (its authenticated mode
/// and owner). Reserved: never a user's name.
pub const DIR_RECORD: &str = ".kmsfs-dir";
const BLOB_VERSION: u8 = 1;
const SALT_LEN: usize = 32;
/// version (1) ‖ salt (32) ‖ AES-256-GCM(DEK) (32) ‖ tag (16).
pub const WRAPPED_LEN: usize = 1 + SALT_LEN + 32 + 16;

/// Wraps `dek` for an object whose context is `ctx`, with the caller's random `salt`.
pub fn wrap(
    volume_header_key: &DerivedKey,
    dek: &DataKey,
    ctx: &EncryptionContext,
    salt: [u8; SALT_LEN],
) -> WrappedKey {
    let sealed = kdf::seal_key_once(
        volume_header_key.expose(),
        &salt,
        kdf::LABEL_OBJECT_WRAP,
        &ctx.serialize(),
        dek,
    );
    let mut blob = Vec::with_capacity(WRAPPED_LEN);
    blob.push(BLOB_VERSION);
    blob.extend_from_slice(&salt);
    blob.extend_from_slice(&sealed);
    WrappedKey {
        key_id: OBJECT_KEY_ID.into(),
        blob,
    }
}

/// Wraps `dek` with a fresh salt from the OS.
pub fn wrap_random(
    volume_header_key: &DerivedKey,
    dek: &DataKey,
    ctx: &EncryptionContext,
) -> WrappedKey {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt).expect("the OS random number generator failed");
    wrap(volume_header_key, dek, ctx, salt)
}

/// Unwraps an object's data key; None if it was not wrapped under this volume for `ctx`.
pub fn unwrap(
    volume_header_key: &DerivedKey,
    wrapped: &WrappedKey,
    ctx: &EncryptionContext,
) -> Option<DataKey> {
    let b = &wrapped.blob;
    if wrapped.key_id != OBJECT_KEY_ID || b.len() != WRAPPED_LEN || b[0] != BLOB_VERSION {
        return None;
    }
    kdf::open_key_once(
        volume_header_key.expose(),
        &b[1..1 + SALT_LEN],
        kdf::LABEL_OBJECT_WRAP,
        &ctx.serialize(),
        &b[1 + SALT_LEN..],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::context::CanonicalPath;
    use std::collections::BTreeMap;
    use std::path::Path;

    fn ctx(path: &str, volume: u8) -> EncryptionContext {
        EncryptionContext::for_file(
            &[volume; 16],
            &CanonicalPath::from_user(Path::new(path)).unwrap(),
            &BTreeMap::new(),
        )
    }

    #[test]
    fn a_wrap_opens_only_under_its_own_context_and_volume() {
        let root = DerivedKey::new([7; 32]);
        let dek = DataKey::from_bytes(&[9; 32]);
        let w = wrap(&root, &dek, &ctx("/a/link", 1), [3; 32]);
        assert_eq!(w.blob.len(), WRAPPED_LEN);
        let back = unwrap(&root, &w, &ctx("/a/link", 1)).unwrap();
        assert_eq!(back.expose(), dek.expose());
        assert!(unwrap(&root, &w, &ctx("/b/link", 1)).is_none());
        assert!(unwrap(&root, &w, &ctx("/a/link", 2)).is_none());
        assert!(unwrap(&DerivedKey::new([8; 32]), &w, &ctx("/a/link", 1)).is_none());
        let mut flipped = w.clone();
        flipped.blob[40] ^= 1;
        assert!(unwrap(&root, &flipped, &ctx("/a/link", 1)).is_none());
    }

    #[test]
    fn each_wrap_uses_its_own_key() {
        let root = DerivedKey::new([7; 32]);
        let dek = DataKey::from_bytes(&[9; 32]);
        let a = wrap_random(&root, &dek, &ctx("/x", 1));
        let b = wrap_random(&root, &dek, &ctx("/x", 1));
        assert_ne!(a.blob, b.blob);
    }
}
