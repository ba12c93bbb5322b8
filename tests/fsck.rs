//! `kmsfs fsck` finds each planted defect (moved file, swapped files, flipped bit, truncated
//! file, stale envelope, untrusted key), reports a clean volume as clean, and `--repair`
//! drops stale envelopes and nothing else.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;

use common::mount::kmsfs;
use common::{pattern, TestVolume};
use kmsfs::core::EncryptedFile;
use kmsfs::format::envelope::Envelope;
use kmsfs::format::header::{seal_slot, Header, SlotState};

fn fsck(v: &TestVolume, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = kmsfs()
        .arg("fsck")
        .arg(&v.backing)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// (path, kind) of every problem not repaired.
fn problems(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["repaired"] == false)
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pair(p: &str, kind: &str) -> (String, String) {
    (p.to_string(), kind.to_string())
}

/// Re-MACs slot 0 under this volume's header key (as anyone who can open it can).
fn remac(v: &TestVolume, raw: &mut [u8]) {
    let header = Header::parse(raw).unwrap();
    let SlotState::Sealed(content) = &header.slots[0] else {
        panic!("slot 0 is not sealed")
    };
    let pre = &header.preamble;
    let sealed = seal_slot(pre, content, &v.volume.header_mac_key(&pre.file_id)).unwrap();
    let start = pre.slot_offset(0) as usize;
    raw[start..start + sealed.len()].copy_from_slice(&sealed);
}

#[test]
fn a_clean_volume_is_clean() {
    let v = TestVolume::new(512);
    v.mkdir("dir");
    for i in 0..20 {
        v.write(&format!("dir/f{i}"), &pattern(i * 100, i as u8));
    }
    let (code, report) = fsck(&v, &["--deep"]);
    assert_eq!(
        (code, report["clean"].clone()),
        (0, true.into()),
        "{report}"
    );
    assert_eq!(report["files"], 20);
    assert!(problems(&report).is_empty());
}

#[test]
fn every_planted_defect_is_found() {
    let v = TestVolume::new(512);
    for name in [
        "good",
        "moved_from",
        "x",
        "y",
        "flipped",
        "cut",
        "cut_inside",
        "stale",
    ] {
        v.write(name, &pattern(3 * 512 + 100, name.len() as u8));
    }
    // Moved, and swapped.
    fs::rename(v.backing_file("moved_from"), v.backing_file("moved_to")).unwrap();
    fs::rename(v.backing_file("x"), v.backing_file("tmp")).unwrap();
    fs::rename(v.backing_file("y"), v.backing_file("x")).unwrap();
    fs::rename(v.backing_file("tmp"), v.backing_file("y")).unwrap();
    // A bit flipped in block 1 (of 4): only a deep check reads it.
    let (off, sb) = v.geometry("flipped");
    let mut raw = v.bytes("flipped");
    raw[off + sb + 40] ^= 4;
    v.put_bytes("flipped", &raw);
    // Cut at a block boundary (the new last block was not sealed as last), and to a length
    // no file can have (8 bytes of a sealed block).
    let raw = v.bytes("cut");
    v.put_bytes("cut", &raw[..off + 2 * sb]);
    let raw = v.bytes("cut_inside");
    v.put_bytes("cut_inside", &raw[..raw.len() - 120]);
    // A stale envelope: the file also holds one for a name it does not have.
    {
        let p = v.stored("stale");
        let mut f = EncryptedFile::open(&v.volume, &p, true).unwrap();
        let mine = f.envelopes()[0].clone();
        let gone = v.stored("gone");
        let key = v
            .volume
            .keyring()
            .rewrap(
                &mine.key,
                &v.volume.file_context(&p),
                &mine.key.key_id,
                &v.volume.file_context(&gone),
            )
            .unwrap();
        f.replace_envelopes(vec![mine, Envelope { path: gone, key }])
            .unwrap();
    }
    // A file under a key the volume does not trust (re-MACed to get past the header MAC),
    // bound to the stored path it is put at (names on the store are there to read).
    let rogue = TestVolume::new(512);
    let at = v.stored("rogue");
    kmsfs::core::file::write_new_file(&rogue.volume, &at, &mut &b"attacker data"[..]).unwrap();
    let mut raw = fs::read(rogue.backing.join(at.to_relative_path())).unwrap();
    remac(&v, &mut raw);
    v.put_bytes("rogue", &raw);
    // Entries kmsfs never makes: a symlink, a directory made on the store (no record), and a
    // directory whose record was swapped for another's (bound to another path).
    std::os::unix::fs::symlink("good", v.backing_file("planted-link")).unwrap();
    fs::create_dir(v.backing_file("bare-dir")).unwrap();
    v.mkdir("a-dir");
    v.mkdir("b-dir");
    fs::copy(
        v.backing_file("a-dir/.kmsfs-dir"),
        v.backing_file("b-dir/.kmsfs-dir"),
    )
    .unwrap();

    let (code, report) = fsck(&v, &[]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["clean"], false);
    assert_eq!(
        problems(&report),
        vec![
            pair("/b-dir/.kmsfs-dir", "moved"),
            pair("/bare-dir", "missing-dir-record"),
            pair("/cut", "tampered-block"),
            pair("/cut_inside", "truncated"),
            pair("/moved_to", "moved"),
            pair("/planted-link", "not-kmsfs"),
            pair("/rogue", "untrusted-key"),
            pair("/stale", "stale-envelope"),
            pair("/x", "moved"),
            pair("/y", "moved"),
        ],
        "{report}"
    );
    // The details name paths as the user knows them too (with encrypted names, not stored).
    let detail = |p: &str| {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["path"] == p)
            .unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        detail("/y"),
        "/y: context mismatch: the file is bound to /x (moved or copied on the backing store?)"
    );
    assert!(
        detail("/b-dir/.kmsfs-dir").contains("bound to /a-dir/.kmsfs-dir"),
        "{report}"
    );
    assert_eq!(
        detail("/stale"),
        "holds envelopes for names it no longer has: /gone"
    );
    let (_, deep) = fsck(&v, &["--deep"]);
    assert!(
        problems(&deep).contains(&pair("/flipped", "tampered-block")),
        "{deep}"
    );

    // --repair drops the stale envelope, and only that.
    let before = v.bytes("flipped");
    let (code, repaired) = fsck(&v, &["--repair"]);
    assert_eq!(code, 3, "the other defects remain");
    assert!(!problems(&repaired).contains(&pair("/stale", "stale-envelope")));
    assert_eq!(v.bytes("flipped"), before, "repair never touches data");
    let (_, after) = fsck(&v, &[]);
    assert!(
        !problems(&after).iter().any(|(p, _)| p == "/stale"),
        "{after}"
    );
    assert_eq!(v.read("stale").unwrap(), pattern(3 * 512 + 100, 5));
}

#[test]
fn the_human_report_is_one_line_per_problem_and_a_summary() {
    let v = TestVolume::new(512);
    v.write("a", b"one");
    v.write("b", b"two");
    fs::rename(v.backing_file("a"), v.backing_file("c")).unwrap();
    let out = kmsfs().arg("fsck").arg(&v.backing).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("/c: moved: /c: context mismatch: the file is bound to /a "),
        "{stdout}"
    );
    assert_eq!(lines[1], "2 files checked: 1 problems");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
