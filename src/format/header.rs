//! The per-object header: a fixed preamble and two rewritable slots.
//!
//! Every object on the backing store is a regular file with this header: a file, and also a
//! symlink, fifo, socket or device node (its "content" is the symlink target, or nothing), and
//! each directory's record. The preamble never changes after the object is created: magic,
//! version, algorithm suite, block size, slot size, the random file id and the key commitment.
//! What does change lives in two slots of fixed size: the object's attributes (kind, mode,
//! owner) and its envelopes (which keys wrap the DEK, for which paths: rename, link, rewrap,
//! chmod and chown rewrite them). An update writes the slot *not* holding the newest valid
//! generation, with the generation plus one; a torn write damages only that slot, and the
//! reader falls back to the other. Each slot carries an unkeyed checksum (cheap torn-write
//! detection) and an HMAC under a key derived from the *volume* key and the file id (see
//! [`super::kdf`]): nobody without the volume key can forge a slot, change its attributes or
//! raise its generation, and it is checked with no key call. Blocks start right after the two
//! slots, so the header can be rewritten in place without touching the body. docs/FORMAT.md
//! has the bytes.

use sha2::{Digest, Sha256};

use super::block::{valid_block_size, Layout};
use super::codec::{Reader, Writer};
use super::envelope::Envelope;
use super::kdf;
use super::object::OBJECT_KEY_ID;
use super::FormatError;
use crate::secret::DerivedKey;

pub const MAGIC: &[u8; 4] = b"KMFS";
pub const VERSION: u16 = 3;
/// AES-256-GCM blocks, HKDF-SHA256 key derivation, HMAC-SHA256 key commitment and slot MAC.
pub const SUITE_AES256GCM_HKDF_SHA256: u16 = 1;
pub const PREAMBLE_LEN: usize = 64;
/// Bytes at the end of a slot: MAC (32) then checksum (16).
pub const SLOT_TRAILER_LEN: usize = 48;
/// Bytes at the start of a slot: generation (8) and body length (4).
pub const SLOT_PREFIX_LEN: usize = 12;
pub const SLOT_ALIGN: u32 = 512;
/// How many names' worth of envelopes a new file's slots hold: its name and the one a rename
/// holds beside it for a moment (or a second name, a hard link). Anything more grows the
/// header in place (a move of the whole file), so this is a balance: every file pays for
/// the room it keeps, and only a file gaining names or moving far pays for growth.
pub const NAME_ROOM: usize = 2;
/// Extra path bytes allowed per envelope, for renames to longer names: one more directory
/// level of encrypted names (43 to 54 bytes each) moves no file.
pub const PATH_SLACK: usize = 64;
pub const MAX_SLOT_SIZE: u32 = 1 << 20;
pub const MAX_ENVELOPES: usize = 256;
const CHECKSUM_LABEL: &[u8] = b"kmsfs/v1 slot checksum";
/// Bytes of [`Attrs`] at the start of a slot body.
pub const ATTRS_LEN: usize = 19;

/// What an object is. Only files hold data keys from the key service; the other kinds hold a
/// key wrapped under the volume (see [`super::object`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDevice = 6,
    BlockDevice = 7,
}

impl ObjectKind {
    /// The kind numbered `b` in the header (and in a kind tag).
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => ObjectKind::File,
            2 => ObjectKind::Dir,
            3 => ObjectKind::Symlink,
            4 => ObjectKind::Fifo,
            5 => ObjectKind::Socket,
            6 => ObjectKind::CharDevice,
            7 => ObjectKind::BlockDevice,
            _ => return None,
        })
    }

    /// Whether the object's data key comes from the key service (a file) or is wrapped under
    /// the volume (everything else).
    pub fn uses_key_service(self) -> bool {
        self == ObjectKind::File
    }
}

/// An object's authenticated attributes: what the mount reports, and so what the kernel
/// enforces. Times are not here (they stay the backing store's, unauthenticated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub kind: ObjectKind,
    /// Permission bits with set-user-id, set-group-id and sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number of a device node, else 0.
    pub rdev: u64,
}

impl Attrs {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.kind as u8)
            .u16(self.mode as u16)
            .u32(self.uid)
            .u32(self.gid)
            .u64(self.rdev);
    }

    fn decode(r: &mut Reader) -> Result<Self, String> {
        let kind = r.u8().map_err(|_| "truncated attributes")?;
        let kind = ObjectKind::from_byte(kind).ok_or(format!("unknown object kind {kind}"))?;
        let mode = r.u16().map_err(|_| "truncated attributes")? as u32;
        let uid = r.u32().map_err(|_| "truncated attributes")?;
        let gid = r.u32().map_err(|_| "truncated attributes")?;
        let rdev = r.u64().map_err(|_| "truncated attributes")?;
        let attrs = Attrs {
            kind,
            mode,
            uid,
            gid,
            rdev,
        };
        attrs.validate()?;
        Ok(attrs)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.mode & !0o7777 != 0 {
            return Err(format!("mode {:o} has bits beyond 07777", self.mode));
        }
        let device = matches!(self.kind, ObjectKind::CharDevice | ObjectKind::BlockDevice);
        if !device && self.rdev != 0 {
            return Err("a device number on an object that is not a device".into());
        }
        Ok(())
    }
}

/// The fixed first 64 bytes of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub suite: u16,
    pub block_size: u32,
    pub slot_size: u32,
    pub file_id: [u8; 16],
    pub commitment: [u8; 32],
}

impl Preamble {
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut w = Writer::new();
        w.bytes(MAGIC)
            .u16(VERSION)
            .u16(self.suite)
            .u32(self.block_size)
            .u32(self.slot_size)
            .bytes(&self.file_id)
            .bytes(&self.commitment);
        w.into_bytes().try_into().expect("preamble is 64 bytes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let bad = |s: &str| FormatError::InvalidHeader(s.into());
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array().map_err(|_| bad("file shorter than a header"))?;
        if &magic != MAGIC {
            return Err(bad("bad magic (not a kmsfs file)"));
        }
        let version = r.u16().map_err(|_| bad("truncated"))?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "header",
                version,
            });
        }
        let suite = r.u16().map_err(|_| bad("truncated"))?;
        if suite != SUITE_AES256GCM_HKDF_SHA256 {
            return Err(bad(&format!("unknown algorithm suite {suite}")));
        }
        let block_size = r.u32().map_err(|_| bad("truncated"))?;
        if !valid_block_size(block_size) {
            return Err(bad(&format!("invalid block size {block_size}")));
        }
        let slot_size = r.u32().map_err(|_| bad("truncated"))?;
        if !valid_slot_size(slot_size) {
            return Err(bad(&format!("invalid slot size {slot_size}")));
        }
        let file_id = r.array().map_err(|_| bad("truncated"))?;
        let commitment = r.array().map_err(|_| bad("truncated"))?;
        Ok(Preamble {
            suite,
            block_size,
            slot_size,
            file_id,
            commitment,
        })
    }

    /// Where the blocks are: after the preamble and both slots, `block_size` each.
    pub fn layout(&self) -> Layout {
        Layout {
            data_offset: self.data_offset(),
            block_size: self.block_size,
        }
    }

    /// Where the first block starts: after the preamble and both slots.
    pub fn data_offset(&self) -> u64 {
        PREAMBLE_LEN as u64 + 2 * self.slot_size as u64
    }

    /// Byte offset of slot 0 or 1.
    pub fn slot_offset(&self, slot: usize) -> u64 {
        PREAMBLE_LEN as u64 + slot as u64 * self.slot_size as u64
    }
}

pub fn valid_slot_size(n: u32) -> bool {
    (SLOT_ALIGN..=MAX_SLOT_SIZE).contains(&n) && n.is_multiple_of(SLOT_ALIGN)
}

/// The slot size a new file gets for its first name's `envelopes`: room for `NAME_ROOM`
/// names like it, each `PATH_SLACK` bytes longer, rounded up to `SLOT_ALIGN`.
pub fn slot_size_for(envelopes: &[Envelope]) -> u32 {
    let per_name = body_len(envelopes) - 2 + PATH_SLACK * envelopes.len();
    let need = SLOT_PREFIX_LEN + ATTRS_LEN + 2 + NAME_ROOM * per_name + SLOT_TRAILER_LEN;
    let size = (need as u32).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
    size.min(MAX_SLOT_SIZE)
}

/// The smallest slot size that holds a body of `body_len` bytes (past `MAX_SLOT_SIZE` when
/// none does).
fn slot_size_holding(body_len: usize) -> u32 {
    let need = (SLOT_PREFIX_LEN + body_len + SLOT_TRAILER_LEN) as u64;
    u32::try_from(need.div_ceil(SLOT_ALIGN as u64) * SLOT_ALIGN as u64).unwrap_or(u32::MAX)
}

fn encode_envelopes(envelopes: &[Envelope]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(envelopes.len() as u16);
    for e in envelopes {
        e.encode(&mut w);
    }
    w.into_bytes()
}

fn body_len(envelopes: &[Envelope]) -> usize {
    encode_envelopes(envelopes).len()
}

fn encode_body(content: &SlotContent) -> Vec<u8> {
    let mut w = Writer::new();
    content.attrs.encode(&mut w);
    let mut body = w.into_bytes();
    body.extend_from_slice(&encode_envelopes(&content.envelopes));
    body
}

/// Whether an envelope's key fits the object's kind: a file's data key comes only from the key
/// service, every other object's only from the volume.
pub fn key_fits_kind(key_id: &str, kind: ObjectKind) -> bool {
    (key_id == OBJECT_KEY_ID) != kind.uses_key_service()
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotContent {
    pub generation: u64,
    pub attrs: Attrs,
    pub envelopes: Vec<Envelope>,
}

/// One slot as read from disk, before its MAC is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Never written (all zero bytes).
    Empty,
    /// Torn, corrupted or malformed; the reason is for logs and fsck.
    Damaged(String),
    /// Well-formed with a correct checksum; authentic only once `verify_mac` says so.
    Sealed(SlotContent),
}

/// The unkeyed checksum of a slot: SHA-256 over a label, the preamble and the slot's first
/// `slot_size - 16` bytes, truncated to 16 bytes. Anyone can compute it (tests that play the
/// attacker do); it only detects torn writes, the MAC is what authenticates.
pub fn slot_checksum(preamble: &[u8; PREAMBLE_LEN], slot_head: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(CHECKSUM_LABEL);
    h.update(preamble);
    h.update(slot_head);
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// Encodes `content` into a slot of `preamble.slot_size` bytes, MACed under `mac_key`.
pub fn seal_slot(
    preamble: &Preamble,
    content: &SlotContent,
    mac_key: &DerivedKey,
) -> Result<Vec<u8>, FormatError> {
    if content.generation == 0 {
        return Err(FormatError::TooLarge(
            "generation 0 is reserved for empty slots".into(),
        ));
    }
    if content.envelopes.is_empty() || content.envelopes.len() > MAX_ENVELOPES {
        return Err(FormatError::TooLarge(format!(
            "{} envelopes (1 to {MAX_ENVELOPES} allowed)",
            content.envelopes.len()
        )));
    }
    content
        .attrs
        .validate()
        .map_err(|e| FormatError::InvalidHeader(e.to_string()))?;
    if let Some(e) = content
        .envelopes
        .iter()
        .find(|e| !key_fits_kind(&e.key.key_id, content.attrs.kind))
    {
        return Err(FormatError::InvalidHeader(format!(
            "a {:?} cannot hold an envelope under {}",
            content.attrs.kind, e.key.key_id
        )));
    }
    let body = encode_body(content);
    let slot_size = preamble.slot_size as usize;
    if SLOT_PREFIX_LEN + body.len() + SLOT_TRAILER_LEN > slot_size {
        return Err(FormatError::NoRoom {
            need: slot_size_holding(body.len()),
            why: format!(
                "envelopes need {} bytes, the slot holds {}",
                body.len(),
                slot_size - SLOT_PREFIX_LEN - SLOT_TRAILER_LEN
            ),
        });
    }
    let pre = preamble.encode();
    let mut slot = Vec::with_capacity(slot_size);
    slot.extend_from_slice(&content.generation.to_be_bytes());
    slot.extend_from_slice(&(body.len() as u32).to_be_bytes());
    slot.extend_from_slice(&body);
    slot.resize(slot_size - SLOT_TRAILER_LEN, 0);
    let mac = kdf::hmac(mac_key, &[&pre, &slot]);
    slot.extend_from_slice(&mac);
    let sum = slot_checksum(&pre, &slot);
    slot.extend_from_slice(&sum);
    Ok(slot)
}

/// Reads one slot's structure and checksum (no key needed).
pub fn read_slot(preamble: &Preamble, slot: &[u8]) -> SlotState {
    let damaged = |s: &str| SlotState::Damaged(s.into());
    if slot.len() != preamble.slot_size as usize {
        return damaged("short slot");
    }
    if slot.iter().all(|&b| b == 0) {
        return SlotState::Empty;
    }
    let pre = preamble.encode();
    let (head, sum) = slot.split_at(slot.len() - 16);
    if slot_checksum(&pre, head) != sum {
        return damaged("checksum mismatch (torn write or corruption)");
    }
    let mut r = Reader::new(&slot[..slot.len() - SLOT_TRAILER_LEN]);
    let generation = r.u64().expect("slot is longer than its prefix");
    if generation == 0 {
        return damaged("generation 0 in a non-empty slot");
    }
    let body_len = r.u32().expect("slot is longer than its prefix") as usize;
    let body = match r.take(body_len) {
        Ok(b) => b,
        Err(_) => return damaged("body length past the slot"),
    };
    if r.take(r.remaining()).expect("rest").iter().any(|&b| b != 0) {
        return damaged("non-zero padding");
    }
    let bad = |s: &str| FormatError::InvalidHeader(s.to_string());
    let mut br = Reader::new(body);
    let parsed = (|| {
        let attrs = Attrs::decode(&mut br).map_err(|e| bad(&e))?;
        let count = br.u16().map_err(|_| bad("truncated envelope count"))? as usize;
        if count == 0 || count > MAX_ENVELOPES {
            return Err(bad("envelope count out of range"));
        }
        let mut envelopes = Vec::with_capacity(count);
        for _ in 0..count {
            let e = Envelope::decode(&mut br, &bad)?;
            if envelopes
                .iter()
                .any(|o: &Envelope| o.path == e.path && o.key.key_id == e.key.key_id)
            {
                return Err(bad("duplicate envelope"));
            }
            if !key_fits_kind(&e.key.key_id, attrs.kind) {
                return Err(bad("an envelope's key does not fit the object's kind"));
            }
            envelopes.push(e);
        }
        if br.remaining() != 0 {
            return Err(bad("trailing bytes after envelopes"));
        }
        Ok((attrs, envelopes))
    })();
    match parsed {
        Ok((attrs, envelopes)) => SlotState::Sealed(SlotContent {
            generation,
            attrs,
            envelopes,
        }),
        Err(e) => SlotState::Damaged(e.to_string()),
    }
}

/// Checks a slot's MAC under the file's header MAC key (from the volume key and file id).
pub fn verify_slot_mac(preamble: &Preamble, slot: &[u8], mac_key: &DerivedKey) -> bool {
    if slot.len() != preamble.slot_size as usize {
        return false;
    }
    let signed_len = slot.len() - SLOT_TRAILER_LEN;
    let tag: [u8; 32] = slot[signed_len..signed_len + 32]
        .try_into()
        .expect("32 bytes");
    kdf::hmac_verify(mac_key, &[&preamble.encode(), &slot[..signed_len]], &tag)
}

/// A parsed header region: the preamble, both slots raw and as read.
#[derive(Debug, Clone)]
pub struct Header {
    pub preamble: Preamble,
    pub raw_slots: [Vec<u8>; 2],
    pub slots: [SlotState; 2],
}

impl Header {
    /// Parses the header region (at least `data_offset` bytes; extra bytes are ignored).
    /// A bad preamble is fatal; bad slots are recorded and left to the caller.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        let preamble = Preamble::decode(bytes)?;
        let end = preamble.data_offset() as usize;
        if bytes.len() < end {
            return Err(FormatError::InvalidHeader(
                "file shorter than its header".into(),
            ));
        }
        let s = preamble.slot_size as usize;
        let raw_slots = [
            bytes[PREAMBLE_LEN..PREAMBLE_LEN + s].to_vec(),
            bytes[PREAMBLE_LEN + s..end].to_vec(),
        ];
        let slots = [
            read_slot(&preamble, &raw_slots[0]),
            read_slot(&preamble, &raw_slots[1]),
        ];
        Ok(Header {
            preamble,
            raw_slots,
            slots,
        })
    }

    /// Sealed slots, newest generation first: the order a reader tries them in.
    pub fn candidates(&self) -> Vec<(usize, &SlotContent)> {
        let mut out: Vec<(usize, &SlotContent)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                SlotState::Sealed(c) => Some((i, c)),
                _ => None,
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.1.generation));
        out
    }

    pub fn verify_mac(&self, slot: usize, mac_key: &DerivedKey) -> bool {
        verify_slot_mac(&self.preamble, &self.raw_slots[slot], mac_key)
    }

    /// The sealed slots whose MAC verifies under `mac_key`, newest generation first.
    pub fn authentic(&self, mac_key: &DerivedKey) -> Vec<(usize, &SlotContent)> {
        self.candidates()
            .into_iter()
            .filter(|(slot, _)| self.verify_mac(*slot, mac_key))
            .collect()
    }
}

/// Encodes a whole new header region: the preamble, `content` in slot 0, slot 1 empty.
pub fn encode_new_header(
    preamble: &Preamble,
    content: &SlotContent,
    mac_key: &DerivedKey,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(preamble.data_offset() as usize);
    out.extend_from_slice(&preamble.encode());
    out.extend_from_slice(&seal_slot(preamble, content, mac_key)?);
    out.resize(preamble.data_offset() as usize, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::context::CanonicalPath;
    use crate::format::envelope::WrappedKey;
    use std::path::Path;

    fn envelope(path: &str) -> Envelope {
        Envelope {
            path: CanonicalPath::from_user(Path::new(path)).unwrap(),
            key: WrappedKey {
                key_id: "local:abc".into(),
                blob: vec![1; 77],
            },
        }
    }

    fn attrs() -> Attrs {
        Attrs {
            kind: ObjectKind::File,
            mode: 0o640,
            uid: 1000,
            gid: 100,
            rdev: 0,
        }
    }

    fn preamble(envs: &[Envelope]) -> Preamble {
        Preamble {
            suite: SUITE_AES256GCM_HKDF_SHA256,
            block_size: 4096,
            slot_size: slot_size_for(envs),
            file_id: [4; 16],
            commitment: [5; 32],
        }
    }

    /// The slot sizes docs/FORMAT.md ("Storage overhead") gives a new file, by stored path
    /// length: a local key (38-byte id, 97-byte wrapped key), an AWS KMS key (~75, ~184) and
    /// an object under the volume key (12, 81).
    #[test]
    fn new_slot_sizes_are_the_documented_ones() {
        let size = |id_len: usize, wrapped: usize, path_len: usize| {
            slot_size_for(&[Envelope {
                path: CanonicalPath::from_user(Path::new(&"x".repeat(path_len - 1))).unwrap(),
                key: WrappedKey {
                    key_id: "k".repeat(id_len),
                    blob: vec![1; wrapped],
                },
            }])
        };
        assert_eq!(size(38, 97, 266), 1024);
        assert_eq!(size(38, 97, 267), 1536);
        assert_eq!(size(38, 97, 522), 1536);
        assert_eq!(size(75, 184, 142), 1024);
        assert_eq!(size(75, 184, 143), 1536);
        assert_eq!(size(75, 184, 398), 1536);
        assert_eq!(size(12, 81, 52), 512);
        assert_eq!(size(12, 81, 53), 1024);
        assert_eq!(size(12, 81, 308), 1024);
    }

    #[test]
    fn header_round_trip() {
        let envs = vec![envelope("a/b")];
        let pre = preamble(&envs);
        assert_eq!(pre.slot_size, 512);
        let key = DerivedKey::new([1; 32]);
        let content = SlotContent {
            generation: 1,
            attrs: attrs(),
            envelopes: envs,
        };
        let bytes = encode_new_header(&pre, &content, &key).unwrap();
        assert_eq!(bytes.len(), 64 + 1024);
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.preamble, pre);
        assert_eq!(h.slots[0], SlotState::Sealed(content));
        assert_eq!(h.slots[1], SlotState::Empty);
        assert!(h.verify_mac(0, &key));
        assert!(!h.verify_mac(0, &DerivedKey::new([2; 32])));
        assert_eq!(h.candidates().len(), 1);
    }

    #[test]
    fn torn_slot_is_damaged_not_fatal() {
        let envs = vec![envelope("a")];
        let pre = preamble(&envs);
        let key = DerivedKey::new([1; 32]);
        let mut bytes = encode_new_header(
            &pre,
            &SlotContent {
                generation: 1,
                attrs: attrs(),
                envelopes: envs,
            },
            &key,
        )
        .unwrap();
        bytes[64 + 20] ^= 1;
        let h = Header::parse(&bytes).unwrap();
        assert!(matches!(h.slots[0], SlotState::Damaged(_)));
        assert!(h.candidates().is_empty());
    }

    #[test]
    fn candidates_newest_first() {
        let envs = vec![envelope("a")];
        let pre = preamble(&envs);
        let key = DerivedKey::new([1; 32]);
        let mut bytes = encode_new_header(
            &pre,
            &SlotContent {
                generation: 4,
                attrs: attrs(),
                envelopes: envs.clone(),
            },
            &key,
        )
        .unwrap();
        let newer = seal_slot(
            &pre,
            &SlotContent {
                generation: 5,
                attrs: attrs(),
                envelopes: envs,
            },
            &key,
        )
        .unwrap();
        bytes[64 + pre.slot_size as usize..].copy_from_slice(&newer);
        let h = Header::parse(&bytes).unwrap();
        let order: Vec<usize> = h.candidates().iter().map(|c| c.0).collect();
        assert_eq!(order, vec![1, 0]);
    }

    #[test]
    fn attributes_are_sealed_and_checked() {
        let envs = vec![envelope("a")];
        let pre = preamble(&envs);
        let key = DerivedKey::new([1; 32]);
        let mut a = attrs();
        a.mode = 0o4755;
        let content = SlotContent {
            generation: 1,
            attrs: a,
            envelopes: envs.clone(),
        };
        let bytes = encode_new_header(&pre, &content, &key).unwrap();
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.slots[0], SlotState::Sealed(content));
        // Bits beyond 07777, and a device number on a file, are refused on write...
        for bad in [Attrs { mode: 0o10000, ..a }, Attrs { rdev: 5, ..a }] {
            let c = SlotContent {
                generation: 1,
                attrs: bad,
                envelopes: envs.clone(),
            };
            assert!(seal_slot(&pre, &c, &key).is_err());
        }
        // ...and a file cannot hold a volume-wrapped key, nor a symlink a key-service one.
        let mut volume_wrapped = envs.clone();
        volume_wrapped[0].key.key_id = OBJECT_KEY_ID.into();
        let c = SlotContent {
            generation: 1,
            attrs: a,
            envelopes: volume_wrapped.clone(),
        };
        assert!(seal_slot(&pre, &c, &key).is_err());
        let link = Attrs {
            kind: ObjectKind::Symlink,
            ..a
        };
        let c = SlotContent {
            generation: 1,
            attrs: link,
            envelopes: envs.clone(),
        };
        assert!(seal_slot(&pre, &c, &key).is_err());
        let c = SlotContent {
            generation: 1,
            attrs: link,
            envelopes: volume_wrapped,
        };
        assert!(seal_slot(&pre, &c, &key).is_ok());
        // On read, such a slot is damaged: patch the kind byte of a sealed file slot.
        let mut bytes = bytes;
        bytes[64 + 12] = ObjectKind::Symlink as u8;
        let sum = slot_checksum(
            bytes[..64].try_into().unwrap(),
            &bytes[64..64 + pre.slot_size as usize - 16],
        );
        let end = 64 + pre.slot_size as usize;
        bytes[end - 16..end].copy_from_slice(&sum);
        let h = Header::parse(&bytes).unwrap();
        assert!(
            matches!(h.slots[0], SlotState::Damaged(_)),
            "{:?}",
            h.slots[0]
        );
    }

    #[test]
    fn preamble_rejects_garbage() {
        assert!(Preamble::decode(b"KMFS").is_err());
        let mut p = preamble(&[envelope("a")]).encode();
        p[0] = b'X';
        assert!(Preamble::decode(&p).is_err());
        let mut p = preamble(&[envelope("a")]).encode();
        p[5] = 9; // version
        assert!(matches!(
            Preamble::decode(&p),
            Err(FormatError::UnsupportedVersion { .. })
        ));
        let mut p = preamble(&[envelope("a")]).encode();
        p[10] = 0x77; // block size
        assert!(Preamble::decode(&p).is_err());
    }

    #[test]
    fn slot_too_small_is_refused() {
        let envs: Vec<Envelope> = (0..20).map(|i| envelope(&format!("f{i}"))).collect();
        let pre = preamble(&envs[..1]);
        let key = DerivedKey::new([1; 32]);
        assert!(matches!(
            seal_slot(
                &pre,
                &SlotContent {
                    generation: 1,
                    attrs: attrs(),
                    envelopes: envs
                },
                &key
            ),
            Err(FormatError::NoRoom { need, .. }) if need > pre.slot_size
        ));
    }
}
