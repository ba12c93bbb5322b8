//! Rename and hard links through a real mount. The data key follows the name: after a
//! rename the header on the backing store names only the new path (in both slots), a
//! directory rename rebinds every file beneath it, a link adds an envelope, an unlink of one
//! name removes its envelope; everything still reads after a remount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::mount::{fuse_available, Mount};
use common::pattern;

fn renameat2(from: &std::path::Path, to: &std::path::Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (
        std::ffi::CString::new(from.to_str().unwrap()).unwrap(),
        std::ffi::CString::new(to.to_str().unwrap()).unwrap(),
    );
    // SAFETY: valid paths; renameat2 through the raw syscall (glibc may lack the wrapper).
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_rebinds_the_key_to_the_new_path() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("old.txt"), b"moving data").unwrap();
    fs::rename(m.p("old.txt"), m.p("new.txt")).unwrap();
    assert_eq!(fs::read(m.p("new.txt")).unwrap(), b"moving data");
    let (ok, info) = m.info("new.txt");
    assert!(ok, "{info}");
    assert!(
        !info.contains("/old.txt"),
        "no slot still names the old path: {info}"
    );
    m.remount();
    assert_eq!(fs::read(m.p("new.txt")).unwrap(), b"moving data");
}

#[test]
fn rename_over_an_existing_file_and_noreplace() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    let err = renameat2(&m.p("a"), &m.p("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    fs::rename(m.p("a"), m.p("b")).unwrap();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"A");
    assert!(!m.p("a").exists());
    renameat2(&m.p("b"), &m.p("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(m.p("c")).unwrap(), b"A");
}

#[test]
fn directory_rename_rebinds_every_file_beneath() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    for d in 0..5 {
        fs::create_dir_all(m.p(&format!("proj/sub{d}/deep"))).unwrap();
        for f in 0..60 {
            fs::write(
                m.p(&format!("proj/sub{d}/deep/f{f}")),
                pattern(100 + f, d as u8),
            )
            .unwrap();
        }
    }
    let t0 = std::time::Instant::now();
    fs::rename(m.p("proj"), m.p("renamed")).unwrap();
    eprintln!("renamed a directory of 300 files in {:?}", t0.elapsed());
    m.remount();
    for d in 0..5 {
        for f in 0..60 {
            let got = fs::read(m.p(&format!("renamed/sub{d}/deep/f{f}"))).unwrap();
            assert_eq!(got, pattern(100 + f, d as u8));
        }
    }
    let (ok, info) = m.info("renamed/sub3/deep/f7");
    assert!(ok && !info.contains("/proj/"), "{info}");
}

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
