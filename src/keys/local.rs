//! The local key provider: a 32-byte master key file standing in for a KMS key.
//!
//! It keeps KMS semantics so a volume behaves the same on any Linux box: data keys come from
//! `generate_data_key`, are wrapped with AES-256-GCM under a key derived from the master key,
//! and the canonical encryption context is the associated data, so unwrapping under another
//! context (a moved file, another volume) fails exactly as KMS `Decrypt` would. The key id is
//! `local:<fingerprint>`, a keyed hash of the master key, so it names the key without
//! revealing it and survives moving the key file.
//!
//! A wrapped key is `0x02 ‖ fingerprint (16) ‖ salt (32) ‖ AES-GCM(DEK) (32) ‖ tag (16)`,
//! 97 bytes; the fingerprint lets a key tell "not mine" apart from "context mismatch".
//!
//! Each wrap has a key of its own: HKDF-SHA256(IKM = master, salt = a random 32-byte value
//! stored in the blob, info = `kmsfs/v2 local wrap key`), used for that one AES-256-GCM
//! encryption with an all-zero nonce. One AES-GCM key with random 96-bit nonces would have to
//! stay under 2^32 wraps (the random-nonce bound), and a volume wraps a key per file and per
//! name; with a key per wrap, two wraps share a key only if two random 256-bit salts collide,
//! so the master key has no wrap budget to run out of.

// Key files are the operator's paths, never inside the store (init and rewrap refuse that).
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{KeyError, KeyErrorKind, KeyProvider, KmsOp};
use crate::format::codec::hex;
use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::format::kdf;
use crate::secret::DataKey;

const BLOB_VERSION: u8 = 2;
const SALT_LEN: usize = 32;
pub const WRAPPED_LEN: usize = 1 + 16 + SALT_LEN + 32 + 16;
const AAD_LABEL: &[u8] = b"kmsfs/v1 local wrap";
/// The label of each wrap's own key (see [`kdf::seal_key_once`]).
const WRAP_KEY_LABEL: &[u8] = b"kmsfs/v2 local wrap key";

/// One master key loaded from its file.
pub struct LocalKey {
    id: String,
    fingerprint: [u8; 16],
    master: Zeroizing<[u8; 32]>,
    path: PathBuf,
}

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalKey({}, {})", self.id, self.path.display())
    }
}

impl LocalKey {
    /// Loads a key file, refusing one that others could read or that is not exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("key file {shown} does not exist"),
            _ => format!("cannot read key file {shown}: {e}"),
        })?;
        if !meta.is_file() {
            return Err(format!("key file {shown} is not a regular file"));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "key file {shown} is readable by group or others (mode {mode:04o}); run chmod 600 on it"
            ));
        }
        let bytes = Zeroizing::new(
            fs::read(path).map_err(|e| format!("cannot read key file {shown}: {e}"))?,
        );
        let master: &[u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "key file {shown} must hold exactly 32 bytes, it holds {}",
                bytes.len()
            )
        })?;
        Ok(Self::from_master(master, path))
    }

    /// Creates a new key file (0600, in a 0700 directory created if missing) and loads it.
    pub fn create(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                fs::create_dir_all(dir)
                    .and_then(|_| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                    .map_err(|e| format!("cannot create key directory {}: {e}", dir.display()))?;
            }
        }
        let master = DataKey::random();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot create key file {shown}: {e}"))?;
        file.write_all(master.expose())
            .and_then(|_| file.sync_all())
            .map_err(|e| format!("cannot write key file {shown}: {e}"))?;
        Ok(Self::from_master(master.expose(), path))
    }

    fn from_master(master: &[u8; 32], path: &Path) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("any key length");
        mac.update(b"kmsfs/v1 local key id");
        let fingerprint: [u8; 16] = mac.finalize().into_bytes()[..16].try_into().expect("16");
        LocalKey {
            id: format!("local:{}", hex(&fingerprint)),
            fingerprint,
            master: Zeroizing::new(*master),
            path: path.to_path_buf(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad(&self, ctx: &EncryptionContext) -> Vec<u8> {
        let mut aad = AAD_LABEL.to_vec();
        aad.extend_from_slice(&self.fingerprint);
        aad.extend_from_slice(&ctx.serialize());
        aad
    }

    fn wrap(
        &self,
        op: KmsOp,
        key: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).map_err(|e| {
            KeyError::new(
                KeyErrorKind::Unavailable,
                op,
                &self.id,
                format!("no randomness: {e}"),
            )
        })?;
        let ct = kdf::seal_key_once(&self.master, &salt, WRAP_KEY_LABEL, &self.aad(ctx), key);
        let mut blob = Vec::with_capacity(WRAPPED_LEN);
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&self.fingerprint);
        blob.extend_from_slice(&salt);
        blob.extend_from_slice(&ct);
        Ok(WrappedKey {
            key_id: self.id.clone(),
            blob,
        })
    }

    fn unwrap(
        &self,
        op: KmsOp,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        let err = |kind, detail: &str| KeyError::new(kind, op, &self.id, detail);
        let b = &wrapped.blob;
        if b.len() != WRAPPED_LEN || b[0] != BLOB_VERSION {
            return Err(err(KeyErrorKind::ContextMismatch, "malformed wrapped key"));
        }
        if b[1..17] != self.fingerprint {
            return Err(err(
                KeyErrorKind::IncorrectKey,
                "the wrapped key names another master key",
            ));
        }
        kdf::open_key_once(
            &self.master,
            &b[17..17 + SALT_LEN],
            WRAP_KEY_LABEL,
            &self.aad(ctx),
            &b[17 + SALT_LEN..],
        )
        .ok_or_else(|| {
            err(
                KeyErrorKind::ContextMismatch,
                "the wrapped key does not open under this encryption context",
            )
        })
    }
}

/// A provider over one or more local master keys.
#[derive(Default)]
pub struct LocalProvider {
    keys: HashMap<String, LocalKey>,
}

impl LocalProvider {
    pub fn new(keys: impl IntoIterator<Item = LocalKey>) -> Self {
        LocalProvider {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        }
    }

    fn key(&self, op: KmsOp, key_id: &str) -> Result<&LocalKey, KeyError> {
        self.keys.get(key_id).ok_or_else(|| {
            KeyError::new(
                KeyErrorKind::NotFound,
                op,
                key_id,
                "no such local key file is loaded",
            )
        })
    }
}

impl KeyProvider for LocalProvider {
    fn answers_in_process(&self) -> bool {
        true
    }

    fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        let key = self.key(KmsOp::GenerateDataKey, key_id)?;
        let dek = DataKey::random();
        let wrapped = key.wrap(KmsOp::GenerateDataKey, &dek, ctx)?;
        Ok((dek, wrapped))
    }

    fn encrypt(
        &self,
        key_id: &str,
        dek: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.key(KmsOp::Encrypt, key_id)?
            .wrap(KmsOp::Encrypt, dek, ctx)
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KeyError> {
        self.key(KmsOp::Decrypt, &wrapped.key_id)?
            .unwrap(KmsOp::Decrypt, wrapped, ctx)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        from_ctx: &EncryptionContext,
        to_key_id: &str,
        to_ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let from = self.key(KmsOp::ReEncrypt, &wrapped.key_id)?;
        let to = self.key(KmsOp::ReEncrypt, to_key_id)?;
        let dek = from.unwrap(KmsOp::ReEncrypt, wrapped, from_ctx)?;
        to.wrap(KmsOp::ReEncrypt, &dek, to_ctx)
    }

    fn can_re_encrypt(&self, from_key: &str, to_key: &str) -> bool {
        self.keys.contains_key(from_key) && self.keys.contains_key(to_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::context::CanonicalPath;
    use std::collections::BTreeMap;

    fn ctx(path: &str, volume: u8) -> EncryptionContext {
        EncryptionContext::for_file(
            &[volume; 16],
            &CanonicalPath::from_user(Path::new(path)).unwrap(),
            &BTreeMap::new(),
        )
    }

    fn provider(dir: &Path, names: &[&str]) -> (LocalProvider, Vec<String>) {
        let keys: Vec<LocalKey> = names
            .iter()
            .map(|n| LocalKey::create(&dir.join(n)).unwrap())
            .collect();
        let ids = keys.iter().map(|k| k.id().to_string()).collect();
        (LocalProvider::new(keys), ids)
    }

    #[test]
    fn round_trip_and_context_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ids) = provider(dir.path(), &["a.key"]);
        let (dek, w) = p.generate_data_key(&ids[0], &ctx("f", 1)).unwrap();
        assert_eq!(w.blob.len(), WRAPPED_LEN);
        assert_eq!(p.decrypt(&w, &ctx("f", 1)).unwrap().expose(), dek.expose());
        assert_eq!(
            p.decrypt(&w, &ctx("g", 1)).unwrap_err().kind,
            KeyErrorKind::ContextMismatch
        );
        assert_eq!(
            p.decrypt(&w, &ctx("f", 2)).unwrap_err().kind,
            KeyErrorKind::ContextMismatch
        );
    }

    #[test]
    fn every_wrap_has_its_own_key_and_the_old_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ids) = provider(dir.path(), &["a.key"]);
        let (dek, w1) = p.generate_data_key(&ids[0], &ctx("f", 1)).unwrap();
        let w2 = p.encrypt(&ids[0], &dek, &ctx("f", 1)).unwrap();
        assert_eq!(w1.blob[0], BLOB_VERSION);
        // Fresh salts: the same key under the same context wraps to unrelated blobs.
        assert_ne!(w1.blob[17..49], w2.blob[17..49]);
        assert_ne!(w1.blob[49..], w2.blob[49..]);
        // A salt changed: another wrap key, the blob no longer opens.
        let mut bad = w1.clone();
        bad.blob[20] ^= 1;
        assert_eq!(
            p.decrypt(&bad, &ctx("f", 1)).unwrap_err().kind,
            KeyErrorKind::ContextMismatch
        );
        // The version 1 layout (77 bytes, one wrap key with random nonces) is not read.
        let mut v1 = w1.clone();
        v1.blob[0] = 1;
        v1.blob.truncate(77);
        assert!(p.decrypt(&v1, &ctx("f", 1)).is_err());
    }

    #[test]
    fn key_file_reloads_to_same_id_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let created = LocalKey::create(&path).unwrap();
        let loaded = LocalKey::load(&path).unwrap();
        assert_eq!(created.id(), loaded.id());
        assert!(created.id().starts_with("local:") && created.id().len() == 38);
        let p1 = LocalProvider::new([created]);
        let p2 = LocalProvider::new([loaded]);
        let id = p1.keys.keys().next().unwrap().clone();
        let (dek, w) = p1.generate_data_key(&id, &ctx("f", 1)).unwrap();
        assert_eq!(p2.decrypt(&w, &ctx("f", 1)).unwrap().expose(), dek.expose());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn key_files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        LocalKey::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = LocalKey::load(&path).unwrap_err();
        assert!(err.contains("readable by group or others"), "{err}");
    }

    #[test]
    fn key_files_of_wrong_length_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 31, 33] {
            let path = dir.path().join(format!("k{len}"));
            fs::write(&path, vec![1u8; len]).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            assert!(LocalKey::load(&path)
                .unwrap_err()
                .contains("exactly 32 bytes"));
        }
        assert!(LocalKey::load(&dir.path().join("missing"))
            .unwrap_err()
            .contains("does not exist"));
    }

    #[test]
    fn wrong_key_is_incorrect_key_not_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ids) = provider(dir.path(), &["a", "b"]);
        let (_, mut w) = p.generate_data_key(&ids[0], &ctx("f", 1)).unwrap();
        w.key_id = ids[1].clone(); // relabelled envelope
        assert_eq!(
            p.decrypt(&w, &ctx("f", 1)).unwrap_err().kind,
            KeyErrorKind::IncorrectKey
        );
    }

    #[test]
    fn re_encrypt_moves_context_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ids) = provider(dir.path(), &["a", "b"]);
        let (dek, w) = p.generate_data_key(&ids[0], &ctx("old", 1)).unwrap();
        let w2 = p
            .re_encrypt(&w, &ctx("old", 1), &ids[1], &ctx("new", 1))
            .unwrap();
        assert_eq!(w2.key_id, ids[1]);
        assert_eq!(
            p.decrypt(&w2, &ctx("new", 1)).unwrap().expose(),
            dek.expose()
        );
        assert!(p.decrypt(&w2, &ctx("old", 1)).is_err());
        assert_eq!(
            p.re_encrypt(&w, &ctx("wrong", 1), &ids[1], &ctx("new", 1))
                .unwrap_err()
                .kind,
            KeyErrorKind::ContextMismatch
        );
    }
}
