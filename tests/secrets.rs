//! Secret hygiene, end to end: no data key, content key or plaintext shows up in the daemon's
//! logs (at trace level) or on the backing store; the daemon is not dumpable and keeps its key
//! cache locked; a config others can write is refused.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::assert_success;
use common::mount::{fuse_available, kmsfs, Mount};
use kmsfs::core::file::read_header;
use kmsfs::core::volume::OpenOptions;
use kmsfs::core::Volume;
use kmsfs::format::kdf;

const CANARY: &[u8] = b"kmsfs-plaintext-canary-7f3a91 patient record 0042";
/// What every file name of the test starts with: with encrypted names, never seen on the store.
const NAME_CANARY: &str = "name-canary-5e1d";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..chunk.len() + 1 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The name of every entry under `dir`, at any depth.
fn all_names(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            all_names(&e.path(), out);
        }
    }
}

/// Every regular file under `dir`, with its bytes.
fn all_files(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            all_files(&e.path(), out);
        } else if t.is_file() {
            out.push((e.path(), fs::read(e.path()).unwrap()));
        }
    }
}

#[test]
fn no_key_or_plaintext_in_logs_or_on_the_backing_store() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    m.set_env("RUST_LOG", "trace");
    m.remount();
    let name = |n: &str| format!("{NAME_CANARY}-{n}");
    // A long name too (stored as `kmsfs.long.HASH` and a side record, with encrypted names).
    let long = name(&"long".repeat(50));
    let (dir, record, renamed, linked) = (
        name("dir"),
        format!("{}/{}", name("dir"), name("record")),
        format!("{}/{}", name("dir"), name("renamed")),
        name("linked"),
    );
    fs::create_dir(m.p(&dir)).unwrap();
    let mut body = Vec::new();
    for _ in 0..200 {
        body.extend_from_slice(CANARY);
    }
    fs::write(m.p(&record), &body).unwrap();
    fs::rename(m.p(&record), m.p(&renamed)).unwrap();
    fs::hard_link(m.p(&renamed), m.p(&linked)).unwrap();
    fs::write(m.p(&long), b"x").unwrap();
    std::os::unix::fs::symlink(&renamed, m.p(&name("symlink"))).unwrap();
    m.remount();
    assert_eq!(fs::read(m.p(&renamed)).unwrap(), body);
    assert_eq!(fs::read(m.p(&long)).unwrap(), b"x");
    m.stop();

    // The file's data key and content key, recovered the legitimate way.
    let volume = Volume::open(&m.backing, &OpenOptions::default()).unwrap();
    let at = common::stored(&volume, &renamed);
    let file = fs::File::open(m.b(&renamed)).unwrap();
    let (header, _) = read_header(&file, &at).unwrap();
    let mac = volume.header_mac_key(&header.preamble.file_id);
    let authentic = header.authentic(&mac);
    let envelopes = &authentic.first().expect("an authentic slot").1.envelopes;
    let wrapped: Vec<_> = envelopes
        .iter()
        .filter(|e| e.path == at)
        .map(|e| &e.key)
        .collect();
    let dek = volume
        .keyring()
        .unwrap(&wrapped, &volume.file_context(&at))
        .unwrap();
    let content = kdf::content_key(&dek, &header.preamble.file_id);
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("data key", dek.expose().to_vec()),
        ("content key", content.expose().to_vec()),
    ];

    let log = m.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG") || log.len() > 1000,
        "the daemon logged at trace level"
    );
    let mut places = vec![(m.dir.path().join("mount.log"), log.clone().into_bytes())];
    all_files(&m.backing, &mut places);
    assert!(places.len() > 3);
    for (place, bytes) in &places {
        for (what, key) in &secrets {
            for form in [key.clone(), hex(key).into_bytes(), base64(key).into_bytes()] {
                assert!(
                    !contains(bytes, &form),
                    "the {what} appears in {}",
                    place.display()
                );
            }
        }
        assert!(
            !contains(bytes, &CANARY[..24]),
            "plaintext appears in {}",
            place.display()
        );
    }

    // With encrypted names, no file name (nor a symlink's target) shows on the store: not as
    // an entry's name, not in any header (the paths envelopes are bound to) or side record.
    if !common::plaintext_names() {
        let mut names = Vec::new();
        all_names(&m.backing, &mut names);
        assert!(names.len() > 6, "{names:?}");
        for n in &names {
            assert!(
                !n.strip_prefix(&m.backing)
                    .unwrap()
                    .to_string_lossy()
                    .contains(NAME_CANARY),
                "a plaintext name on the store: {}",
                n.display()
            );
        }
        for (place, bytes) in &places[1..] {
            assert!(
                !contains(bytes, NAME_CANARY.as_bytes()),
                "a plaintext name appears in {}",
                place.display()
            );
        }
    } else {
        // Positive control: with plaintext names they are there to see.
        assert!(m.backing.join(&renamed).exists());
    }
}

#[test]
fn the_daemon_is_not_dumpable_and_locks_its_key_cache() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"x").unwrap();
    let out = kmsfs()
        .arg("status")
        .arg("--json")
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert_success(&out);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pid"].as_u64(), Some(m.pid() as u64));
    assert_eq!(status["dumpable"], serde_json::json!(false), "{status}");
    assert_eq!(
        status["key_cache"]["locked_in_memory"],
        serde_json::json!(true),
        "{status}"
    );
}

#[test]
fn a_config_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = dir.path().join("master.key");
    let out = kmsfs()
        .arg("init")
        .arg(&backing)
        .arg("--key")
        .arg(format!("local:{}", key.display()))
        .output()
        .unwrap();
    assert_success(&out);
    let config = backing.join(".kmsfs/config");
    let before = fs::read(&config).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).unwrap();
    for args in [vec!["info"], vec!["fsck"]] {
        let out = kmsfs().args(&args).arg(&backing).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} accepted a world-writable config"
        );
        assert!(err.contains("writable by group or others"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(fs::read(&config).unwrap(), before, "nothing changed");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let out = kmsfs().arg("fsck").arg(&backing).output().unwrap();
    assert_success(&out);
}
