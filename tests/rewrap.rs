//! `kmsfs rewrap` with local keys: a few thousand files move to a new key and the old one can
//! go; `--dry-run` changes nothing; `kill -9` at random points and a second run completes;
//! a rewrap beside a mount that writes and renames loses nothing.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::mount::{fuse_available, kmsfs, Mount};
use common::{assert_success, pattern, TestVolume};
use kmsfs::core::file::read_header;
use kmsfs::core::volume::OpenOptions;
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::format::context::CanonicalPath;
use kmsfs::keys::spec::KeySpec;

fn content(i: usize) -> Vec<u8> {
    pattern(50 + i % 700, i as u8)
}

/// A volume under key A with `n` files in a few directories.
fn volume_with_files(n: usize) -> TestVolume {
    let v = TestVolume::new(4096);
    for d in 0..10 {
        v.mkdir(&format!("d{d}"));
    }
    for i in 0..n {
        v.write(&format!("d{}/f{i}", i % 10), &content(i));
    }
    v
}

fn rewrap(v: &TestVolume, new_key: &Path, extra: &[&str]) -> std::process::Output {
    kmsfs()
        .arg("rewrap")
        .arg(&v.backing)
        .arg("--to-key")
        .arg(format!("local:{}", new_key.display()))
        .args(extra)
        .output()
        .unwrap()
}

/// Key ids of every envelope in every slot of every file (not the volume-wrapped keys of
/// directory records and other objects, which no rewrap touches).
fn key_ids(backing: &Path) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    let mut stack = vec![backing.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_name() == ".kmsfs" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                continue;
            }
            let f = fs::File::open(e.path()).unwrap();
            let (h, _) = read_header(&f, &CanonicalPath::root()).unwrap();
            for (_, slot) in h.candidates() {
                for env in &slot.envelopes {
                    if env.key.key_id != kmsfs::format::object::OBJECT_KEY_ID {
                        *ids.entry(env.key.key_id.clone()).or_default() += 1;
                    }
                }
            }
        }
    }
    ids
}

fn open_with(v: &TestVolume, key: &Path) -> Volume {
    Volume::open(
        &v.backing,
        &OpenOptions {
            pin: vec![KeySpec::Local(key.to_path_buf())],
            ..Default::default()
        },
    )
    .unwrap()
}

fn assert_all_read(volume: &Volume, n: usize) {
    for i in 0..n {
        let p = format!("d{}/f{i}", i % 10);
        let got = EncryptedFile::open(volume, &common::stored(volume, &p), false)
            .and_then(|f| f.read_all())
            .unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(got, content(i), "{p}");
    }
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().display().to_string(), fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

#[test]
fn thousands_of_files_move_to_a_new_key_and_the_old_one_can_go() {
    let n = 3000;
    let v = volume_with_files(n);
    let new_key = v.dir.path().join("keys/new.key");
    let out = rewrap(&v, &new_key, &["--jobs", "4", "--retire-old", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"], n);
    assert_eq!(report["rewrapped"], n);
    assert_eq!(report["envelopes"], n);
    assert_eq!(report["key_added"], true);
    assert_eq!(report["retired_keys"].as_array().unwrap().len(), 1);
    // Local keys cannot ReEncrypt between key files: one Decrypt + one Encrypt per file.
    assert_eq!(report["kms_calls"]["Encrypt"], n + 1);
    // Every envelope in every slot is under the new key; the old key file can go.
    let ids = key_ids(&v.backing);
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        *ids.values().next().unwrap(),
        2 * n,
        "both slots of every file"
    );
    fs::remove_file(&v.key_path).unwrap();
    assert_all_read(&open_with(&v, &new_key), n);
    // A second run finds nothing to do.
    let again = rewrap(&v, &new_key, &["--json"]);
    assert!(again.status.success());
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (report["rewrapped"].clone(), report["already_done"].clone()),
        (0.into(), n.into())
    );
}

#[test]
fn dry_run_changes_nothing() {
    let v = volume_with_files(200);
    let new_key = v.dir.path().join("keys/new.key");
    let before = snapshot(&v.backing);
    let out = rewrap(&v, &new_key, &["--dry-run", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["rewrapped"].clone(), report["envelopes"].clone()),
        (200.into(), 200.into())
    );
    assert_eq!(report["kms_calls"]["Encrypt"], 0);
    assert_eq!(report["kms_calls"]["ReEncrypt"], 0);
    assert!(before == snapshot(&v.backing), "the backing store changed");
    assert!(!new_key.exists(), "a dry run creates no key file");
}

#[test]
fn killed_at_random_points_a_second_run_completes() {
    let n = 1500;
    let v = volume_with_files(n);
    let new_key = v.dir.path().join("keys/new.key");
    let mut seed = 0x9e37_79b9_u64;
    let mut interrupted = 0;
    for round in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = kmsfs()
            .arg("rewrap")
            .arg(&v.backing)
            .arg("--to-key")
            .arg(format!("local:{}", new_key.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + seed % 300));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        interrupted += usize::from(!status.success());
        // Whatever the moment, every file reads with both keys at hand.
        assert_all_read(&v.reopen().unwrap(), n);
        eprintln!("round {round}: killed after {} ms", 20 + seed % 300);
    }
    assert!(interrupted > 0, "no run was interrupted");
    let out = rewrap(&v, &new_key, &["--retire-old", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("final run: {report}");
    assert_eq!(report["files"], n);
    let ids = key_ids(&v.backing);
    assert_eq!(ids.len(), 1, "only the new key remains: {ids:?}");
    fs::remove_file(&v.key_path).unwrap();
    assert_all_read(&open_with(&v, &new_key), n);
}

#[test]
fn rewrap_beside_a_mount_that_writes_and_renames_loses_nothing() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    for i in 0..300 {
        fs::write(m.p(&format!("f{i}")), content(i)).unwrap();
    }
    let new_key = m.dir.path().join("keys/new.key");
    let mnt = m.mnt.clone();
    // The mount rewrites and renames files while rewrap runs.
    let writer = std::thread::spawn(move || {
        let mut expected = BTreeMap::new();
        for round in 0..3 {
            for i in (round..300).step_by(7) {
                let (from, to) = (mnt.join(format!("f{i}")), mnt.join(format!("g{i}")));
                let data = pattern(100 + i + round, round as u8);
                fs::write(&from, &data).unwrap();
                fs::rename(&from, &to).unwrap();
                fs::rename(&to, &from).unwrap();
                expected.insert(i, data);
            }
        }
        expected
    });
    let out = kmsfs()
        .arg("rewrap")
        .arg(&m.backing)
        .arg("--to-key")
        .arg(format!("local:{}", new_key.display()))
        .arg("--json")
        .output()
        .unwrap();
    let expected = writer.join().unwrap();
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every write is there, through the mount and after a remount.
    let check = |m: &Mount| {
        for i in 0..300 {
            let want = expected.get(&i).cloned().unwrap_or_else(|| content(i));
            assert_eq!(fs::read(m.p(&format!("f{i}"))).unwrap(), want, "f{i}");
        }
    };
    check(&m);
    m.remount();
    check(&m);
    // The daemon was started before the key was added, so it may have bound renamed files to
    // the old key only: a second rewrap (after the remount) moves them, and then every
    // envelope is under the new key.
    let out = kmsfs()
        .arg("rewrap")
        .arg(&m.backing)
        .arg("--to-key")
        .arg(format!("local:{}", new_key.display()))
        .arg("--retire-old")
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(key_ids(&m.backing).len(), 1);
    // The old key file can go: the volume still mounts and reads.
    fs::remove_file(&m.key).unwrap();
    m.remount();
    check(&m);
}

#[test]
fn a_file_that_cannot_be_rewrapped_is_listed_and_blocks_retiring() {
    let v = volume_with_files(30);
    // A file from another volume: its header does not authenticate here.
    let other = TestVolume::new(4096);
    other.write("foreign", b"not ours");
    fs::copy(other.backing_file("foreign"), v.backing_file("d0/foreign")).unwrap();
    let new_key = v.dir.path().join("keys/new.key");
    let out = rewrap(&v, &new_key, &["--retire-old", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rewrapped"], 30);
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    // Named as the user knows it (with encrypted names too).
    assert_eq!(failed[0]["path"], "/d0/foreign");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("/d0/foreign: ") && error.contains("header authentication failed"),
        "{error}"
    );
    assert_eq!(
        report["retired_keys"].as_array().unwrap().len(),
        0,
        "not retired"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("1 of 31 files could not be rewrapped"),
        "{stderr}"
    );
    // Both keys are still trusted, and every good file reads.
    assert_all_read(&v.reopen().unwrap(), 30);
}
