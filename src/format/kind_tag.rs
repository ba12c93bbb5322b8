//! The kind tag: which kind of object a regular backing file holds, told without its header.
//!
//! Every object but a directory lives in a regular backing file whose kind (file, symlink,
//! fifo...) only its header says, and a directory listing must give each entry's kind: reading
//! every header of a 100,000-file directory is 100,000 disk reads where a listing otherwise
//! needs none. So kmsfs also keeps the kind in an extended attribute of the backing file, MACed
//! under the volume with the path it was made at; a listing takes the kind from there when the
//! tag verifies for that path and reads the header otherwise. The tag is a hint with a
//! guarantee: the store's writer cannot forge one, only put back one kmsfs wrote for the same
//! path (an earlier object's there: the whole-file rollback docs/SECURITY.md leaves out of
//! scope). Everything but the listing's entry type (every stat, lookup and open) still comes
//! from the header.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::context::CanonicalPath;
use super::header::ObjectKind;
use crate::secret::DerivedKey;

/// The backing extended attribute that holds the tag.
pub const XATTR: &std::ffi::CStr = c"user.kmsfs.kind";
/// HKDF label of the tag key (salt: the volume id; input: the volume header key).
pub const LABEL_KIND_TAG_KEY: &[u8] = b"kmsfs/v3 kind tag key";
/// What the MAC input starts with.
const DOMAIN: &[u8] = b"kmsfs/v3 kind tag";
/// Bytes of a tag: the kind, then the first 16 bytes of the MAC.
pub const LEN: usize = 17;

/// The tag of an object of `kind` made (or last listed) at stored path `path`.
pub fn tag(key: &DerivedKey, path: &CanonicalPath, kind: ObjectKind) -> [u8; LEN] {
    let mac = mac(key, path, kind as u8).finalize().into_bytes();
    let mut out = [0u8; LEN];
    out[0] = kind as u8;
    out[1..].copy_from_slice(&mac[..LEN - 1]);
    out
}

/// The kind `value` tells for stored path `path`; None unless it is a tag kmsfs made for that
/// path (never a directory: those are backing directories).
pub fn verify(key: &DerivedKey, path: &CanonicalPath, value: &[u8]) -> Option<ObjectKind> {
    let (&kind, tag) = value.split_first().filter(|_| value.len() == LEN)?;
    let kind = ObjectKind::from_byte(kind).filter(|k| *k != ObjectKind::Dir)?;
    // (Constant time.)
    mac(key, path, kind as u8)
        .verify_truncated_left(tag)
        .is_ok()
        .then_some(kind)
}

fn mac(key: &DerivedKey, path: &CanonicalPath, kind: u8) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key");
    let path = path.as_str().as_bytes();
    m.update(DOMAIN);
    m.update(&(path.len() as u16).to_be_bytes());
    m.update(path);
    m.update(&[kind]);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::kdf;

    fn key() -> DerivedKey {
        kdf::kind_tag_key(&DerivedKey::new([0x42; 32]), &[0x11; 16])
    }

    fn p(s: &str) -> CanonicalPath {
        CanonicalPath::from_user(std::path::Path::new(s)).unwrap()
    }

    #[test]
    fn a_tag_verifies_for_its_path_and_kind_only() {
        let t = tag(&key(), &p("/a/b"), ObjectKind::Symlink);
        assert_eq!(verify(&key(), &p("/a/b"), &t), Some(ObjectKind::Symlink));
        // Moved to another path, its kind byte changed, cut, or under another volume's key.
        assert_eq!(verify(&key(), &p("/a/c"), &t), None);
        let mut other = t;
        other[0] = ObjectKind::File as u8;
        assert_eq!(verify(&key(), &p("/a/b"), &other), None);
        assert_eq!(verify(&key(), &p("/a/b"), &t[..16]), None);
        let elsewhere = kdf::kind_tag_key(&DerivedKey::new([0x42; 32]), &[0x12; 16]);
        assert_eq!(verify(&elsewhere, &p("/a/b"), &t), None);
    }

    #[test]
    fn a_directory_is_never_tagged() {
        let t = tag(&key(), &p("/a"), ObjectKind::Dir);
        assert_eq!(verify(&key(), &p("/a"), &t), None);
    }

    /// The vector in docs/FORMAT.md ("Kind tags").
    #[test]
    fn the_documented_vector() {
        let t = tag(&key(), &p("/d/x"), ObjectKind::Symlink);
        let hex: String = t.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "03361b309fa38a388f789fac70ff7c80e3");
    }
}
