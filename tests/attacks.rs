//! The threat model's attacks (docs/SECURITY.md) at the format and core layers: every attack
//! on the backing store that can be made without a mount, each as a test named after the
//! attack. The read must fail (and say why); nothing wrong is ever returned.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;

use common::mount::kmsfs;
use common::{path, pattern, TestVolume};
use kmsfs::core::volume::OpenOptions;
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::error::Error;
use kmsfs::format::FormatError;
use kmsfs::keys::spec::KeySpec;
use kmsfs::keys::KeyErrorKind;

const BS: u32 = 512;

fn three_block_file(v: &TestVolume, name: &str, seed: u8) -> Vec<u8> {
    let data = pattern(2 * BS as usize + 100, seed);
    v.write(name, &data);
    data
}

fn assert_block_failure(result: Result<Vec<u8>, Error>, block: u64) {
    match result {
        Err(Error::Format {
            source: FormatError::DecryptionFailed(b),
            ..
        }) => assert_eq!(b, block),
        other => panic!("expected authentication failure at block {block}, got {other:?}"),
    }
}

#[test]
fn read_learns_nothing_but_size() {
    let v = TestVolume::new(BS);
    let secret = b"the patient's diagnosis is confidential ".repeat(40);
    v.write("record", &secret);
    let raw = v.bytes("record");
    assert!(
        raw.windows(16).all(|w| !secret.windows(16).any(|s| s == w)),
        "plaintext leaked"
    );
    let (offset, _) = v.geometry("record");
    assert_eq!(raw.len(), offset + secret.len() + 4 * 28);
}

#[test]
fn block_reordered() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "f", 1);
    let (off, sb) = v.geometry("f");
    let mut raw = v.bytes("f");
    let (b0, b1) = (
        raw[off..off + sb].to_vec(),
        raw[off + sb..off + 2 * sb].to_vec(),
    );
    raw[off..off + sb].copy_from_slice(&b1);
    raw[off + sb..off + 2 * sb].copy_from_slice(&b0);
    v.put_bytes("f", &raw);
    assert_block_failure(v.read("f"), 0);
}

#[test]
fn block_duplicated() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "f", 1);
    let (off, sb) = v.geometry("f");
    let mut raw = v.bytes("f");
    let b0 = raw[off..off + sb].to_vec();
    raw[off + sb..off + 2 * sb].copy_from_slice(&b0);
    v.put_bytes("f", &raw);
    assert_block_failure(v.read("f"), 1);
}

#[test]
fn block_dropped() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "f", 1);
    let (off, sb) = v.geometry("f");
    let mut raw = v.bytes("f");
    raw.drain(off + sb..off + 2 * sb);
    v.put_bytes("f", &raw);
    assert_block_failure(v.read("f"), 1);
}

#[test]
fn block_moved_between_files() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "a", 1);
    three_block_file(&v, "b", 2);
    let (off, sb) = v.geometry("a");
    let a = v.bytes("a");
    let mut b = v.bytes("b");
    b[off + sb..off + 2 * sb].copy_from_slice(&a[off + sb..off + 2 * sb]);
    v.put_bytes("b", &b);
    assert_block_failure(v.read("b"), 1);
}

#[test]
fn truncated_at_block_boundary() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "f", 1);
    let (off, sb) = v.geometry("f");
    let orig = v.bytes("f");
    for keep in [2, 1] {
        // Cut after `keep` whole blocks: a valid length, but the new last block was not
        // sealed as the last one.
        v.put_bytes("f", &orig[..off + keep * sb]);
        assert_block_failure(v.read("f"), keep as u64 - 1);
    }
}

#[test]
fn truncated_to_header_only() {
    let v = TestVolume::new(BS);
    v.write("empty", b"");
    let (off, _) = v.geometry("empty");
    let raw = v.bytes("empty");
    v.put_bytes("empty", &raw[..off]);
    assert!(matches!(
        v.read("empty"),
        Err(Error::Format {
            source: FormatError::InvalidLength(_),
            ..
        })
    ));
}

#[test]
fn header_spliced_onto_other_body() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "a", 1);
    three_block_file(&v, "b", 2);
    let (off, _) = v.geometry("a");
    let mut a = v.bytes("a");
    let b = v.bytes("b");
    // a's header (valid for path /a) on b's body.
    a.truncate(off);
    a.extend_from_slice(&b[off..]);
    v.put_bytes("a", &a);
    assert_block_failure(v.read("a"), 0);
}

#[test]
fn moved_file_is_a_context_mismatch() {
    let v = TestVolume::new(BS);
    v.write("a", b"data");
    fs::rename(v.backing_file("a"), v.backing_file("b")).unwrap();
    // Moved within its directory to b's stored name: the header binds a's stored path.
    let bound = format!("bound to {}", v.stored("a"));
    match v.read("b") {
        Err(e @ Error::Moved { .. }) => assert!(e.to_string().contains(&bound), "{e}"),
        other => panic!("expected context mismatch, got {other:?}"),
    }
}

#[test]
fn moved_directory_is_a_context_mismatch() {
    let v = TestVolume::new(BS);
    v.mkdir("dir");
    v.write("dir/f", b"data");
    let f_name = v.backing_file("dir/f").file_name().unwrap().to_owned();
    fs::rename(v.backing_file("dir"), v.backing_file("other")).unwrap();
    // The file at its place under the moved directory, by stored path: its header binds the
    // old one.
    let vol = v.reopen().unwrap();
    let moved = v.stored("other").join(f_name.as_encoded_bytes()).unwrap();
    assert!(matches!(
        EncryptedFile::open(&vol, &moved, false),
        Err(Error::Moved { .. })
    ));
    if common::plaintext_names() {
        assert!(matches!(v.read("other/f"), Err(Error::Moved { .. })));
    } else {
        // With encrypted names a lookup of other/f stops one step earlier: the names under
        // `other` are encrypted under its record's id, and that record binds `dir`.
        assert!(matches!(
            vol.stored_path(&path("other/f")),
            Err(Error::Moved { .. })
        ));
    }
}

#[test]
fn swapped_files_fail() {
    let v = TestVolume::new(BS);
    v.write("a", b"alpha");
    v.write("b", b"bravo");
    let (a, b) = (v.bytes("a"), v.bytes("b"));
    v.put_bytes("a", &b);
    v.put_bytes("b", &a);
    assert!(matches!(v.read("a"), Err(Error::Moved { .. })));
    assert!(matches!(v.read("b"), Err(Error::Moved { .. })));
}

/// An attacker who rewrites the envelope's bound path (and fixes the unkeyed checksum) still
/// fails: the key service refuses to unwrap under the new path's context.
#[test]
fn envelope_path_rewritten_is_refused_by_the_key_service() {
    let v = TestVolume::new(BS);
    v.write("aaaa", b"data");
    let mut raw = v.bytes("aaaa");
    // The envelope binds the stored path (as long as bbbb's: the same name length).
    let (from, to) = (v.stored("aaaa"), v.stored("bbbb"));
    let (from, to) = (from.as_str().as_bytes(), to.as_str().as_bytes());
    assert_eq!(from.len(), to.len());
    let at = raw.windows(from.len()).position(|w| w == from).unwrap();
    raw[at..at + from.len()].copy_from_slice(to);
    fix_slot_checksum(&mut raw, 0);
    fs::write(v.backing_file("bbbb"), &raw).unwrap();
    assert_header_auth_failure(v.read("bbbb"));
    // Someone who can open the volume can re-MAC the slot; the key service still refuses.
    remac(&v, &mut raw, 0);
    fs::write(v.backing_file("bbbb"), &raw).unwrap();
    match v.read("bbbb") {
        Err(Error::Key { source, .. }) => assert_eq!(source.kind, KeyErrorKind::ContextMismatch),
        other => panic!("expected a key-service context mismatch, got {other:?}"),
    }
}

#[test]
fn file_copied_from_another_volume_fails() {
    let keys = tempfile::tempdir().unwrap();
    let shared_key = keys.path().join("shared.key");
    let v1 = TestVolume::with_key(BS, Some(&shared_key));
    let v2 = TestVolume::with_key(BS, Some(&shared_key));
    v1.write("f", b"from volume one");
    fs::copy(v1.backing_file("f"), v2.backing_file("f")).unwrap();
    // The other volume's header key does not verify here.
    assert_header_auth_failure(v2.read("f"));
    // Re-MACed by someone who can open v2.
    let mut raw = v2.bytes("f");
    remac(&v2, &mut raw, 0);
    v2.put_bytes("f", &raw);
    match v2.read("f") {
        // Same key, same path, only the volume id in the context differs, and the key service
        // refuses it.
        Err(Error::Key { source, .. }) if common::plaintext_names() => {
            assert_eq!(source.kind, KeyErrorKind::ContextMismatch)
        }
        // With encrypted names f is stored under another name in each volume, so the header
        // (binding v1's stored path) is refused as moved before the key service is asked.
        Err(Error::Moved { bound, .. }) if !common::plaintext_names() => {
            assert_eq!(bound, v1.stored("f").as_str())
        }
        other => panic!("expected context mismatch, got {other:?}"),
    }
    if !common::plaintext_names() {
        // Put under v1's stored name in v2 (no name v2 lists, but opened by that stored path):
        // the path matches, only the volume id differs, and the key service refuses it.
        let at = v1.stored("f");
        fs::write(v2.backing.join(at.to_relative_path()), &raw).unwrap();
        match EncryptedFile::open(&v2.reopen().unwrap(), &at, false).and_then(|f| f.read_all()) {
            Err(Error::Key { source, .. }) => {
                assert_eq!(source.kind, KeyErrorKind::ContextMismatch)
            }
            other => panic!("expected context mismatch, got {other:?}"),
        }
    }
}

#[test]
fn file_under_an_untrusted_key_is_refused() {
    let v = TestVolume::new(BS);
    let rogue = TestVolume::new(BS);
    rogue.write("f", b"attacker data");
    fs::copy(rogue.backing_file("f"), v.backing_file("f")).unwrap();
    assert_header_auth_failure(v.read("f"));
    let mut raw = v.bytes("f");
    remac(&v, &mut raw, 0);
    v.put_bytes("f", &raw);
    match v.read("f") {
        Err(Error::Key { source, .. }) if common::plaintext_names() => {
            assert_eq!(source.kind, KeyErrorKind::UntrustedKey)
        }
        // With encrypted names f is stored under another name in each volume: the header
        // (binding the rogue's stored path) is refused as moved before the key is looked at.
        Err(Error::Moved { bound, .. }) if !common::plaintext_names() => {
            assert_eq!(bound, rogue.stored("f").as_str())
        }
        other => panic!("expected untrusted key, got {other:?}"),
    }
    if !common::plaintext_names() {
        // Under the rogue's stored name (opened by that stored path, as no name of v's lists
        // it): the path matches, and the key is not one v trusts.
        let at = rogue.stored("f");
        fs::write(v.backing.join(at.to_relative_path()), &raw).unwrap();
        match EncryptedFile::open(&v.reopen().unwrap(), &at, false).and_then(|f| f.read_all()) {
            Err(Error::Key { source, .. }) => assert_eq!(source.kind, KeyErrorKind::UntrustedKey),
            other => panic!("expected untrusted key, got {other:?}"),
        }
    }
}

#[test]
fn commitment_edited_is_detected() {
    let v = TestVolume::new(BS);
    v.write("f", b"data");
    let mut raw = v.bytes("f");
    raw[40] ^= 0x80; // inside the commitment (bytes 32..64)
    fix_slot_checksum(&mut raw, 0);
    v.put_bytes("f", &raw);
    assert_header_auth_failure(v.read("f"));
    remac(&v, &mut raw, 0);
    v.put_bytes("f", &raw);
    assert!(matches!(
        v.read("f"),
        Err(Error::Format {
            source: FormatError::CommitmentMismatch,
            ..
        })
    ));
}

#[test]
fn slot_generation_forged_is_detected() {
    let v = TestVolume::new(BS);
    v.write("f", b"data");
    let mut raw = v.bytes("f");
    raw[64 + 7] = 9; // generation 1 -> 9
    fix_slot_checksum(&mut raw, 0);
    v.put_bytes("f", &raw);
    assert!(matches!(
        v.read("f"),
        Err(Error::Format {
            source: FormatError::HeaderAuthFailed(_),
            ..
        })
    ));
}

#[test]
fn torn_newer_slot_falls_back_to_the_older_one() {
    let v = TestVolume::new(BS);
    v.write("f", b"data");
    {
        let vol = v.reopen().unwrap();
        let mut f = EncryptedFile::open(&vol, &v.stored("f"), true).unwrap();
        let envs = f.envelopes().to_vec();
        f.replace_envelopes(envs).unwrap();
        assert_eq!(f.generation(), 2);
    }
    let mut raw = v.bytes("f");
    let slot_size = u32::from_be_bytes(raw[12..16].try_into().unwrap()) as usize;
    raw[64 + slot_size + 30] ^= 1; // tear slot 1 (generation 2)
    v.put_bytes("f", &raw);
    let vol = v.reopen().unwrap();
    let f = EncryptedFile::open(&vol, &v.stored("f"), false).unwrap();
    assert_eq!(f.generation(), 1);
    assert_eq!(f.read_all().unwrap(), b"data");
}

#[test]
fn config_edited_is_detected_at_open() {
    let v = TestVolume::new(BS);
    let cfg = v.backing.join(".kmsfs/config");
    let mut raw = fs::read(&cfg).unwrap();
    raw[30] = 0x04; // block size 512 (0x0200) -> 1024: structurally valid, but not what was MACed
    fs::write(&cfg, &raw).unwrap();
    let err = v.reopen().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Format {
                source: FormatError::ConfigAuthFailed,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn config_pointed_at_another_key_is_caught_by_the_pin() {
    // The attacker replaces the whole config with one made under their own key: the MAC is
    // valid, so only pinning the expected key catches it.
    let v = TestVolume::new(BS);
    let rogue = TestVolume::new(BS);
    fs::copy(
        rogue.backing.join(".kmsfs/config"),
        v.backing.join(".kmsfs/config"),
    )
    .unwrap();
    let pinned = OpenOptions {
        pin: vec![KeySpec::Local(v.key_path.clone())],
        ..Default::default()
    };
    let err = Volume::open(&v.backing, &pinned).unwrap_err();
    assert!(matches!(err, Error::KeyPin(_)), "{err}");
    assert!(
        err.to_string().contains("is not protected by the key"),
        "{err}"
    );
}

#[test]
fn every_failure_names_the_path_and_reason() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "dir_file", 1);
    let (off, sb) = v.geometry("dir_file");
    let mut raw = v.bytes("dir_file");
    raw[off + sb + 20] ^= 1;
    v.put_bytes("dir_file", &raw);
    let msg = v.read("dir_file").unwrap_err().to_string();
    // A core error names the stored path (the commands show the user's).
    assert_eq!(
        msg,
        format!("{}: authentication failed at block 1", v.stored("dir_file"))
    );
}

/// Recomputes slot `slot`'s unkeyed checksum, as an attacker who knows the format can.
fn fix_slot_checksum(raw: &mut [u8], slot: usize) {
    use kmsfs::format::header::slot_checksum;
    let slot_size = u32::from_be_bytes(raw[12..16].try_into().unwrap()) as usize;
    let start = 64 + slot * slot_size;
    let sum = slot_checksum(
        raw[..64].try_into().unwrap(),
        &raw[start..start + slot_size - 16],
    );
    raw[start + slot_size - 16..start + slot_size].copy_from_slice(&sum);
}

fn assert_header_auth_failure(result: Result<Vec<u8>, Error>) {
    assert!(
        matches!(
            result,
            Err(Error::Format {
                source: FormatError::HeaderAuthFailed(_),
                ..
            })
        ),
        "expected header authentication failure, got {result:?}"
    );
}

/// Re-MACs slot `slot` under the volume's header key, as anyone who can open the volume can
/// (so only the key service and the commitment stand in the way).
fn remac(v: &TestVolume, raw: &mut [u8], slot: usize) {
    use kmsfs::format::header::{seal_slot, Header, SlotState};
    fix_slot_checksum(raw, slot);
    let header = Header::parse(raw).unwrap();
    let SlotState::Sealed(content) = &header.slots[slot] else {
        panic!("slot {slot} is not sealed")
    };
    let pre = &header.preamble;
    let sealed = seal_slot(pre, content, &v.volume.header_mac_key(&pre.file_id)).unwrap();
    let start = pre.slot_offset(slot) as usize;
    raw[start..start + sealed.len()].copy_from_slice(&sealed);
}

#[test]
fn a_symlink_on_the_store_is_never_read_through() {
    let v = TestVolume::new(4096);
    v.write("a.txt", b"alpha");
    v.write("b.txt", b"bravo");
    // Positive control: a.txt reads as written.
    assert_eq!(v.read("a.txt").unwrap(), b"alpha");
    // a.txt replaced by a symlink to b.txt (authentic, but another file): refused, and b's
    // content is never returned under a's name.
    fs::remove_file(v.backing_file("a.txt")).unwrap();
    let b_name = v.backing_file("b.txt").file_name().unwrap().to_owned();
    std::os::unix::fs::symlink(b_name, v.backing_file("a.txt")).unwrap();
    let err = v.read("a.txt").unwrap_err();
    let cannot = format!("cannot open {}", v.stored("a.txt"));
    assert!(err.to_string().contains(&cannot), "{err}");
    assert_eq!(v.read("b.txt").unwrap(), b"bravo");
    let out = kmsfs()
        .arg("cat")
        .arg(&v.backing)
        .arg("a.txt")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

/// The attacker's forgery of the victim's config: the victim's volume id, context and key
/// listed (ids are public), but the attacker's key first, with a volume key of their own
/// wrapped under it only (they cannot wrap under the victim's key) and a valid MAC under it.
fn forge_config_under(v: &TestVolume, attacker_key: &std::path::Path) -> Vec<u8> {
    use kmsfs::format::config::{TrustedKey, UnverifiedConfig};
    use kmsfs::format::context::EncryptionContext;
    use kmsfs::keys::local::{LocalKey, LocalProvider};
    use kmsfs::keys::KeyProvider;
    let genuine = fs::read(v.backing.join(".kmsfs/config")).unwrap();
    let mut forged = UnverifiedConfig::parse(&genuine).unwrap().claimed().clone();
    let key = LocalKey::create(attacker_key).unwrap();
    let id = key.id().to_string();
    let ctx = EncryptionContext::for_volume_config(&forged.volume_id, &forged.context);
    let (volume_key, wrapped) = LocalProvider::new([key])
        .generate_data_key(&id, &ctx)
        .unwrap();
    forged.trusted_keys.insert(
        0,
        TrustedKey {
            id,
            locator: format!("local:{}", attacker_key.display()),
        },
    );
    forged.volume_keys = vec![wrapped];
    let mac_key = kmsfs::format::kdf::config_mac_key(&volume_key, &forged.volume_id);
    forged.encode(&mac_key).unwrap()
}

fn open_checked(
    v: &TestVolume,
    pin: &[&std::path::Path],
    state: &std::path::Path,
) -> Result<Volume, Error> {
    use kmsfs::core::volume::HostRecord;
    Volume::open(
        &v.backing,
        &OpenOptions {
            pin: pin
                .iter()
                .map(|p| KeySpec::Local(p.to_path_buf()))
                .collect(),
            record: HostRecord::Check(state.to_path_buf()),
            ..Default::default()
        },
    )
}

#[test]
fn a_forged_config_listing_the_attackers_key_first_is_refused_under_a_pin_and_a_record() {
    let v = TestVolume::new(BS);
    three_block_file(&v, "before", 1);
    let state = v.dir.path().join("state");
    // Positive control: the genuine config opens pinned, and records itself on first use.
    open_checked(&v, &[&v.key_path], &state).unwrap();
    open_checked(&v, &[], &state).unwrap();
    let cfg = v.backing.join(".kmsfs/config");
    let genuine = fs::read(&cfg).unwrap();
    let attacker_key = tempfile::tempdir().unwrap();
    let attacker_key = attacker_key.path().join("attacker.key");
    let forged = forge_config_under(&v, &attacker_key);
    fs::write(&cfg, &forged).unwrap();
    // Before this was fixed, the pin was satisfied because the victim's key was listed, and
    // every new data key went to the attacker's key.
    let err = open_checked(&v, &[&v.key_path], &state).unwrap_err();
    assert!(matches!(err, Error::KeyPin(_)), "{err}");
    assert!(
        err.to_string()
            .contains("its volume key is not wrapped under it"),
        "{err}"
    );
    // Without --key, the record refuses it, naming the key added and the change of first key.
    let err = open_checked(&v, &[], &state).unwrap_err().to_string();
    let attacker_id = kmsfs::keys::local::LocalKey::load(&attacker_key)
        .unwrap()
        .id()
        .to_string();
    assert!(
        err.contains("its trusted keys changed since this host recorded them (added ")
            && err.contains(&attacker_id)
            && err.contains("approve it with 'kmsfs trust "),
        "{err}"
    );
    // Nothing was written under the attacker's key; the genuine config still works.
    assert_eq!(
        fs::read_dir(&v.backing).unwrap().count(),
        3,
        ".kmsfs, the root's record and before"
    );
    fs::write(&cfg, &genuine).unwrap();
    assert_eq!(
        EncryptedFile::open(
            &open_checked(&v, &[], &state).unwrap(),
            &v.stored("before"),
            false
        )
        .unwrap()
        .read_all()
        .unwrap(),
        pattern(2 * BS as usize + 100, 1)
    );
}

#[test]
fn a_pin_that_is_not_the_key_new_files_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v = TestVolume::new(BS);
    let second = dir.path().join("second.key");
    // A genuine two-key volume: the original key first, then `second`.
    let mut vol = v.reopen().unwrap();
    vol.add_trusted_key(&KeySpec::Local(second.clone()))
        .unwrap();
    vol.add_trusted_key(&KeySpec::Local(v.key_path.clone()))
        .unwrap();
    assert_eq!(vol.config().trusted_keys.len(), 2);
    let state = dir.path().join("state");
    // The volume key opens through `second`, but new files get their keys from the first key.
    let err = open_checked(&v, &[&second], &state).unwrap_err();
    assert!(matches!(err, Error::KeyPin(_)), "{err}");
    assert!(
        err.to_string()
            .contains("new files would get their keys from"),
        "{err}"
    );
    // Positive controls: the first key pinned, or both.
    open_checked(&v, &[&v.key_path], &state).unwrap();
    open_checked(&v, &[&second, &v.key_path], &state).unwrap();
}

#[test]
fn a_local_key_file_inside_the_backing_directory_is_refused() {
    let v = TestVolume::new(BS);
    let state = v.dir.path().join("state");
    let cfg = v.backing.join(".kmsfs/config");
    // The attacker's key file planted in the store, named first by a forged config: on first
    // use (no record, no pin) it is not read, so the volume key does not open.
    fs::create_dir(v.backing.join("keys")).unwrap();
    let planted = v.backing.join("keys/attacker.key");
    fs::write(&cfg, forge_config_under(&v, &planted)).unwrap();
    let err = open_checked(&v, &[], &state).unwrap_err().to_string();
    assert!(err.contains("inside the backing directory"), "{err}");
    assert!(!state.join("volumes").exists(), "nothing recorded");
    // Pinned, it is refused as such too.
    let err = open_checked(&v, &[&planted], &state).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err}");
    assert!(
        err.to_string().contains("inside the backing directory"),
        "{err}"
    );
    // Positive control: the same key file outside the store works for its own volume.
    let outside = TestVolume::new(BS);
    open_checked(&outside, &[&outside.key_path], &state).unwrap();
}

#[test]
fn a_volume_replaced_in_place_is_refused_until_approved() {
    use kmsfs::core::volume::HostRecord;
    let v = TestVolume::new(BS);
    let rogue = TestVolume::new(BS);
    let state = v.dir.path().join("state");
    open_checked(&v, &[], &state).unwrap();
    let cfg = v.backing.join(".kmsfs/config");
    let genuine = fs::read(&cfg).unwrap();
    fs::copy(rogue.backing.join(".kmsfs/config"), &cfg).unwrap();
    let err = open_checked(&v, &[], &state).unwrap_err().to_string();
    assert!(
        err.contains(&format!("it holds volume {}", rogue.volume.id_hex()))
            && err.contains(&format!(
                "not the volume {} this host recorded",
                v.volume.id_hex()
            )),
        "{err}"
    );
    // Approving needs a key that opens it: the recorded keys do not open the rogue config.
    let approve = |pin: Vec<KeySpec>| {
        Volume::open(
            &v.backing,
            &OpenOptions {
                pin,
                record: HostRecord::Approve(state.clone()),
                ..Default::default()
            },
        )
    };
    let err = approve(vec![]).unwrap_err().to_string();
    assert!(err.contains("none of the keys this host recorded"), "{err}");
    // Positive control: the operator who did replace it approves it with its key.
    let vol = approve(vec![KeySpec::Local(rogue.key_path.clone())]).unwrap();
    assert!(
        vol.record_note().unwrap().contains("in place of volume"),
        "{:?}",
        vol.record_note()
    );
    open_checked(&v, &[], &state).unwrap();
    // And now the old volume is the stranger there.
    fs::write(&cfg, &genuine).unwrap();
    assert!(open_checked(&v, &[], &state).is_err());
}

#[test]
fn a_changed_key_set_is_refused_until_approved_and_rewrap_updates_the_record() {
    use kmsfs::core::volume::HostRecord;
    let v = TestVolume::new(BS);
    let state = v.dir.path().join("state");
    open_checked(&v, &[], &state).unwrap();
    // A change made without this host's record (another host, or a library user).
    let other = v.dir.path().join("other.key");
    v.reopen()
        .unwrap()
        .add_trusted_key(&KeySpec::Local(other.clone()))
        .unwrap();
    let err = open_checked(&v, &[], &state).unwrap_err().to_string();
    assert!(
        err.contains("its trusted keys changed since this host recorded them (added local:")
            && err.contains("; new files now use local:"),
        "{err}"
    );
    let vol = Volume::open(
        &v.backing,
        &OpenOptions {
            record: HostRecord::Approve(state.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(vol
        .record_note()
        .unwrap()
        .starts_with("approved: added local:"));
    drop(vol);
    // A change made through a volume opened with the record updates it.
    let mut vol = open_checked(&v, &[], &state).unwrap();
    let ids = vol.other_trusted_keys("");
    vol.add_trusted_key(&KeySpec::Local(v.dir.path().join("third.key")))
        .unwrap();
    vol.retire_keys(&ids).unwrap();
    drop(vol);
    let vol = open_checked(&v, &[], &state).unwrap();
    assert_eq!(vol.config().trusted_keys.len(), 1);
}

/// The `key` lines of a trust record's text as the `next` lines of a change moving to them.
fn as_next(record: &str) -> String {
    record
        .lines()
        .filter_map(|l| l.strip_prefix("key "))
        .map(|k| format!("next {k}\n"))
        .collect()
}

/// A change of keys made through this host (a rewrap) killed after it wrote the volume's
/// config and before this host's record followed: the volume still opens (the record named the
/// keys the change moved to first), and the record follows then. Found by the crash soak
/// (`kill_9_at_random_moments_loses_no_fsynced_byte_and_fsck_stays_clean`): the next mount
/// refused the volume.
#[test]
fn a_key_change_killed_before_the_record_followed_still_opens() {
    let v = TestVolume::new(BS);
    let state = v.dir.path().join("state");
    drop(open_checked(&v, &[], &state).unwrap());
    let volume_id = v.reopen().unwrap().config().volume_id;
    let record_file = state
        .join("volumes")
        .join(kmsfs::format::codec::hex(&volume_id));
    let before = fs::read_to_string(&record_file).unwrap();
    let mut vol = open_checked(&v, &[], &state).unwrap();
    vol.add_trusted_key(&KeySpec::Local(v.dir.path().join("new.key")))
        .unwrap();
    drop(vol);
    let after = fs::read_to_string(&record_file).unwrap();
    assert!(!after.contains("\nnext "), "{after}");
    // What the kill leaves: the record as before, naming the keys the change moves to.
    let next = as_next(&after);
    fs::write(&record_file, format!("{before}{next}")).unwrap();
    let vol = open_checked(&v, &[], &state).unwrap();
    assert_eq!(vol.config().trusted_keys.len(), 2);
    drop(vol);
    assert_eq!(fs::read_to_string(&record_file).unwrap(), after);
    // The control: a record that names no change under way refuses the same config.
    fs::write(&record_file, &before).unwrap();
    let err = open_checked(&v, &[], &state).unwrap_err().to_string();
    assert!(err.contains("its trusted keys changed since"), "{err}");
    // A change killed before it wrote the config: the volume opens under the keys it has, and
    // the record stops naming the keys that change was moving to.
    let elsewhere = as_next(&before);
    fs::write(&record_file, format!("{after}{elsewhere}")).unwrap();
    drop(open_checked(&v, &[], &state).unwrap());
    assert_eq!(fs::read_to_string(&record_file).unwrap(), after);
    // Nor does a change under way to other keys let it in.
    let other = as_next(&before);
    fs::write(&record_file, format!("{before}{other}")).unwrap();
    assert!(open_checked(&v, &[], &state).is_err());
}

// Issue 15, point 4: truncation to zero renews a file (new file id, data key, commitment).

mod renewal {
    use super::*;
    use kmsfs::core::fs::{Caller, KmsFs, ROOT_INO};
    use kmsfs::format::header::Preamble;
    use kmsfs::keys::fault::Faults;
    use kmsfs::keys::KmsOp;
    use std::ffi::OsStr;

    const CALLER: Caller = Caller {
        uid: 0,
        gid: 0,
        umask: 0o022,
    };

    fn file_id(v: &TestVolume, p: &str) -> [u8; 16] {
        Preamble::decode(&v.bytes(p)).unwrap().file_id
    }

    /// `raw` with its block `index` replaced by the same block of `from`.
    fn splice(v: &TestVolume, p: &str, from: &[u8], index: usize) {
        let (off, sb) = v.geometry(p);
        let mut raw = v.bytes(p);
        let at = off + index * sb;
        raw[at..at + sb].copy_from_slice(&from[at..at + sb]);
        v.put_bytes(p, &raw);
    }

    /// A store writer puts another file's header under a file the attacker has open, and the
    /// attacker truncates it to zero: the renewal must not bind a new key (and what is written
    /// next) to the other file's name, where the store writer could then put the file and have
    /// it shown as authentic.
    #[test]
    fn a_renewal_never_binds_the_names_of_a_header_put_in_place() {
        let v = TestVolume::new(BS);
        let (volume, _) = v.open_faulty(1, Faults::default());
        let core = KmsFs::new(volume, false).unwrap();
        for name in ["victim", "mine", "control"] {
            let (_, fh) = core
                .create(ROOT_INO, OsStr::new(name), 0o600, libc::O_RDWR, CALLER)
                .unwrap();
            core.write(fh, 0, name.as_bytes()).unwrap();
            core.release(fh);
        }
        let mine = core.lookup(ROOT_INO, OsStr::new("mine")).unwrap();
        let control = core.lookup(ROOT_INO, OsStr::new("control")).unwrap();
        let held = core.open(mine.ino, libc::O_RDWR).unwrap();
        // Positive control: truncating one's own file renews it and it keeps its name.
        let fh = core
            .open(control.ino, libc::O_RDWR | libc::O_TRUNC)
            .unwrap();
        core.write(fh, 0, b"rewritten").unwrap();
        core.release(fh);
        assert_eq!(v.read("control").unwrap(), b"rewritten");
        // The victim's header and body in place of mine (same inode), then O_TRUNC.
        v.put_bytes("mine", &v.bytes("victim"));
        let renewed = core.open(mine.ino, libc::O_RDWR | libc::O_TRUNC);
        assert!(renewed.is_err(), "renewed under another file's header");
        core.release(held);
        // Nothing on the store binds the victim's name but the victim.
        let raw = v.bytes("mine");
        let header = kmsfs::format::header::Header::parse(&raw).unwrap();
        for (_, c) in header.candidates() {
            assert!(c.envelopes.iter().all(|e| e.path == v.stored("victim")));
        }
        assert_eq!(file_id(&v, "mine"), file_id(&v, "victim"));
        assert_eq!(v.read("victim").unwrap(), b"victim");
    }

    /// A file's blocks from before `O_TRUNC` (and `truncate(0)`) do not authenticate in what
    /// is written after it, at the same index; the renewal costs one `GenerateDataKey`
    /// (plus a `ReEncrypt` for a second name), keeps the inode number, and a handle opened
    /// before the truncation reads what is written after it.
    #[test]
    fn blocks_from_before_a_truncation_to_zero_do_not_authenticate_after_it() {
        let v = TestVolume::new(BS);
        let (volume, provider) = v.open_faulty(3, Faults::default());
        let core = KmsFs::new(volume, false).unwrap();
        let old = pattern(3 * BS as usize, 1);
        let (attr, fh) = core
            .create(ROOT_INO, OsStr::new("f"), 0o644, libc::O_RDWR, CALLER)
            .unwrap();
        core.write(fh, 0, &old).unwrap();
        core.release(fh);
        core.link(attr.ino, ROOT_INO, OsStr::new("g")).unwrap();
        let before = v.bytes("f");
        let id_before = file_id(&v, "f");
        let reader = core.open(attr.ino, libc::O_RDONLY).unwrap();
        let (gdk, rewrap) = (
            provider.calls(KmsOp::GenerateDataKey),
            provider.calls(KmsOp::ReEncrypt),
        );
        let fh = core.open(attr.ino, libc::O_RDWR | libc::O_TRUNC).unwrap();
        assert_eq!(provider.calls(KmsOp::GenerateDataKey), gdk + 1);
        assert_eq!(provider.calls(KmsOp::ReEncrypt), rewrap + 1, "one for /g");
        let new = pattern(3 * BS as usize, 2);
        core.write(fh, 0, &new).unwrap();
        core.release(fh);
        assert_ne!(file_id(&v, "f"), id_before);
        assert_eq!(
            core.lookup(ROOT_INO, OsStr::new("f")).unwrap().ino,
            attr.ino
        );
        // The handle opened before the truncation sees the new content.
        assert_eq!(core.read(reader, 0, 3 * BS).unwrap(), new);
        core.release(reader);
        // Both names open under the new key.
        assert_eq!(v.read("f").unwrap(), new);
        assert_eq!(v.read("g").unwrap(), new);
        // An old block spliced in at its own index fails.
        splice(&v, "f", &before, 1);
        assert_block_failure(v.read("f"), 1);

        // truncate(2) with no open handle (setattr of the size): the same.
        let fresh = pattern(3 * BS as usize, 3);
        let fh = core.open(attr.ino, libc::O_RDWR).unwrap();
        core.write(fh, 0, &fresh).unwrap();
        core.release(fh);
        let before = v.bytes("f");
        let id_before = file_id(&v, "f");
        let gdk = provider.calls(KmsOp::GenerateDataKey);
        core.setattr(
            attr.ino,
            None,
            None,
            None,
            Some(0),
            None,
            None,
            false,
            false,
            None,
            false,
        )
        .unwrap();
        assert_eq!(provider.calls(KmsOp::GenerateDataKey), gdk + 1);
        assert_ne!(file_id(&v, "f"), id_before);
        assert_eq!(v.read("f").unwrap(), b"");
        let fh = core.open(attr.ino, libc::O_RDWR).unwrap();
        core.write(fh, 0, &new).unwrap();
        core.release(fh);
        splice(&v, "f", &before, 2);
        assert_block_failure(v.read("f"), 2);
    }

    /// Positive control and the residual risk (docs/SECURITY.md, "Rolling back blocks"): a
    /// file rewritten in place keeps its key, so a block of an earlier state spliced in at its
    /// own index authenticates, and the file reads as a state that was never written.
    #[test]
    fn a_block_of_an_earlier_state_of_a_file_rewritten_in_place_authenticates() {
        let v = TestVolume::new(BS);
        let old = pattern(3 * BS as usize, 1);
        v.write("f", &old);
        let before = v.bytes("f");
        let new = pattern(3 * BS as usize, 2);
        let mut f = EncryptedFile::open(&v.volume, &v.stored("f"), true).unwrap();
        f.write_at(0, &new).unwrap();
        drop(f);
        splice(&v, "f", &before, 1);
        let mixed = v.read("f").unwrap();
        let bs = BS as usize;
        assert_eq!(mixed[..bs], new[..bs]);
        assert_eq!(mixed[bs..2 * bs], old[bs..2 * bs]);
        assert_eq!(mixed[2 * bs..], new[2 * bs..]);
    }
}

/// The kinds a fresh core's listing of `d` gives its entries (writable: it tags what it read
/// from a header).
fn listed_kinds(v: &TestVolume) -> Vec<(String, kmsfs::core::fs::Kind)> {
    use kmsfs::core::fs::{KmsFs, ROOT_INO};
    let core = KmsFs::new(v.reopen().unwrap(), false).unwrap();
    let d = core
        .lookup(ROOT_INO, std::ffi::OsStr::new("d"))
        .unwrap()
        .ino;
    let mut out: Vec<_> = core
        .readdir(d)
        .unwrap()
        .into_iter()
        .filter(|e| e.name != "." && e.name != "..")
        .map(|e| (e.name.to_string_lossy().into_owned(), e.kind))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn looks_up(v: &TestVolume, name: &str) -> bool {
    use kmsfs::core::fs::{KmsFs, ROOT_INO};
    let core = KmsFs::new(v.reopen().unwrap(), true).unwrap();
    let d = core
        .lookup(ROOT_INO, std::ffi::OsStr::new("d"))
        .unwrap()
        .ino;
    core.lookup(d, std::ffi::OsStr::new(name)).is_ok()
}

fn kind_tag_of(p: &std::path::Path) -> Option<Vec<u8>> {
    let mut v = vec![0u8; 64];
    let n = rustix::fs::lgetxattr(p, kmsfs::format::kind_tag::XATTR, &mut v[..]).ok()?;
    v.truncate(n);
    Some(v)
}

fn put_kind_tag(p: &std::path::Path, value: &[u8]) {
    rustix::fs::lsetxattr(
        p,
        kmsfs::format::kind_tag::XATTR,
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

/// A listing tells a regular backing file's kind from its kind tag without reading its header
/// (the positive control: a symlink whose header is damaged is still listed as one, and only
/// its lookup fails), but only from a tag kmsfs made for that very entry: a symlink's tag
/// copied onto a file, or a tag with its kind byte changed, is ignored and the header read
/// instead. A stripped tag is made again by the listing that read the header.
#[test]
fn a_listing_takes_a_kind_only_from_a_tag_made_for_that_entry() {
    use kmsfs::core::fs::Kind;
    use kmsfs::format::header::ObjectKind;
    let v = TestVolume::new(4096);
    v.mkdir("d");
    v.write("d/file", b"data");
    v.object("d/link", ObjectKind::Symlink, 0o777, 0, b"file");
    let (file, link) = (v.backing_file("d/file"), v.backing_file("d/link"));
    let made = vec![
        ("file".to_string(), Kind::File),
        ("link".to_string(), Kind::Symlink),
    ];
    assert_eq!(listed_kinds(&v), made);
    let (file_tag, link_tag) = (kind_tag_of(&file).unwrap(), kind_tag_of(&link).unwrap());

    // The tag is what the listing goes by: the header is not even read.
    let good = v.bytes("d/link");
    let mut damaged = good.clone();
    damaged[40] ^= 1;
    v.put_bytes("d/link", &damaged);
    assert_eq!(listed_kinds(&v), made);
    assert!(!looks_up(&v, "link"), "a damaged header is refused");
    // ...and `readdirplus`, which reads every header anyway, takes no kind from a tag: it
    // hands the kernel no attributes of a kind only the tag told.
    {
        use kmsfs::core::fs::{KmsFs, ROOT_INO};
        let core = KmsFs::new(v.reopen().unwrap(), true).unwrap();
        let d = core
            .lookup(ROOT_INO, std::ffi::OsStr::new("d"))
            .unwrap()
            .ino;
        let mut seen = Vec::new();
        core.readdirplus(d, 0, |e, a, real, _| {
            seen.push((e.name.to_string_lossy().into_owned(), e.kind, a.kind, real));
            false
        })
        .unwrap();
        assert!(
            seen.contains(&("link".into(), Kind::File, Kind::File, false)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("file".into(), Kind::File, Kind::File, true)),
            "{seen:?}"
        );
    }
    v.put_bytes("d/link", &good);
    assert!(looks_up(&v, "link"));

    // The symlink's tag on the file, and the file's tag claiming a symlink: the file's header
    // says what it is.
    put_kind_tag(&file, &link_tag);
    assert_eq!(listed_kinds(&v), made);
    let mut forged = file_tag.clone();
    forged[0] = ObjectKind::Symlink as u8;
    put_kind_tag(&file, &forged);
    assert_eq!(listed_kinds(&v), made);
    // ...and that listing put the file's own tag back.
    assert_eq!(kind_tag_of(&file).unwrap(), file_tag);

    // Stripped: read from the header, then tagged again (the damaged header shows it), but
    // not by a read-only mount.
    rustix::fs::lremovexattr(&link, kmsfs::format::kind_tag::XATTR).unwrap();
    {
        use kmsfs::core::fs::{KmsFs, ROOT_INO};
        let core = KmsFs::new(v.reopen().unwrap(), true).unwrap();
        let d = core
            .lookup(ROOT_INO, std::ffi::OsStr::new("d"))
            .unwrap()
            .ino;
        assert_eq!(core.readdir(d).unwrap().len(), 4);
        assert_eq!(kind_tag_of(&link), None, "a read-only listing wrote a tag");
    }
    assert_eq!(listed_kinds(&v), made);
    assert_eq!(kind_tag_of(&link).unwrap(), link_tag);
    v.put_bytes("d/link", &damaged);
    assert_eq!(listed_kinds(&v), made);
}

/// A listing tells kinds a window at a time, as plain `readdir` replies reach the entries:
/// every entry of a directory several windows long gets its own kind, from its tag, its
/// header (tag stripped) or what an earlier reply remembered, in replies of any size, after a
/// first `readdirplus` reply, and after seeking forwards and back.
#[test]
fn every_entry_of_a_long_listing_gets_its_kind_in_replies_of_any_size() {
    use kmsfs::core::fs::{DirEntry, Kind, KmsFs, ROOT_INO};
    use kmsfs::format::header::ObjectKind;
    let v = TestVolume::new(4096);
    v.mkdir("d");
    let mut want = std::collections::BTreeMap::new();
    for i in 0..700 {
        let name = format!("e{i:04}");
        let p = format!("d/{name}");
        let kind = match i % 7 {
            3 => {
                v.object(&p, ObjectKind::Symlink, 0o777, 0, b"target");
                Kind::Symlink
            }
            5 => {
                v.object(&p, ObjectKind::Fifo, 0o644, 0, b"");
                Kind::Fifo
            }
            _ => {
                v.write(&p, b"data");
                Kind::File
            }
        };
        if i % 3 == 0 {
            let _ = rustix::fs::lremovexattr(v.backing_file(&p), kmsfs::format::kind_tag::XATTR);
        }
        want.insert(name, kind);
    }
    let fresh = || {
        let core = KmsFs::new(v.reopen().unwrap(), true).unwrap();
        let d = core
            .lookup(ROOT_INO, std::ffi::OsStr::new("d"))
            .unwrap()
            .ino;
        (core, d)
    };
    // Replies of `per` entries from `offset` to the end: (entries, offset after the last).
    let replies = |core: &KmsFs, d: u64, mut offset: usize, per: usize| {
        let mut got: Vec<DirEntry> = Vec::new();
        loop {
            let mut reply = 0;
            let mut next = offset;
            core.readdir_from(d, offset, |e, at| {
                if reply == per {
                    return true;
                }
                reply += 1;
                got.push(e.clone());
                next = at as usize;
                false
            })
            .unwrap();
            if reply == 0 {
                return got;
            }
            offset = next;
        }
    };
    let check = |got: &[DirEntry], from: &str| {
        let mut seen = 0;
        for e in got.iter().filter(|e| e.name != "." && e.name != "..") {
            let name = e.name.to_string_lossy();
            if *name < *from {
                continue;
            }
            assert_eq!(Some(&e.kind), want.get(&*name), "{name}");
            seen += 1;
        }
        seen
    };
    for per in [1, 37, 100, 1000] {
        let (core, d) = fresh();
        assert_eq!(
            check(&replies(&core, d, 0, per), ""),
            700,
            "{per} per reply"
        );
    }
    // A first `readdirplus` reply of 10, then plain replies.
    let (core, d) = fresh();
    let mut taken = 0;
    core.readdirplus(d, 0, |_, _, _, _| {
        taken += 1;
        taken > 10
    })
    .unwrap();
    assert_eq!(check(&replies(&core, d, 10, 150), ""), 692);
    // Forwards past untold windows, then back into them.
    let (core, d) = fresh();
    let ahead = replies(&core, d, 500, 50);
    let back = replies(&core, d, 100, 50);
    assert_eq!(check(&ahead, ""), 202);
    assert_eq!(check(&back, ""), 602);
    // Positive control: the same walk with every tag stripped and the headers of the
    // symlinks damaged lists them as files (neither could tell).
    for i in (3..700).step_by(7) {
        let p = format!("d/e{i:04}");
        let _ = rustix::fs::lremovexattr(v.backing_file(&p), kmsfs::format::kind_tag::XATTR);
        let mut bytes = v.bytes(&p);
        bytes[40] ^= 1;
        v.put_bytes(&p, &bytes);
    }
    let (core, d) = fresh();
    let got = replies(&core, d, 0, 37);
    let link = got.iter().find(|e| e.name == "e0003").unwrap();
    assert_eq!(link.kind, Kind::File);
}

/// Another user of the mount renames a directory while a pass of replies over it is part way
/// and makes a new directory of the old name, holding symlinks named like its files: the rest
/// of the pass lists the renamed directory's own files (their inodes, kinds and attributes),
/// not the objects now at its old path, in `readdirplus` replies and in plain ones.
#[test]
fn a_listing_goes_on_in_its_own_directory_after_that_directory_is_renamed() {
    use kmsfs::core::fs::{Caller, Kind, KmsFs, ROOT_INO};
    use std::ffi::OsStr;
    const CALLER: Caller = Caller {
        uid: 0,
        gid: 0,
        umask: 0o022,
    };
    let v = TestVolume::new(4096);
    let names: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    for dir in ["d", "e"] {
        v.mkdir(dir);
        for n in &names {
            v.write(&format!("{dir}/{n}"), b"mine");
        }
    }
    let core = KmsFs::new(v.reopen().unwrap(), false).unwrap();
    // The attacker's moves: `dir` renamed away, a new `dir` of symlinks named like its files.
    let swap = |dir: &str| {
        core.rename(
            ROOT_INO,
            OsStr::new(dir),
            ROOT_INO,
            OsStr::new(&format!("{dir}-old")),
            true,
        )
        .unwrap();
        let new = core
            .mkdir(ROOT_INO, OsStr::new(dir), 0o755, CALLER)
            .unwrap();
        for n in &names {
            let link = core.symlink(new.ino, OsStr::new(n), "/etc/passwd".as_ref(), CALLER);
            assert_eq!(link.unwrap().kind, Kind::Symlink);
        }
        new.ino
    };
    let inodes = |dir: u64| -> std::collections::BTreeMap<String, u64> {
        names
            .iter()
            .map(|n| (n.clone(), core.lookup(dir, OsStr::new(n)).unwrap().ino))
            .collect()
    };

    // `readdirplus`: five entries (`.`, `..` and three files), the swap, then the rest.
    let d = core.lookup(ROOT_INO, OsStr::new("d")).unwrap().ino;
    let mine = inodes(d);
    // Up to `per` entries from `offset` on, `.` and `..` left out.
    let replies_plus = |offset: usize, per: usize| {
        let (mut taken, mut got) = (0, Vec::new());
        core.readdirplus(d, offset, |e, attr, real, _| {
            taken += 1;
            if taken > per {
                return true;
            }
            if e.name != "." && e.name != ".." {
                let name = e.name.to_string_lossy().into_owned();
                got.push((name, attr.ino, attr.kind, real));
            }
            false
        })
        .unwrap();
        got
    };
    let mut rest = replies_plus(0, 5);
    assert_eq!(rest.len(), 3);
    let new_d = swap("d");
    rest.extend(replies_plus(5, usize::MAX));
    // (In the order of the stored names, which with encrypted names is not theirs.)
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), mine[n], Kind::File, true))
        .collect();
    assert_eq!(rest, want);

    // Plain replies: `.` alone (no kind asked yet), the swap, then the rest, each of its own
    // kind.
    let e = core.lookup(ROOT_INO, OsStr::new("e")).unwrap().ino;
    let mine = inodes(e);
    let mut taken = 0;
    core.readdir_from(e, 0, |_, _| {
        taken += 1;
        taken > 1
    })
    .unwrap();
    let new_e = swap("e");
    let mut rest = Vec::new();
    core.readdir_from(e, 1, |e, _| {
        if e.name != ".." {
            rest.push((e.name.to_string_lossy().into_owned(), e.ino, e.kind));
        }
        false
    })
    .unwrap();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), mine[n], Kind::File))
        .collect();
    assert_eq!(rest, want);

    // Positive control: what is at the old paths now is the attacker's symlinks, and a
    // listing of it says so.
    for new in [new_d, new_e] {
        let kinds: Vec<Kind> = core
            .readdir(new)
            .unwrap()
            .into_iter()
            .filter(|e| e.name != "." && e.name != "..")
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec![Kind::Symlink; 20]);
    }
}
