//! A read-only mount serves reads and refuses every change, writes nothing to the backing
//! store (not even access times), and asks the key service for nothing but `Decrypt`.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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

/// Every backing entry's bytes and times (access, modification, change), symlinks aside
/// (reading a symlink's target updates its access time on Linux; kmsfs cannot prevent that).
fn backing_state(root: &Path) -> BTreeMap<String, (Vec<u8>, i64, i64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                continue;
            }
            let mut data = Vec::new();
            if m.is_file() {
                use std::io::Read;
                use std::os::unix::fs::OpenOptionsExt;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOATIME)
                    .open(&p)
                    .unwrap()
                    .read_to_end(&mut data)
                    .unwrap();
            }
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.display().to_string(),
                (data, m.atime(), m.atime_nsec(), m.mtime(), m.ctime()),
            );
        }
    }
    out
}

/// Sets every backing entry's access time three days back (relatime would update those).
fn age_access_times(root: &Path) {
    let old = libc::timespec {
        tv_sec: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 3 * 86_400,
        tv_nsec: 0,
    };
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: valid path and two timespecs.
            let r = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    [old, omit].as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            assert_eq!(r, 0);
        }
    }
}

fn walk(dir: &Path) -> usize {
    let mut files = 0;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            files += walk(&p);
        } else if m.is_file() {
            fs::read(&p).unwrap();
            files += 1;
        }
    }
    files
}

#[test]
fn a_read_only_walk_writes_nothing_and_only_decrypts() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    for d in 0..5 {
        fs::create_dir_all(m.p(&format!("d{d}/sub"))).unwrap();
        for f in 0..10 {
            fs::write(m.p(&format!("d{d}/sub/f{f}")), vec![f as u8; 5000]).unwrap();
        }
    }
    std::os::unix::fs::symlink("d0", m.p("link")).unwrap();
    m.stop();
    age_access_times(&m.backing);
    let before = backing_state(&m.backing);
    m.set_extra(&["--read-only"]);
    m.set_env("RUST_LOG", "info");
    m.start();
    assert_eq!(walk(&m.mnt), 50);
    m.stop();
    let after = backing_state(&m.backing);
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: {:?} -> {:?}",
                (v.1, v.2, v.3, v.4),
                after.get(k).map(|a| (a.1, a.2, a.3, a.4))
            )
        })
        .collect();
    assert!(
        changed.is_empty(),
        "the backing store changed:\n{}",
        changed.join("\n")
    );
    let log = m.log();
    let calls = log
        .lines()
        .find(|l| l.contains("key service calls:"))
        .unwrap_or_else(|| panic!("no key stats in the log:\n{log}"));
    for none in ["GenerateDataKey 0 ", "Encrypt 0 ", "ReEncrypt 0 "] {
        assert!(calls.contains(none), "{calls}");
    }
    assert!(!calls.contains("Decrypt 0 "), "{calls}");
}
