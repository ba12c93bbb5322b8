//! A full backing disk (a small tmpfs): writes, appends and creates that run out of space fail
//! with ENOSPC in the application, and every byte that was there before, and every write that
//! was acknowledged, still reads back; nothing on the store fails authentication (fsck clean).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;

use common::mount::{fuse_available, kmsfs, Mount};
use common::{assert_success, pattern};

/// Compares without printing megabytes: lengths and the first difference.
fn same(got: &[u8], want: &[u8], what: &str) {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first.is_none(),
        "{what}: {} bytes, want {}; first difference at {first:?}",
        got.len(),
        want.len()
    );
}

fn no_space(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == ErrorKind::StorageFull
}

#[test]
fn enospc_reaches_the_application_and_loses_nothing_that_was_there() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new_on(4096, &[], Some(8 << 20));
    // What was there before the disk filled.
    let kept: Vec<(String, Vec<u8>)> = (0..5)
        .map(|k| (format!("kept{k}"), pattern(150_000 + 777 * k, k as u8)))
        .collect();
    for (name, body) in &kept {
        let mut f = fs::File::create(m.p(name)).unwrap();
        f.write_all(body).unwrap();
        f.sync_all().unwrap();
    }
    let mut grown = pattern(10_001, 42);
    fs::write(m.p("grown"), &grown).unwrap();

    // Fill the disk with one file, 64 KiB at a time, until a write fails.
    let mut filler = fs::File::create(m.p("filler")).unwrap();
    let chunk = pattern(64 << 10, 7);
    let mut acked = 0usize;
    let err = loop {
        match filler.write_all(&chunk) {
            Ok(()) => acked += chunk.len(),
            Err(e) => break e,
        }
        assert!(acked < 64 << 20, "the 8 MiB disk never filled");
    };
    assert!(no_space(&err), "the application sees ENOSPC: {err}");
    drop(filler);

    // Unaligned appends to a file whose final block is partly full, until one fails.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.p("grown"))
        .unwrap();
    let mut fails = 0;
    for i in 0..64 {
        let piece = pattern(3001, i as u8);
        // Counted write by write: one append can be acknowledged in part (a short write).
        let mut done = 0;
        while done < piece.len() {
            match f.write(&piece[done..]) {
                Ok(n) => {
                    grown.extend_from_slice(&piece[done..done + n]);
                    done += n;
                }
                Err(e) => {
                    assert!(no_space(&e), "{e}: {}", m.log());
                    fails += 1;
                    break;
                }
            }
        }
    }
    assert!(fails > 0, "the appends found the disk full");
    drop(f);
    // Creates fail too (a new file needs room for its header), and leave nothing behind.
    let mut created = 0;
    for i in 0..200 {
        match fs::write(m.p(&format!("new{i}")), b"tiny") {
            Ok(()) => created += 1,
            Err(e) => {
                assert!(no_space(&e), "{e}");
                break;
            }
        }
    }
    // Rewriting in place needs no new space and still works.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.p("kept0"))
        .unwrap();
    f.write_all_at(b"rewritten", 4090).unwrap();
    drop(f);
    let mut kept0 = kept[0].1.clone();
    kept0[4090..4099].copy_from_slice(b"rewritten");

    m.remount();
    same(&fs::read(m.p("kept0")).unwrap(), &kept0, "kept0");
    for (name, body) in &kept[1..] {
        same(&fs::read(m.p(name)).unwrap(), body, name);
    }
    same(
        &fs::read(m.p("grown")).unwrap(),
        &grown,
        "acknowledged appends",
    );
    let filled = fs::read(m.p("filler")).unwrap();
    assert!(filled.len() >= acked, "{} < {acked}", filled.len());
    for (k, piece) in filled.chunks(chunk.len()).enumerate() {
        same(piece, &chunk[..piece.len()], &format!("filler chunk {k}"));
    }
    for i in 0..created {
        assert_eq!(fs::read(m.p(&format!("new{i}"))).unwrap(), b"tiny");
    }
    m.stop();
    // Nothing on the store fails authentication.
    let out = kmsfs()
        .arg("fsck")
        .arg(&m.backing)
        .arg("--deep")
        .output()
        .unwrap();
    assert_success(&out);
}
