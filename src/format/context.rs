//! The encryption context and the canonical path form it carries.
//!
//! Every wrap and unwrap of a data key names the volume and the file's path, so a file moved
//! or copied on the backing store fails to decrypt, CloudTrail shows which file was unwrapped,
//! and key policies can scope a role to a volume or tenant. Where kmsfs authenticates a
//! context itself (the local provider), it serializes it exactly as the AWS Encryption SDK
//! does: u16 pair count, then per pair sorted by key bytes a u16-length-prefixed key and value.
//!
//! Paths are relative to the volume root in one canonical form: a leading `/`, components
//! separated by single `/`, no `.` or `..`, no trailing slash. KMS context values are UTF-8
//! strings, but Linux file names are bytes, so each component is encoded reversibly: valid
//! UTF-8 is kept except `%`, which becomes `%25`; every byte of an invalid UTF-8 sequence
//! becomes `%XX` (upper-case hex). A name that is valid UTF-8 and has no `%` reads in
//! CloudTrail exactly as on disk.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::codec::Writer;
use super::FormatError;

/// Context key naming the volume (hex volume id).
pub const CONTEXT_VOLUME: &str = "kmsfs:volume";
/// Context key naming the file's canonical path.
pub const CONTEXT_PATH: &str = "kmsfs:path";
/// Context key naming a non-file use of a data key (the volume config key).
pub const CONTEXT_PURPOSE: &str = "kmsfs:purpose";
/// Prefix reserved for kmsfs's own context keys; user pairs may not use it.
pub const RESERVED_PREFIX: &str = "kmsfs:";
/// Longest encoded path accepted: what a u16 length holds (headers, rebind records and the
/// context's serialization prefix it with one). A path the mount sees is at most 4096 bytes
/// (PATH_MAX), but stored with encrypted names it is longer (docs/FORMAT.md, "Names").
pub const MAX_ENCODED_PATH: usize = u16::MAX as usize;

/// A canonical, validated encryption context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// The context a file's data key is bound to.
    pub fn for_file(
        volume_id: &[u8; 16],
        path: &CanonicalPath,
        static_pairs: &BTreeMap<String, String>,
    ) -> Self {
        let mut map = static_pairs.clone();
        map.insert(CONTEXT_VOLUME.into(), super::codec::hex(volume_id));
        map.insert(CONTEXT_PATH.into(), path.as_str().into());
        EncryptionContext(map)
    }

    /// The context of the volume key that authenticates the config.
    pub fn for_volume_config(
        volume_id: &[u8; 16],
        static_pairs: &BTreeMap<String, String>,
    ) -> Self {
        let mut map = static_pairs.clone();
        map.insert(CONTEXT_VOLUME.into(), super::codec::hex(volume_id));
        map.insert(CONTEXT_PURPOSE.into(), "volume-config".into());
        EncryptionContext(map)
    }

    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The path this context binds, if it is a file context.
    pub fn path(&self) -> Option<&str> {
        self.get(CONTEXT_PATH)
    }

    /// The AWS Encryption SDK serialization (sorted by key bytes; `BTreeMap<String, _>` orders
    /// by bytes, which is the order the SDK specifies).
    pub fn serialize(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(u16::try_from(self.0.len()).expect("context has fewer than 65536 pairs"));
        for (k, v) in &self.0 {
            w.lp16(k.as_bytes()).lp16(v.as_bytes());
        }
        w.into_bytes()
    }

    /// A short `k=v, k=v` rendering for log lines (contexts hold no secrets).
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Checks a user-supplied static context pair.
pub fn validate_static_pair(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("context key must not be empty".into());
    }
    if key.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "context key '{key}' uses the reserved prefix '{RESERVED_PREFIX}'"
        ));
    }
    if key.len() > 1024 || value.len() > 1024 {
        return Err(format!("context pair '{key}' is longer than 1024 bytes"));
    }
    if key.chars().chain(value.chars()).any(char::is_control) {
        return Err(format!("context pair '{key}' contains a control character"));
    }
    Ok(())
}

/// A path relative to the volume root, in canonical encoded form (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanonicalPath(String);

impl CanonicalPath {
    pub fn root() -> Self {
        CanonicalPath("/".into())
    }

    /// Canonicalizes a path as a user types it relative to the volume root: `a/b`, `/a/b`,
    /// `./a//b/` all give `/a/b`. `..` is refused rather than resolved, because resolving it
    /// would need the file system and could escape the volume.
    pub fn from_user(path: &Path) -> Result<Self, FormatError> {
        let mut out = String::new();
        for comp in path.as_os_str().as_bytes().split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => {
                    return Err(FormatError::InvalidPath(format!(
                        "'{}' contains '..'",
                        path.display()
                    )))
                }
                name => {
                    out.push('/');
                    encode_component(name, &mut out);
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Self::check_len(out)
    }

    /// Validates a path read from the backing store (a header's bound path): it must already
    /// be canonical, so two spellings of one path can never both verify.
    pub fn from_encoded(s: &str) -> Result<Self, FormatError> {
        let bad = |why: &str| FormatError::InvalidPath(format!("'{s}' is not canonical: {why}"));
        if s == "/" {
            return Ok(Self::root());
        }
        let rest = s.strip_prefix('/').ok_or_else(|| bad("no leading '/'"))?;
        let mut reencoded = String::with_capacity(s.len());
        for comp in rest.split('/') {
            if comp.is_empty() || comp == "." || comp == ".." {
                return Err(bad("empty, '.' or '..' component"));
            }
            let decoded = decode_component(comp).ok_or_else(|| bad("bad escape"))?;
            reencoded.push('/');
            encode_component(&decoded, &mut reencoded);
        }
        if reencoded != s {
            return Err(bad("non-canonical escape"));
        }
        Self::check_len(reencoded)
    }

    fn check_len(s: String) -> Result<Self, FormatError> {
        if s.len() > MAX_ENCODED_PATH {
            return Err(FormatError::InvalidPath("path too long".into()));
        }
        Ok(CanonicalPath(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The path's bytes on disk, relative (no leading '/'), for joining onto the backing root.
    pub fn to_relative_path(&self) -> PathBuf {
        let mut bytes = Vec::with_capacity(self.0.len());
        for (i, comp) in self.0[1..].split('/').filter(|c| !c.is_empty()).enumerate() {
            if i > 0 {
                bytes.push(b'/');
            }
            bytes.extend(decode_component(comp).expect("canonical paths decode"));
        }
        PathBuf::from(OsStr::from_bytes(&bytes))
    }

    /// The directory holding this path (None for the root).
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/').expect("canonical paths start with '/'");
        Some(CanonicalPath(if cut == 0 {
            "/".to_string()
        } else {
            self.0[..cut].to_string()
        }))
    }

    /// The raw bytes of the last component (None for the root).
    pub fn file_name(&self) -> Option<Vec<u8>> {
        let cut = self.0.rfind('/')?;
        decode_component(self.0.get(cut + 1..).filter(|c| !c.is_empty())?)
    }

    /// The child `name` (raw bytes of one component) of this directory path.
    pub fn join(&self, name: &[u8]) -> Result<Self, FormatError> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(FormatError::InvalidPath("bad file name".into()));
        }
        let mut out = if self.is_root() {
            String::new()
        } else {
            self.0.clone()
        };
        out.push('/');
        encode_component(name, &mut out);
        Self::check_len(out)
    }
}

impl std::fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn encode_component(name: &[u8], out: &mut String) {
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn decode_component(comp: &str) -> Option<Vec<u8>> {
    let bytes = comp.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = comp.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(s: &[u8]) -> Result<CanonicalPath, FormatError> {
        CanonicalPath::from_user(Path::new(OsStr::from_bytes(s)))
    }

    #[test]
    fn parents_walk_up_to_the_root() {
        let p = user(b"a/b%/c").unwrap();
        let parents: Vec<String> = std::iter::successors(Some(p), |p| p.parent())
            .map(|p| p.as_str().to_string())
            .collect();
        assert_eq!(parents, ["/a/b%25/c", "/a/b%25", "/a", "/"]);
    }

    #[test]
    fn user_paths_canonicalize() {
        for (input, want) in [
            (&b"a/b"[..], "/a/b"),
            (b"/a/b", "/a/b"),
            (b"./a//b/", "/a/b"),
            (b"", "/"),
            (b"/", "/"),
            (b"50%", "/50%25"),
            (b"caf\xc3\xa9", "/caf\u{e9}"),
            (b"bad\xff\xfename", "/bad%FF%FEname"),
        ] {
            assert_eq!(user(input).unwrap().as_str(), want, "{input:?}");
        }
        assert!(user(b"a/../b").is_err());
    }

    #[test]
    fn encoded_paths_must_be_canonical() {
        for ok in ["/", "/a", "/a/b", "/50%25", "/bad%FF"] {
            assert!(CanonicalPath::from_encoded(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a", "/a/", "//a", "/a//b", "/./a", "/a/..", "/%41", "/%ff", "/%2", "/%00", "/50%",
            "/%C3%A9", // valid UTF-8 must not be escaped
        ] {
            assert!(CanonicalPath::from_encoded(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn join_and_relative_path() {
        let p = CanonicalPath::root()
            .join(b"dir")
            .unwrap()
            .join(b"f\xff")
            .unwrap();
        assert_eq!(p.as_str(), "/dir/f%FF");
        assert_eq!(p.to_relative_path().as_os_str().as_bytes(), b"dir/f\xff");
        assert!(p.join(b"..").is_err());
        assert!(p.join(b"a/b").is_err());
        assert_eq!(p.file_name().unwrap(), b"f\xff");
        assert_eq!(p.parent().unwrap().file_name().unwrap(), b"dir");
        assert_eq!(CanonicalPath::root().file_name(), None);
    }

    #[test]
    fn context_serializes_like_the_encryption_sdk() {
        let mut pairs = BTreeMap::new();
        pairs.insert("tenant".to_string(), "t1".to_string());
        let ctx = EncryptionContext::for_file(&[0u8; 16], &user(b"x").unwrap(), &pairs);
        let bytes = ctx.serialize();
        // count=3, then kmsfs:path, kmsfs:volume, tenant in byte order.
        assert_eq!(&bytes[..2], &[0, 3]);
        assert_eq!(&bytes[2..4], &[0, 10]);
        assert_eq!(&bytes[4..14], b"kmsfs:path");
        assert_eq!(&bytes[14..16], &[0, 2]);
        assert_eq!(&bytes[16..18], b"/x");
        assert!(bytes.ends_with(b"\x00\x06tenant\x00\x02t1"));
    }

    #[test]
    fn static_pairs_are_checked() {
        assert!(validate_static_pair("tenant_id", "clinic-42").is_ok());
        assert!(validate_static_pair("", "x").is_err());
        assert!(validate_static_pair("kmsfs:path", "x").is_err());
        assert!(validate_static_pair("k", "a\nb").is_err());
    }

    proptest! {
        #[test]
        fn any_name_round_trips(names in proptest::collection::vec(
            proptest::collection::vec(1u8..=255, 1..12), 1..5)) {
            let names: Vec<Vec<u8>> = names.into_iter()
                .map(|n| n.into_iter().filter(|&b| b != b'/').collect::<Vec<u8>>())
                .filter(|n| !n.is_empty() && n != b"." && n != b"..")
                .collect();
            prop_assume!(!names.is_empty());
            let mut p = CanonicalPath::root();
            for n in &names { p = p.join(n).unwrap(); }
            let again = CanonicalPath::from_encoded(p.as_str()).unwrap();
            prop_assert_eq!(&again, &p);
            let rel = p.to_relative_path();
            let joined = names.join(&b'/');
            prop_assert_eq!(rel.as_os_str().as_bytes(), joined.as_slice());
            prop_assert_eq!(CanonicalPath::from_user(&rel).unwrap(), p);
        }
    }
}
