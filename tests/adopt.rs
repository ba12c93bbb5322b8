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
