//! Encrypted names: how a plaintext file name becomes the name its entry has on the store.
//!
//! Each name is encrypted deterministically (so a lookup computes the stored name and needs no
//! directory scan) with AES-SIV (RFC 5297, AES-256, the `aes-siv` crate), under a key derived
//! from the volume's header key, with the directory's id as associated data: the same name in
//! two directories encrypts differently, and a name moved on the store into another directory
//! no longer decrypts there. A directory's id is the file id of its authenticated record
//! ([`super::object::DIR_RECORD`]), so it needs no bytes of its own and cannot be swapped
//! without the record failing to authenticate at that path. Before encryption the name is
//! padded (PKCS#7) to a multiple of 16 bytes, so the store shows a name's length only to 16
//! bytes, as gocryptfs does. The stored name is the SIV output (16-byte tag, then ciphertext)
//! in unpadded base64url: letters, digits, `-` and `_`, never a `.` or `/`, so it cannot
//! collide with kmsfs's own names (`.kmsfs`, `.kmsfs-dir`, the long-name forms below).
//!
//! A stored name longer than 255 bytes (a plaintext name of 160 bytes or more) cannot be a backing
//! name: it is stored as `kmsfs.long.HASH` (HASH the base64url SHA-256 of the encrypted name),
//! and the encrypted name itself in a side record `kmsfs.long.HASH.name` beside it. The side
//! record needs no MAC: its hash must match the entry's name and its content must then decrypt
//! under the directory's key and id, which nobody without the volume key can arrange.

use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::FormatError;
use crate::secret::DerivedKey;

/// HKDF label of the name key (salt: the volume id; input: the volume header key).
pub const LABEL_NAME_KEY: &[u8] = b"kmsfs/v3 name key";
/// Longest plaintext name (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Longest backing name an encrypted name is stored under as it is.
pub const MAX_SHORT: usize = 255;
/// Prefix of a long name's backing entry.
pub const LONG_PREFIX: &str = "kmsfs.long.";
/// Suffix of a long name's side record (after the entry's own name).
pub const SIDE_SUFFIX: &str = ".name";
/// Longest side record content read (the base64url of a padded 255-byte name and its tag).
pub const MAX_SIDE_RECORD: usize = 512;
const PAD: usize = 16;

/// The AES-SIV key (two AES-256 keys) names are encrypted under, expanded once: a listing
/// decrypts every name in it.
pub struct NameKey(std::sync::Mutex<Aes256Siv>);

impl std::fmt::Debug for NameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameKey(<redacted>)")
    }
}

impl NameKey {
    /// The volume's name key, from its header key.
    pub fn derive(volume_header_key: &DerivedKey, volume_id: &[u8; 16]) -> NameKey {
        let hk = Hkdf::<Sha256>::new(Some(volume_id), volume_header_key.expose());
        let mut key = Zeroizing::new([0u8; 64]);
        hk.expand(LABEL_NAME_KEY, &mut key[..])
            .expect("64 bytes is a valid HKDF-SHA256 length");
        let cipher =
            Aes256Siv::new_from_slice(&key[..]).expect("a 64-byte key is an AES-256-SIV key");
        NameKey(std::sync::Mutex::new(cipher))
    }

    fn cipher(&self) -> std::sync::MutexGuard<'_, Aes256Siv> {
        // A panic while holding it leaves the cipher as it was (its state is only the keys).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where a plaintext name lives in its directory on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredName {
    /// The encrypted name is the backing name.
    Short(String),
    /// Too long for one: the backing name is `kmsfs.long.HASH`, and `encrypted` goes in the
    /// side record [`side_record`]`(backing)`.
    Long { backing: String, encrypted: String },
}

impl StoredName {
    /// The name of the backing entry.
    pub fn backing(&self) -> &str {
        match self {
            StoredName::Short(s) => s,
            StoredName::Long { backing, .. } => backing,
        }
    }
}

/// What a backing entry's name is, in a directory of a volume with encrypted names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryName<'a> {
    /// An encrypted name: decrypt it.
    Short(&'a str),
    /// A long name: its encrypted name is in the side record.
    Long,
    /// A long name's side record: never listed.
    SideRecord,
    /// Nothing kmsfs would have written there as a name (its own names, or planted).
    Other,
}

/// Classifies a backing entry's name.
pub fn classify(name: &[u8]) -> EntryName<'_> {
    let Ok(s) = std::str::from_utf8(name) else {
        return EntryName::Other;
    };
    if let Some(hash) = s.strip_prefix(LONG_PREFIX) {
        if let Some(hash) = hash.strip_suffix(SIDE_SUFFIX) {
            return if is_hash(hash) {
                EntryName::SideRecord
            } else {
                EntryName::Other
            };
        }
        return if is_hash(hash) {
            EntryName::Long
        } else {
            EntryName::Other
        };
    }
    if !s.is_empty() && s.len() <= MAX_SHORT && s.bytes().all(is_b64url) {
        EntryName::Short(s)
    } else {
        EntryName::Other
    }
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_hash(s: &str) -> bool {
    s.len() == 43 && s.bytes().all(is_b64url)
}

/// The backing name of a long encrypted name.
pub fn long_backing_name(encrypted: &str) -> String {
    format!(
        "{LONG_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(Sha256::digest(encrypted.as_bytes()))
    )
}

/// The name of the side record beside the long-name entry `backing`.
pub fn side_record(backing: &str) -> String {
    format!("{backing}{SIDE_SUFFIX}")
}

/// Checks a plaintext name: what a directory entry may be called.
pub fn check_name(name: &[u8]) -> Result<(), FormatError> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(FormatError::InvalidPath(format!(
            "{:?} is not a file name",
            String::from_utf8_lossy(name)
        )));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(FormatError::InvalidPath(
            "a file name holds neither '/' nor NUL".into(),
        ));
    }
    if name.len() > MAX_NAME {
        return Err(FormatError::TooLarge(format!(
            "a name of {} bytes (at most {MAX_NAME})",
            name.len()
        )));
    }
    Ok(())
}

/// Encrypts the name `name` of an entry of the directory whose id is `dir_id`.
pub fn encrypt(key: &NameKey, dir_id: &[u8; 16], name: &[u8]) -> Result<StoredName, FormatError> {
    check_name(name)?;
    let encrypted = seal_padded(key, &dir_id[..], name);
    if encrypted.len() <= MAX_SHORT {
        return Ok(StoredName::Short(encrypted));
    }
    Ok(StoredName::Long {
        backing: long_backing_name(&encrypted),
        encrypted,
    })
}

/// base64url(AES-SIV(`name` padded to 16 bytes (PKCS#7), associated data `ad`)): a name's
/// encryption, of an entry's or an attribute's.
fn seal_padded(key: &NameKey, ad: &[u8], name: &[u8]) -> String {
    let pad = PAD - name.len() % PAD;
    let mut padded = Zeroizing::new(Vec::with_capacity(name.len() + pad));
    padded.extend_from_slice(name);
    padded.resize(name.len() + pad, pad as u8);
    let sealed = key
        .cipher()
        .encrypt([ad], &padded[..])
        .expect("AES-SIV encrypts any length");
    URL_SAFE_NO_PAD.encode(sealed)
}

/// What [`seal_padded`] sealed under `ad`, unpadded; None unless it authenticates and its
/// padding is exact.
fn open_padded(key: &NameKey, ad: &[u8], encrypted: &[u8]) -> Option<Vec<u8>> {
    let sealed = URL_SAFE_NO_PAD.decode(encrypted).ok()?;
    if sealed.len() < 16 + PAD || (sealed.len() - 16) % PAD != 0 {
        return None;
    }
    let mut padded = Zeroizing::new(key.cipher().decrypt([ad], &sealed).ok()?);
    let pad = *padded.last()? as usize;
    if pad == 0
        || pad > PAD
        || padded[padded.len() - pad..]
            .iter()
            .any(|&b| b as usize != pad)
    {
        return None;
    }
    let len = padded.len() - pad;
    padded.truncate(len);
    Some(padded.to_vec())
}

/// Decrypts an encrypted name (a short backing name, or a long name's side record) found in
/// the directory `dir_id`. Fails unless kmsfs encrypted exactly this name in exactly this
/// directory of this volume.
pub fn decrypt(key: &NameKey, dir_id: &[u8; 16], encrypted: &str) -> Result<Vec<u8>, FormatError> {
    let bad = || FormatError::InvalidPath("a name that does not decrypt in its directory".into());
    let name = open_padded(key, &dir_id[..], encrypted.as_bytes()).ok_or_else(bad)?;
    check_name(&name).map_err(|_| bad())?;
    Ok(name)
}

/// The encrypted name a long-name entry `backing` has, from its side record's content: only if
/// the content hashes to the entry's name.
pub fn side_record_name(backing: &str, content: &[u8]) -> Result<String, FormatError> {
    let bad = |why: &str| FormatError::InvalidPath(format!("{backing}: side record {why}"));
    let encrypted = std::str::from_utf8(content).map_err(|_| bad("not text"))?;
    // Only a name too long to be stored as itself has a side record: a short one there would
    // show that name twice (its entry, and the entry this record is beside).
    if encrypted.len() <= MAX_SHORT {
        return Err(bad("holds a name that is not a long one"));
    }
    if long_backing_name(encrypted) != backing {
        return Err(bad("does not match its entry"));
    }
    Ok(encrypted.to_string())
}

/// Prefix of the backing store's extended attribute names that hold a user's (encrypted)
/// attribute: in the `user` namespace, whatever namespace the user named.
pub const XATTR_PREFIX: &str = "user.kmsfs.";
const XATTR_NAME_AD: &[u8] = b"kmsfs/v3 xattr name";
const XATTR_VALUE_AD: &[u8] = b"kmsfs/v3 xattr value";
/// What an encrypted value adds: a random 16-byte nonce and the 16-byte tag.
pub const XATTR_VALUE_OVERHEAD: usize = 32;

/// The backing name of the extended attribute `name` (e.g. `user.comment`): deterministic, so
/// a get or remove names it without a listing. The same for every object of the volume (an
/// attribute moves with a rename and survives a renewal), so the store shows which objects
/// share an attribute name, never the name. Fails (`TooLarge`) past 159 bytes: the result
/// must fit the backing store's 255.
pub fn encrypt_xattr_name(key: &NameKey, name: &[u8]) -> Result<String, FormatError> {
    if name.is_empty() || name.contains(&0) || name.len() > 159 {
        return Err(FormatError::TooLarge(format!(
            "an extended attribute name of {} bytes (at most 159 with encrypted names)",
            name.len()
        )));
    }
    Ok(format!(
        "{XATTR_PREFIX}{}",
        seal_padded(key, XATTR_NAME_AD, name)
    ))
}

/// The user's name of the backing attribute `stored`, if kmsfs encrypted it.
pub fn decrypt_xattr_name(key: &NameKey, stored: &[u8]) -> Option<Vec<u8>> {
    open_padded(
        key,
        XATTR_NAME_AD,
        stored.strip_prefix(XATTR_PREFIX.as_bytes())?,
    )
}

/// Seals an attribute's value for the backing attribute `stored`: AES-SIV with a random nonce
/// (equal values do not show), bound to the attribute's name (a value moved to another
/// attribute does not open). Returns nonce ‖ tag ‖ ciphertext.
pub fn seal_xattr_value(key: &NameKey, stored: &str, nonce: [u8; 16], value: &[u8]) -> Vec<u8> {
    let sealed = key
        .cipher()
        .encrypt([XATTR_VALUE_AD, stored.as_bytes(), &nonce[..]], value)
        .expect("AES-SIV encrypts any length");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    out
}

/// Opens what [`seal_xattr_value`] sealed for `stored`.
pub fn open_xattr_value(
    key: &NameKey,
    stored: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let bad = || {
        FormatError::InvalidHeader(format!(
            "{stored}: an attribute value that does not authenticate"
        ))
    };
    if sealed.len() < XATTR_VALUE_OVERHEAD {
        return Err(bad());
    }
    let (nonce, rest) = sealed.split_at(16);
    key.cipher()
        .decrypt([XATTR_VALUE_AD, stored.as_bytes(), nonce], rest)
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> NameKey {
        NameKey::derive(&DerivedKey::new([7; 32]), &[1; 16])
    }

    #[test]
    fn names_round_trip_and_depend_on_the_directory() {
        let key = key();
        for len in [1, 15, 16, 17, 159, 160, 175, 255] {
            let name = vec![b'x'; len];
            let stored = encrypt(&key, &[2; 16], &name).unwrap();
            let encrypted = match &stored {
                StoredName::Short(s) => {
                    assert!(len < 160, "{len}");
                    assert_eq!(classify(s.as_bytes()), EntryName::Short(s));
                    s.clone()
                }
                StoredName::Long { backing, encrypted } => {
                    assert!(len >= 160, "{len}");
                    assert!(backing.len() <= 255);
                    assert_eq!(classify(backing.as_bytes()), EntryName::Long);
                    assert_eq!(
                        classify(side_record(backing).as_bytes()),
                        EntryName::SideRecord
                    );
                    assert_eq!(
                        &side_record_name(backing, encrypted.as_bytes()).unwrap(),
                        encrypted
                    );
                    encrypted.clone()
                }
            };
            assert!(!encrypted.starts_with('.') && !encrypted.contains('/'));
            assert_eq!(decrypt(&key, &[2; 16], &encrypted).unwrap(), name);
            assert!(decrypt(&key, &[3; 16], &encrypted).is_err());
            assert_ne!(encrypt(&key, &[3; 16], &name).unwrap(), stored);
            // Deterministic: a lookup computes the same stored name.
            assert_eq!(encrypt(&key, &[2; 16], &name).unwrap(), stored);
        }
    }

    #[test]
    fn lengths_show_only_to_sixteen_bytes() {
        let key = key();
        let len = |n: usize| {
            encrypt(&key, &[0; 16], &vec![b'a'; n])
                .unwrap()
                .backing()
                .len()
        };
        assert_eq!(len(1), len(15));
        assert_ne!(len(15), len(16));
    }

    #[test]
    fn a_tampered_or_foreign_name_does_not_decrypt() {
        let key = key();
        let StoredName::Short(s) = encrypt(&key, &[0; 16], b"patient-4711.pdf").unwrap() else {
            panic!()
        };
        let mut flipped = s.clone().into_bytes();
        flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
        assert!(decrypt(&key, &[0; 16], std::str::from_utf8(&flipped).unwrap()).is_err());
        let other = NameKey::derive(&DerivedKey::new([8; 32]), &[1; 16]);
        assert!(decrypt(&other, &[0; 16], &s).is_err());
        assert!(side_record_name(&long_backing_name("abc"), b"abd").is_err());
        // A short name in a side record (hashed to match) is not a name.
        assert!(side_record_name(&long_backing_name(&s), s.as_bytes()).is_err());
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(encrypt(&key, &[0; 16], bad).is_err());
        }
    }

    #[test]
    fn xattr_names_and_values_round_trip_and_do_not_move() {
        let key = key();
        let stored = encrypt_xattr_name(&key, b"user.patient").unwrap();
        assert!(stored.starts_with(XATTR_PREFIX) && stored.len() <= 255);
        assert!(!stored.contains("patient"));
        assert_eq!(
            decrypt_xattr_name(&key, stored.as_bytes()).unwrap(),
            b"user.patient"
        );
        assert_eq!(encrypt_xattr_name(&key, b"user.patient").unwrap(), stored);
        assert!(decrypt_xattr_name(&key, b"user.plain").is_none());
        assert!(encrypt_xattr_name(&key, &[b'x'; 160]).is_err());
        assert!(encrypt_xattr_name(&key, &[b'x'; 159]).unwrap().len() <= 255);
        let other = encrypt_xattr_name(&key, b"user.other").unwrap();
        let v = seal_xattr_value(&key, &stored, [1; 16], b"hiv positive");
        let w = seal_xattr_value(&key, &stored, [2; 16], b"hiv positive");
        assert_ne!(v, w, "equal values do not show");
        assert_eq!(
            open_xattr_value(&key, &stored, &v).unwrap(),
            b"hiv positive"
        );
        assert!(
            open_xattr_value(&key, &other, &v).is_err(),
            "moved to another name"
        );
        let mut t = v.clone();
        t[20] ^= 1;
        assert!(open_xattr_value(&key, &stored, &t).is_err());
    }

    #[test]
    fn kmsfs_own_names_are_never_encrypted_names() {
        for own in [".kmsfs", ".kmsfs-dir", "kmsfs.long.x", ".tmp123"] {
            assert!(!matches!(classify(own.as_bytes()), EntryName::Short(_)));
        }
    }
}
