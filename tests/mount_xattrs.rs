//! Extended attributes through a real mount: set, get (and the length query), list, remove,
//! the create/replace flags, too-small buffers, directories, and that attributes follow a file
//! through a rename and a remount. (Values are stored as the backing file's own attributes,
//! not encrypted: docs/SEMANTICS.md.)
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::ffi::CString;
use std::fs;
use std::path::Path;

use common::mount::{fuse_available, Mount};

fn c(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn set(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a value buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// getxattr with a buffer of `cap` bytes (0: the length query, returned as that many zeros).
fn get(p: &Path, name: &str, cap: usize) -> Result<Vec<u8>, i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; cap];
    // SAFETY: buf has `cap` bytes; a null pointer with size 0 asks for the length.
    let r = unsafe {
        let ptr = if cap == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, cap)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    if cap == 0 {
        return Ok(vec![0; r as usize]);
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn list(p: &Path) -> Vec<String> {
    let p = c(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf has 4096 bytes.
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "{}", std::io::Error::last_os_error());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect()
}

fn remove(p: &Path, name: &str) -> Result<(), i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    if unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

#[test]
fn set_get_list_remove() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let f = m.p("f");
    fs::write(&f, b"x").unwrap();
    set(&f, "user.colour", b"blue", 0).unwrap();
    set(&f, "user.empty", b"", 0).unwrap();
    assert_eq!(get(&f, "user.colour", 64).unwrap(), b"blue");
    assert_eq!(get(&f, "user.colour", 0).unwrap().len(), 4, "length query");
    assert_eq!(get(&f, "user.empty", 64).unwrap(), b"");
    let mut names = list(&f);
    names.sort();
    assert_eq!(names, ["user.colour", "user.empty"]);
    set(&f, "user.colour", b"green", 0).unwrap();
    assert_eq!(get(&f, "user.colour", 64).unwrap(), b"green");
    remove(&f, "user.colour").unwrap();
    assert_eq!(get(&f, "user.colour", 64), Err(libc::ENODATA));
    assert_eq!(remove(&f, "user.colour"), Err(libc::ENODATA));
    assert_eq!(list(&f), ["user.empty"]);
}

/// The daemon clears set-id bits itself (FUSE_HANDLE_KILLPRIV_V2), so the kernel no longer
/// removes a file capability before a write; the backing filesystem must, as Linux does.
#[test]
fn a_write_drops_a_file_capability() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let f = m.p("f");
    fs::write(&f, b"x").unwrap();
    // struct vfs_cap_data, revision 2, effective: cap_net_raw permitted.
    let caps = [0x0200_0001u32, 1 << 13, 0, 0, 0]
        .map(u32::to_le_bytes)
        .concat();
    set(&f, "security.capability", &caps, 0).unwrap();
    assert_eq!(get(&f, "security.capability", 64).unwrap(), caps);
    fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .and_then(|mut h| std::io::Write::write_all(&mut h, b"y"))
        .unwrap();
    assert_eq!(get(&f, "security.capability", 64), Err(libc::ENODATA));
    assert_eq!(fs::read(&f).unwrap(), b"xy");
}

#[test]
fn flags_and_buffer_sizes() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let f = m.p("f");
    fs::write(&f, b"x").unwrap();
    assert_eq!(
        set(&f, "user.a", b"1", libc::XATTR_REPLACE),
        Err(libc::ENODATA),
        "replace of a missing attribute"
    );
    set(&f, "user.a", b"1", libc::XATTR_CREATE).unwrap();
    assert_eq!(
        set(&f, "user.a", b"2", libc::XATTR_CREATE),
        Err(libc::EEXIST),
        "create of an existing attribute"
    );
    set(&f, "user.a", b"3", libc::XATTR_REPLACE).unwrap();
    let big = vec![7u8; 3000];
    set(&f, "user.big", &big, 0).unwrap();
    assert_eq!(get(&f, "user.big", 100), Err(libc::ERANGE));
    assert_eq!(get(&f, "user.big", 4096).unwrap(), big);
    assert_eq!(get(&f, "user.a", 64).unwrap(), b"3");
}

#[test]
fn attributes_follow_the_file_and_live_on_directories() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/f"), b"content").unwrap();
    set(&m.p("d"), "user.owner", b"team-a", 0).unwrap();
    set(&m.p("d/f"), "user.tag", b"v1", 0).unwrap();
    fs::rename(m.p("d"), m.p("e")).unwrap();
    m.remount();
    assert_eq!(get(&m.p("e"), "user.owner", 64).unwrap(), b"team-a");
    assert_eq!(get(&m.p("e/f"), "user.tag", 64).unwrap(), b"v1");
    assert_eq!(fs::read(m.p("e/f")).unwrap(), b"content");
}

#[test]
fn read_only_mount_reads_but_refuses_changes() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"x").unwrap();
    set(&m.p("f"), "user.k", b"v", 0).unwrap();
    m.set_extra(&["--read-only"]);
    m.remount();
    assert_eq!(get(&m.p("f"), "user.k", 64).unwrap(), b"v");
    assert_eq!(set(&m.p("f"), "user.k", b"w", 0), Err(libc::EROFS));
    assert_eq!(remove(&m.p("f"), "user.k"), Err(libc::EROFS));
}

/// `--no-xattrs`: every xattr call fails with EOPNOTSUPP and nothing reaches the store (the
/// kernel stops asking the daemon); the same mount without it serves them (the control).
#[test]
fn a_mount_without_xattrs_serves_and_stores_none() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"data").unwrap();
    set(&m.p("f"), "user.before", b"1", 0).unwrap();
    assert_eq!(get(&m.p("f"), "user.before", 16).unwrap(), b"1");
    let stored = xattr_names_on(&m.b("f"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    m.set_extra(&["--no-xattrs"]);
    m.remount();
    for _ in 0..2 {
        assert_eq!(set(&m.p("f"), "user.after", b"2", 0), Err(libc::EOPNOTSUPP));
        assert_eq!(get(&m.p("f"), "user.before", 16), Err(libc::EOPNOTSUPP));
        assert_eq!(remove(&m.p("f"), "user.before"), Err(libc::EOPNOTSUPP));
    }
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    // Nothing changed on the store: the attribute set before is still the only one.
    assert_eq!(xattr_names_on(&m.b("f")), stored);
}

/// The names of the extended attributes of the backing file at `host` (user namespace), but
/// kmsfs's own kind tag.
fn xattr_names_on(host: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(host, &mut buf[..]).unwrap();
    buf[..n]
        .split(|&b| b == 0)
        .filter(|s| s.starts_with(b"user.") && *s != KIND_TAG.as_bytes())
        .map(|s| s.to_vec())
        .collect()
}

const KIND_TAG: &str = "user.kmsfs.kind";

/// The backing attribute kmsfs tags each object's kind in is not the user's: with plaintext
/// names (where a user's attribute is stored under its own name) it cannot be read, set,
/// removed or listed through the mount; with encrypted names a user's attribute of that name
/// is stored under another. Either way the tag on the store stays as kmsfs wrote it.
#[test]
fn the_kind_tag_is_not_a_users_attribute() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let f = m.p("f");
    fs::write(&f, b"x").unwrap();
    let tag = rustix::fs::lgetxattr_query(m.b("f"), KIND_TAG).map(|n| {
        let mut v = vec![0u8; n];
        rustix::fs::lgetxattr(m.b("f"), KIND_TAG, &mut v[..]).unwrap();
        v
    });
    let tag = tag.expect("a new file carries its kind tag on the store");
    assert_eq!(tag.len(), 17);
    if common::plaintext_names() {
        assert_eq!(get(&f, KIND_TAG, 64), Err(libc::ENODATA));
        assert_eq!(set(&f, KIND_TAG, b"forged", 0), Err(libc::EPERM));
        assert_eq!(remove(&f, KIND_TAG), Err(libc::EPERM));
        assert!(list(&f).is_empty(), "{:?}", list(&f));
        // Positive control: another attribute is the user's, and listed.
        set(&f, "user.kmsfs.other", b"1", 0).unwrap();
        assert_eq!(list(&f), ["user.kmsfs.other"]);
    } else {
        set(&f, KIND_TAG, b"the user's", 0).unwrap();
        assert_eq!(get(&f, KIND_TAG, 64).unwrap(), b"the user's");
        assert_eq!(list(&f), [KIND_TAG]);
        remove(&f, KIND_TAG).unwrap();
    }
    let mut after = [0u8; 64];
    let n = rustix::fs::lgetxattr(m.b("f"), KIND_TAG, &mut after[..]).unwrap();
    assert_eq!(&after[..n], &tag[..], "the tag on the store changed");
}
