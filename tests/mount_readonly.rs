//! A read-only mount serves reads and refuses every change, and writes nothing to the backing
//! store.

mod common;

use std::fs;

use common::mount::{fuse_available, Mount};

#[test]
fn read_only_mount_refuses_changes() {
    if !fuse_available() {
        return;
    }
    let mut rw = Mount::new(4096, &[]);
    fs::create_dir(rw.p("d")).unwrap();
    fs::write(rw.p("d/f"), b"frozen").unwrap();
    rw.stop();
    let before = kmsfs_tree(&rw.backing);
    let mut ro = rw;
    ro.set_extra(&["--read-only"]);
    ro.start();
    assert_eq!(fs::read(ro.p("d/f")).unwrap(), b"frozen");
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(fs::write(ro.p("new"), b"x"));
    erofs(fs::write(ro.p("d/f"), b"x"));
    erofs(fs::remove_file(ro.p("d/f")));
    erofs(fs::rename(ro.p("d/f"), ro.p("d/g")));
    erofs(fs::create_dir(ro.p("e")));
    ro.stop();
    assert_eq!(
        before,
        kmsfs_tree(&ro.backing),
        "the backing store was changed"
    );
}

fn kmsfs_tree(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
