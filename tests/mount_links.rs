//! Hard links through a real mount: one inode, one envelope per name in its header, writes
//! through one name seen through the other, unlink of one name drops its envelope, and the
//! documented cap (EMLINK beyond it).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::mount::{fuse_available, Mount};

#[test]
fn hard_links_hold_one_envelope_per_name() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("orig"), b"shared").unwrap();
    fs::hard_link(m.p("orig"), m.p("alias")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("orig")).unwrap(),
        fs::metadata(m.p("alias")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    let (_, info) = m.info("alias");
    assert!(
        info.contains("bound to /orig") && info.contains("bound to /alias"),
        "{info}"
    );
    // A write through one name is seen through the other.
    fs::OpenOptions::new()
        .append(true)
        .open(m.p("alias"))
        .unwrap();
    fs::write(m.p("alias"), b"changed").unwrap();
    assert_eq!(fs::read(m.p("orig")).unwrap(), b"changed");
    fs::remove_file(m.p("orig")).unwrap();
    let (ok, info) = m.info("alias");
    assert!(ok && !info.contains("/orig"), "{info}");
    m.remount();
    assert_eq!(fs::read(m.p("alias")).unwrap(), b"changed");
}

#[test]
fn too_many_links_is_emlink() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"x").unwrap();
    let mut made = 1;
    let err = loop {
        match fs::hard_link(m.p("f"), m.p(&format!("l{made}"))) {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made <= 64, "no link limit");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EMLINK), "{err}");
    assert_eq!(made, kmsfs::core::fs::MAX_LINKS, "the documented cap");
    assert_eq!(fs::read(m.p(&format!("l{}", made - 1))).unwrap(), b"x");
    // A file with every name it may have can still be renamed.
    fs::rename(m.p("f"), m.p("renamed")).unwrap();
    assert_eq!(fs::read(m.p("renamed")).unwrap(), b"x");
}
