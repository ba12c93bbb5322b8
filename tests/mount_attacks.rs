//! SPEC §2 attacks made on the backing store while the volume is mounted (and after a
//! remount): the application gets EIO, the daemon logs the path and the reason once, never
//! returns wrong data, and keeps serving every other file.

mod common;

use std::fs;

use common::mount::{fuse_available, Mount};
use common::pattern;

fn eio(path: std::path::PathBuf) {
    let err = fs::read(&path).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "{}: {err}",
        path.display()
    );
}

#[test]
fn attacks_while_mounted_give_eio_and_the_daemon_carries_on() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("dir")).unwrap();
    for name in ["a", "b", "c", "d", "dir/e", "untouched"] {
        fs::write(m.p(name), pattern(3 * 4096 + 10, name.len() as u8)).unwrap();
    }
    let sealed = 4096 + 28;
    let offset = fs::read(m.b("a")).unwrap().len() - (3 * sealed + 10 + 28);

    // Move a file on the backing store.
    fs::rename(m.b("a"), m.b("a-moved")).unwrap();
    eio(m.p("a-moved"));
    // Swap two files.
    let (b, c) = (fs::read(m.b("b")).unwrap(), fs::read(m.b("c")).unwrap());
    fs::write(m.b("b"), &c).unwrap();
    fs::write(m.b("c"), &b).unwrap();
    eio(m.p("b"));
    eio(m.p("c"));
    // Reorder two blocks.
    let mut d = fs::read(m.b("d")).unwrap();
    let first = d[offset..offset + sealed].to_vec();
    d.copy_within(offset + sealed..offset + 2 * sealed, offset);
    d[offset + sealed..offset + 2 * sealed].copy_from_slice(&first);
    fs::write(m.b("d"), &d).unwrap();
    eio(m.p("d"));
    // Move a whole directory.
    fs::rename(m.b("dir"), m.b("dir2")).unwrap();
    eio(m.p("dir2/e"));

    // The daemon still serves the file nobody touched.
    assert_eq!(
        fs::read(m.p("untouched")).unwrap(),
        pattern(3 * 4096 + 10, 9)
    );
    let log = m.log();
    assert!(
        log.contains("/a-moved") && log.contains("context mismatch"),
        "{log}"
    );
    assert!(
        log.contains("/d") && log.contains("authentication failed at block 0"),
        "{log}"
    );

    // And after a remount, the same.
    m.remount();
    eio(m.p("a-moved"));
    eio(m.p("d"));
    assert_eq!(
        fs::read(m.p("untouched")).unwrap(),
        pattern(3 * 4096 + 10, 9)
    );
}

#[test]
fn truncation_and_spliced_headers_and_foreign_files_give_eio() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let other = Mount::new(4096, &[]);
    for name in ["t", "s", "donor"] {
        fs::write(m.p(name), pattern(2 * 4096 + 5, 3)).unwrap();
    }
    fs::write(other.p("foreign"), b"from another volume").unwrap();
    let raw = fs::read(m.b("t")).unwrap();
    let header = raw.len() - (2 * (4096 + 28) + 5 + 28);
    // Truncate at a block boundary.
    fs::write(m.b("t"), &raw[..header + 2 * (4096 + 28)]).unwrap();
    eio(m.p("t"));
    // Splice s's header onto donor's body.
    let (s, donor) = (fs::read(m.b("s")).unwrap(), fs::read(m.b("donor")).unwrap());
    let spliced = [&s[..header], &donor[header..]].concat();
    fs::write(m.b("s"), spliced).unwrap();
    eio(m.p("s"));
    // A file copied from another volume.
    fs::copy(other.b("foreign"), m.b("foreign")).unwrap();
    eio(m.p("foreign"));
    assert_eq!(fs::read(m.p("donor")).unwrap(), pattern(2 * 4096 + 5, 3));
}
