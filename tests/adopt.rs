//! `kmsfs adopt`: a file moved on the backing store is accepted where it is, through the key
//! service; a wrong `--from` and a file from another volume are refused and change nothing.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;

use common::mount::kmsfs;
use common::{assert_success, TestVolume};

fn adopt(v: &TestVolume, path: &str, from: &str) -> std::process::Output {
    kmsfs()
        .arg("adopt")
        .arg(&v.backing)
        .arg(path)
        .arg("--from")
        .arg(from)
        .output()
        .unwrap()
}

#[test]
fn a_restored_file_is_adopted_where_it_is() {
    let v = TestVolume::new(512);
    v.mkdir("archive");
    v.write("report.pdf", b"quarterly numbers");
    fs::rename(
        v.backing_file("report.pdf"),
        v.backing_file("archive/report.pdf"),
    )
    .unwrap();
    assert!(
        v.read("archive/report.pdf").is_err(),
        "moved: refused until adopted"
    );
    let out = adopt(&v, "archive/report.pdf", "report.pdf");
    assert_success(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "adopted /archive/report.pdf (was bound to /report.pdf): 1 envelope(s) re-encrypted to its new path"
    );
    assert_eq!(v.read("archive/report.pdf").unwrap(), b"quarterly numbers");
    let fsck = kmsfs().arg("fsck").arg(&v.backing).output().unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_wrong_origin_or_a_foreign_file_is_refused_and_nothing_changes() {
    let v = TestVolume::new(512);
    v.write("a", b"alpha");
    fs::rename(v.backing_file("a"), v.backing_file("b")).unwrap();
    let before = v.bytes("b");
    let out = adopt(&v, "b", "not-where-it-was");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/b is not bound to /not-where-it-was (it is bound to /a)"),
        "{err}"
    );
    assert_eq!(v.bytes("b"), before);

    // From another volume: its header does not even authenticate here.
    let other = TestVolume::new(512);
    other.write("a", b"foreign");
    fs::copy(other.backing_file("a"), v.backing_file("foreign")).unwrap();
    let before = v.bytes("foreign");
    let out = adopt(&v, "foreign", "a");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Named as the user knows it (with encrypted names too).
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("kmsfs: /foreign: header authentication failed"),
        "{err}"
    );
    assert_eq!(v.bytes("foreign"), before);
    assert!(v.read("foreign").is_err());
}

/// What an operator does with only the commands (docs/BACKUP.md): a file restored from a
/// backup copy of the store is put where its new name is stored (`decode --reverse`, which
/// also writes a long name's side record) and adopted there; it then reads, is listed, and
/// fsck is clean.
#[test]
fn a_file_restored_to_another_directory_is_put_in_place_with_decode_reverse_and_adopted() {
    let v = TestVolume::new(512);
    v.mkdir("projects");
    v.mkdir("recovered");
    let long = "r".repeat(200);
    v.write("projects/report.pdf", b"from the backup");
    let backup = v.dir.path().join("backup-copy");
    fs::copy(v.backing_file("projects/report.pdf"), &backup).unwrap();
    let stored_at = |p: &str| {
        let out = kmsfs()
            .arg("decode")
            .arg(&v.backing)
            .arg("--reverse")
            .arg(p)
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        stored_at("projects/report.pdf"),
        v.stored("projects/report.pdf").as_str()
    );
    let at = stored_at(&format!("recovered/{long}"));
    fs::copy(&backup, v.backing.join(&at[1..])).unwrap();
    assert_success(&adopt(
        &v,
        &format!("recovered/{long}"),
        "projects/report.pdf",
    ));
    assert_eq!(
        v.read(&format!("recovered/{long}")).unwrap(),
        b"from the backup"
    );
    let fsck = kmsfs().arg("fsck").arg(&v.backing).output().unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // With plaintext names the stored path is the path.
    if common::plaintext_names() {
        assert_eq!(at, format!("/recovered/{long}"));
    } else {
        assert!(at.contains("kmsfs.long."), "{at}");
    }
}
