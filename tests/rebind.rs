//! Rebinding at the core (no mount): renames and links refused midway change nothing, a
//! record left by a crash is finished by the next writable mount, and finished rebinds leave
//! no envelope for a name a file no longer has.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use common::{pattern, TestVolume};
use kmsfs::core::file::read_header;
use kmsfs::core::fs::{Caller, KmsFs, ROOT_INO};
use kmsfs::core::journal::Journal;
use kmsfs::core::EncryptedFile;
use kmsfs::format::context::CanonicalPath;
use kmsfs::format::envelope::Envelope;
use kmsfs::keys::fault::{Faults, FaultyProvider};
use kmsfs::keys::KmsOp;

const CALLER: Caller = Caller {
    uid: 0,
    gid: 0,
    umask: 0o022,
};

/// A core over the test volume whose key service can be told to start refusing.
fn mount(v: &TestVolume) -> (KmsFs, Arc<FaultyProvider>) {
    let (volume, provider) = v.open_faulty(7, Faults::default());
    (KmsFs::new(volume, false).unwrap(), provider)
}

fn ino(core: &KmsFs, p: &str) -> u64 {
    p.split('/').fold(ROOT_INO, |parent, name| {
        core.lookup(parent, OsStr::new(name)).unwrap().ino
    })
}

fn write(core: &KmsFs, dir: u64, name: &str, data: &[u8]) {
    let (_, fh) = core
        .create(dir, OsStr::new(name), 0o644, libc::O_RDWR, CALLER)
        .unwrap();
    core.write(fh, 0, data).unwrap();
    core.release(fh);
}

/// Every path any envelope of either header slot of a backing file is bound to.
fn envelope_paths(backing: &Path) -> Vec<String> {
    let file = fs::File::open(backing).unwrap();
    let (header, _) = read_header(&file, &CanonicalPath::root()).unwrap();
    let mut paths: Vec<String> = header
        .candidates()
        .iter()
        .flat_map(|(_, c)| c.envelopes.iter().map(|e| e.path.as_str().to_string()))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The stored paths of the user's paths `ps`, as [`envelope_paths`] lists them (sorted).
fn stored_paths(v: &TestVolume, ps: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = ps.iter().map(|p| v.stored(p).to_string()).collect();
    out.sort();
    out
}

/// The file at `at` opened for writing, its envelope, and an envelope of its data key for
/// `other` (a name it does not have: what an interrupted rebind leaves).
fn with_envelope_for(v: &TestVolume, at: &str, other: &str) -> (EncryptedFile, Envelope, Envelope) {
    let (a, b) = (v.stored(at), v.stored(other));
    let f = EncryptedFile::open(&v.volume, &a, true).unwrap();
    let mine = f.envelopes()[0].clone();
    let key = v
        .volume
        .keyring()
        .rewrap(
            &mine.key,
            &v.volume.file_context(&a),
            &mine.key.key_id,
            &v.volume.file_context(&b),
        )
        .unwrap();
    (f, mine, Envelope { path: b, key })
}

fn pending_records(v: &TestVolume) -> usize {
    fs::read_dir(v.backing.join(".kmsfs/pending"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn read(v: &TestVolume, p: &str) -> Vec<u8> {
    let volume = v.reopen().unwrap();
    EncryptedFile::open(&volume, &common::stored(&volume, p), false)
        .and_then(|f| f.read_all())
        .unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn directory_rename_refused_midway_leaves_nothing_stale() {
    let v = TestVolume::new(4096);
    let (core, provider) = mount(&v);
    let dir = core
        .mkdir(ROOT_INO, OsStr::new("tree"), 0o755, CALLER)
        .unwrap()
        .ino;
    for i in 0..40 {
        write(&core, dir, &format!("f{i}"), &pattern(100 + i, i as u8));
    }
    // The key service stops answering ReEncrypt after 15 files have their new envelope.
    provider.set(
        Some(KmsOp::ReEncrypt),
        Faults {
            deny_after: Some(provider.calls(KmsOp::ReEncrypt) + 15),
            ..Default::default()
        },
    );
    let err = core
        .rename(
            ROOT_INO,
            OsStr::new("tree"),
            ROOT_INO,
            OsStr::new("moved"),
            false,
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    let calls = provider.calls(KmsOp::ReEncrypt);
    assert!(
        (16..16 + 8).contains(&calls),
        "stopped soon after the first refusal: {calls}"
    );
    drop(core);
    assert_eq!(pending_records(&v), 0);
    for i in 0..40 {
        let p = format!("tree/f{i}");
        assert_eq!(envelope_paths(&v.backing_file(&p)), stored_paths(&v, &[&p]));
        assert_eq!(read(&v, &p), pattern(100 + i, i as u8));
    }
}

#[test]
fn a_record_left_by_a_crash_is_finished_at_the_next_mount() {
    let v = TestVolume::new(4096);
    v.mkdir("tree");
    for i in 0..10 {
        v.write(&format!("tree/f{i}"), &pattern(50 + i, i as u8));
    }
    // What a crash after step 1 of renaming tree to moved leaves: a record, and files with
    // envelopes for both names.
    let journal = Journal::new(&v.volume, false).unwrap();
    journal
        .begin(&[v.stored("tree"), v.stored("moved")])
        .unwrap()
        .abandon();
    for i in 0..10 {
        // A directory's rename keeps the stored names beneath it (they are encrypted under
        // its record's id, which moves with it): only the prefix changes.
        let from = v.stored(&format!("tree/f{i}"));
        let name = v.backing_file(&format!("tree/f{i}"));
        let to = v
            .stored("moved")
            .join(name.file_name().unwrap().as_encoded_bytes())
            .unwrap();
        let mut f = EncryptedFile::open(&v.volume, &from, true).unwrap();
        let mut envelopes = f.envelopes().to_vec();
        let key = v
            .volume
            .keyring()
            .rewrap(
                &envelopes[0].key,
                &v.volume.file_context(&from),
                &envelopes[0].key.key_id,
                &v.volume.file_context(&to),
            )
            .unwrap();
        envelopes.push(Envelope { path: to, key });
        f.replace_envelopes(envelopes).unwrap();
    }
    let moved_f3 = v
        .stored("moved")
        .join(
            v.backing_file("tree/f3")
                .file_name()
                .unwrap()
                .as_encoded_bytes(),
        )
        .unwrap();
    let mut both = vec![moved_f3.to_string(), v.stored("tree/f3").to_string()];
    both.sort();
    assert_eq!(envelope_paths(&v.backing_file("tree/f3")), both);
    // And a record torn by a crash while it was being written (before any step).
    fs::write(v.backing.join(".kmsfs/pending/torn"), b"kmsfs-rebi").unwrap();
    assert_eq!(pending_records(&v), 2);

    // A read-only mount changes nothing; a writable one tidies.
    let volume = v.reopen().unwrap();
    drop(KmsFs::new(volume, true).unwrap());
    assert_eq!(pending_records(&v), 2);
    let (core, _) = mount(&v);
    // The genuine record is finished; the torn one is reported and left (a torn record and
    // a planted one look alike, and neither is the daemon's to delete).
    assert_eq!(
        pending_records(&v),
        1,
        "the record is finished, the torn one left"
    );
    assert!(v.backing.join(".kmsfs/pending/torn").exists());
    assert_eq!(core.unusable_records(), 1);
    for i in 0..10 {
        let p = format!("tree/f{i}");
        assert_eq!(envelope_paths(&v.backing_file(&p)), stored_paths(&v, &[&p]));
        assert_eq!(read(&v, &p), pattern(50 + i, i as u8));
    }
}

/// Eight directories of the longest name stored as it is with encrypted names (235 bytes on
/// the store; a longer one is stored as a short `kmsfs.long.` name): a path far beyond the
/// header room of a file created at the root.
fn deep_dir(core: &KmsFs) -> u64 {
    let long = "n".repeat(159);
    let mut dir = ROOT_INO;
    for _ in 0..8 {
        dir = core
            .mkdir(dir, OsStr::new(&long), 0o755, CALLER)
            .unwrap()
            .ino;
    }
    dir
}

fn slot_size(host: &std::path::Path) -> u32 {
    let head = std::fs::read(host).unwrap();
    u32::from_be_bytes(head[12..16].try_into().unwrap())
}

#[test]
fn a_rename_beyond_the_header_room_grows_the_header_and_keeps_the_file() {
    let v = TestVolume::new(4096);
    let (core, _) = mount(&v);
    let data = pattern(50_000, 3);
    write(&core, ROOT_INO, "a", &data);
    let before = slot_size(&v.backing_file("a"));
    let dir = deep_dir(&core);
    let long = "n".repeat(159);
    core.rename(ROOT_INO, OsStr::new("a"), dir, OsStr::new(&long), false)
        .unwrap();
    drop(core);
    let at = format!("{long}/{long}/{long}/{long}/{long}/{long}/{long}/{long}/{long}");
    assert!(slot_size(&v.backing_file(&at)) > before, "grown");
    assert_eq!(
        envelope_paths(&v.backing_file(&at)),
        stored_paths(&v, &[&at])
    );
    assert_eq!(pending_records(&v), 0);
    assert!(std::fs::read_dir(v.backing.join(".kmsfs/renew"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(read(&v, &at), data);
}

#[test]
fn a_rename_beyond_the_header_room_of_a_file_too_large_to_move_is_enametoolong_and_changes_nothing()
{
    let v = TestVolume::new(4096);
    let (core, _) = mount(&v);
    let data = pattern(kmsfs::core::renew::MAX_GROW as usize + 1, 5);
    write(&core, ROOT_INO, "a", &data);
    let dir = deep_dir(&core);
    let long = "n".repeat(159);
    let err = core
        .rename(ROOT_INO, OsStr::new("a"), dir, OsStr::new(&long), false)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENAMETOOLONG, "{err}");
    assert!(err.to_string().contains("copy the file"), "{err}");
    drop(core);
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a"])
    );
    assert_eq!(pending_records(&v), 0);
    assert_eq!(read(&v, "a"), data);
}

#[test]
fn finished_rebinds_leave_no_record_and_no_stale_envelope() {
    let v = TestVolume::new(4096);
    let (core, _) = mount(&v);
    write(&core, ROOT_INO, "a", b"alpha");
    let a = ino(&core, "a");
    core.link(a, ROOT_INO, OsStr::new("b")).unwrap();
    write(&core, ROOT_INO, "c", b"gamma");
    // Over a hard-linked target: `b` keeps the file, minus its envelope for `c`'s name.
    core.rename(ROOT_INO, OsStr::new("a"), ROOT_INO, OsStr::new("x"), false)
        .unwrap();
    core.rename(ROOT_INO, OsStr::new("c"), ROOT_INO, OsStr::new("x"), false)
        .unwrap();
    assert_eq!(
        envelope_paths(&v.backing_file("b")),
        stored_paths(&v, &["b"])
    );
    assert_eq!(
        envelope_paths(&v.backing_file("x")),
        stored_paths(&v, &["x"])
    );
    core.link(ino(&core, "b"), ROOT_INO, OsStr::new("d"))
        .unwrap();
    core.unlink(ROOT_INO, OsStr::new("b")).unwrap();
    assert_eq!(
        envelope_paths(&v.backing_file("d")),
        stored_paths(&v, &["d"])
    );
    assert_eq!(pending_records(&v), 0);
    drop(core);
    assert_eq!(read(&v, "d"), b"alpha");
    assert_eq!(read(&v, "x"), b"gamma");
}

#[test]
fn a_link_refused_by_the_key_service_changes_nothing() {
    let v = TestVolume::new(4096);
    let (core, provider) = mount(&v);
    write(&core, ROOT_INO, "a", b"alpha");
    let a = ino(&core, "a");
    provider.set(
        Some(KmsOp::ReEncrypt),
        Faults {
            deny: true,
            ..Default::default()
        },
    );
    let err = core.link(a, ROOT_INO, OsStr::new("b")).unwrap_err();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    assert!(!v.backing_file("b").exists());
    drop(core);
    assert_eq!(pending_records(&v), 0);
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a"])
    );
    assert_eq!(read(&v, "a"), b"alpha");
}

#[test]
fn a_crash_between_the_two_slot_writes_of_an_unbind_is_tidied_too() {
    let v = TestVolume::new(4096);
    v.write("a", b"alpha");
    // The older slot still names /b (the unbind's second write never happened); the newer
    // one is already clean.
    let (mut f, mine, extra) = with_envelope_for(&v, "a", "b");
    f.replace_envelopes(vec![mine.clone(), extra]).unwrap();
    f.replace_envelopes(vec![mine]).unwrap();
    drop(f);
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a", "b"])
    );
    let journal = Journal::new(&v.volume, false).unwrap();
    journal
        .begin(&[v.stored("a"), v.stored("b")])
        .unwrap()
        .abandon();
    let (_core, _) = mount(&v);
    assert_eq!(pending_records(&v), 0);
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a"])
    );
    assert_eq!(read(&v, "a"), b"alpha");
}

#[test]
fn a_forged_record_is_neither_acted_on_nor_deleted() {
    let v = TestVolume::new(4096);
    v.write("a", b"alpha");
    // The file has a stale envelope for /b in its current slot: what a record naming /a would
    // have the next mount tidy.
    let (mut f, mine, extra) = with_envelope_for(&v, "a", "b");
    f.replace_envelopes(vec![mine, extra]).unwrap();
    drop(f);
    let pending = v.backing.join(".kmsfs/pending");
    fs::create_dir_all(&pending).unwrap();
    // What a store writer can make: the record's magic and paths (the root, to make every
    // mount walk the whole volume), under no key or another; and a huge one.
    let mut forged = b"kmsfs-rebind-2\0/\0".to_vec();
    forged.extend_from_slice(&[0x5a; 32]);
    fs::write(pending.join("forged"), &forged).unwrap();
    fs::write(pending.join("huge"), vec![b'/'; 2 << 20]).unwrap();
    let (core, _) = mount(&v);
    assert_eq!(core.unusable_records(), 2);
    drop(core);
    assert_eq!(fs::read(pending.join("forged")).unwrap(), forged);
    assert!(pending.join("huge").exists());
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a", "b"])
    );
    let fsck = kmsfs::core::fsck::check(&v.volume, false, true).unwrap();
    let unusable = fsck
        .problems
        .iter()
        .filter(|p| p.kind == "unusable-rebind-record" && !p.repaired)
        .count();
    assert_eq!(unusable, 2);
    assert!(pending.join("forged").exists() && pending.join("huge").exists());

    // Positive control: a record the volume's journal wrote is acted on and removed.
    fs::remove_file(pending.join("forged")).unwrap();
    fs::remove_file(pending.join("huge")).unwrap();
    let journal = Journal::new(&v.volume, false).unwrap();
    journal.begin(&[v.stored("a")]).unwrap().abandon();
    let (core, _) = mount(&v);
    assert_eq!(core.unusable_records(), 0);
    drop(core);
    assert_eq!(pending_records(&v), 0);
    assert_eq!(
        envelope_paths(&v.backing_file("a")),
        stored_paths(&v, &["a"])
    );
    assert_eq!(read(&v, "a"), b"alpha");
}
