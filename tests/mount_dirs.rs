//! Directories and non-file entries through a real mount: mkdir/rmdir, readdir with many
//! entries (offsets), symlinks, fifos, permissions and times, statfs; kmsfs's own names are
//! hidden.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use common::mount::{fuse_available, Mount};

#[test]
fn directories_and_listing() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    let mut want = BTreeSet::new();
    for i in 0..600 {
        let name = format!("file-{i:04}-{}", "x".repeat(i % 40));
        fs::write(m.p("a").join(&name), i.to_string()).unwrap();
        want.insert(name);
    }
    want.insert("b".to_string());
    let got: BTreeSet<String> = fs::read_dir(m.p("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        got, want,
        "readdir over several batches returns each entry once"
    );
    assert!(fs::remove_dir(m.p("a/b")).is_err(), "not empty");
    fs::remove_dir(m.p("a/b/c")).unwrap();
    fs::remove_dir(m.p("a/b")).unwrap();
    assert!(!m.p("a/b").exists());
    let root: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(root, vec!["a"], "the .kmsfs directory is hidden");
    if common::plaintext_names() {
        assert!(
            fs::write(m.p(".kmsfs-tmp-x"), b"x").is_err(),
            "temporary names are refused"
        );
        assert!(
            fs::create_dir(m.p(".kmsfs")).is_err(),
            "the root's .kmsfs is refused"
        );
        assert!(fs::metadata(m.p(".kmsfs")).is_err());
    } else {
        // Encrypted, kmsfs's own names are ordinary names: none is stored as itself.
        fs::write(m.p(".kmsfs-tmp-x"), b"x").unwrap();
        fs::create_dir(m.p(".kmsfs")).unwrap();
        fs::write(m.p(".kmsfs/config"), b"mine").unwrap();
        fs::write(m.p(".kmsfs-dir"), b"mine too").unwrap();
        assert_eq!(fs::read(m.p(".kmsfs/config")).unwrap(), b"mine");
        assert_eq!(fs::read(m.p(".kmsfs-dir")).unwrap(), b"mine too");
        assert!(
            fs::metadata(m.b(".kmsfs/config")).unwrap().len() > 100,
            "the real config"
        );
        for n in [".kmsfs-tmp-x", ".kmsfs", ".kmsfs-dir"] {
            fs::remove_dir_all(m.p(n))
                .or_else(|_| fs::remove_file(m.p(n)))
                .unwrap();
        }
    }
    // Below the root, .kmsfs is an ordinary name (a volume's backing store can live in a volume).
    fs::create_dir(m.p("a/.kmsfs")).unwrap();
    fs::write(m.p("a/.kmsfs/config"), b"nested").unwrap();
    assert_eq!(fs::read(m.p("a/.kmsfs/config")).unwrap(), b"nested");
}

#[test]
fn symlinks_fifos_and_metadata() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("target"), b"pointed at").unwrap();
    std::os::unix::fs::symlink("target", m.p("link")).unwrap();
    assert_eq!(fs::read_link(m.p("link")).unwrap().to_str(), Some("target"));
    assert_eq!(fs::read(m.p("link")).unwrap(), b"pointed at");
    assert!(fs::symlink_metadata(m.p("link"))
        .unwrap()
        .file_type()
        .is_symlink());

    let fifo = std::ffi::CString::new(m.p("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(fs::metadata(m.p("fifo")).unwrap().file_type().is_fifo());

    fs::set_permissions(m.p("target"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.p("target")).unwrap().mode() & 0o777, 0o600);
    let f = fs::File::options().write(true).open(m.p("target")).unwrap();
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    assert_eq!(fs::metadata(m.p("target")).unwrap().mtime(), 1_000_000_000);
    let c = std::ffi::CString::new(m.p("target").to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 1234, 5678) }, 0);
    let meta = fs::metadata(m.p("target")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.len(), 10, "plaintext size");

    let mnt = std::ffi::CString::new(m.mnt.to_str().unwrap()).unwrap();
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(mnt.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_namemax >= 255);
}

#[test]
fn device_nodes_and_sockets_are_stored_as_themselves() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let dev = std::ffi::CString::new(m.p("null-like").to_str().unwrap()).unwrap();
    // SAFETY: a valid path; mknod of a character device (1, 3) as root.
    let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let meta = fs::symlink_metadata(m.p("null-like")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), libc::makedev(1, 3));
    // The mount is nodev: the node never opens the device.
    assert!(fs::File::open(m.p("null-like")).is_err());
    let sock = std::os::unix::net::UnixListener::bind(m.p("sock")).unwrap();
    assert!(fs::symlink_metadata(m.p("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    drop(sock);
}

#[test]
fn an_open_file_outlives_its_last_name() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    use std::io::{Read, Seek, Write};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("tmp"))
        .unwrap();
    f.write_all(b"still here").unwrap();
    fs::remove_file(m.p("tmp")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10, "fstat after unlink");
    f.write_all(b"!").unwrap();
    f.rewind().unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here!");
    assert!(!m.p("tmp").exists());
}

#[test]
fn paths_longer_than_path_max_on_the_backing_store_work() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    // 17 directories of 250 bytes: past PATH_MAX on the backing store. Programs get there by
    // relative steps; here each step goes through the previous directory's descriptor.
    let name = "d".repeat(250);
    let mut dir = fs::File::open(&m.mnt).unwrap();
    let mut rel = std::path::PathBuf::new();
    for _ in 0..17 {
        let at = |n: &str| format!("/proc/self/fd/{}/{n}", dir.as_raw_fd());
        fs::create_dir(at(&name)).unwrap();
        dir = fs::File::open(at(&name)).unwrap();
        rel.push(&name);
    }
    assert!(m.backing.join(&rel).as_os_str().len() > libc::PATH_MAX as usize);
    let at = |n: &str| format!("/proc/self/fd/{}/{n}", dir.as_raw_fd());
    fs::write(at("file"), b"deep content").unwrap();
    assert_eq!(fs::read(at("file")).unwrap(), b"deep content");
    fs::rename(at("file"), at("renamed")).unwrap();
    std::os::unix::fs::symlink("renamed", at("link")).unwrap();
    let mut listed: Vec<_> = fs::read_dir(at(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ["link", "renamed"]);
    drop(dir);
    m.remount();
    let mut dir = fs::File::open(&m.mnt).unwrap();
    for _ in 0..17 {
        dir = fs::File::open(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd())).unwrap();
    }
    let at = |n: &str| format!("/proc/self/fd/{}/{n}", dir.as_raw_fd());
    assert_eq!(fs::read(at("link")).unwrap(), b"deep content");
    fs::remove_file(at("link")).unwrap();
    fs::remove_file(at("renamed")).unwrap();
}

/// Every backing entry's name, content and extended attribute names beneath `dir`.
fn store_bytes(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name().into_encoded_bytes();
        out.push((format!("name of {}", p.display()), name));
        let mut attrs = vec![0u8; 64 * 1024];
        let n = rustix::fs::llistxattr(&p, &mut attrs[..]).unwrap_or(0);
        attrs.truncate(n);
        for name in attrs.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let mut value = vec![0u8; 70 * 1024];
            let name_c = std::ffi::CString::new(name).unwrap();
            if let Ok(n) = rustix::fs::lgetxattr(&p, name_c.as_c_str(), &mut value[..]) {
                value.truncate(n);
                out.push((format!("xattr value of {}", p.display()), value));
            }
        }
        out.push((format!("xattr names of {}", p.display()), attrs));
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            store_bytes(&p, out);
        } else if ft.is_file() {
            out.push((format!("content of {}", p.display()), fs::read(&p).unwrap()));
        } else if ft.is_symlink() {
            let t = fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes();
            out.push((format!("target of {}", p.display()), t));
        }
    }
}

/// With encrypted names, no plaintext name a user gave (of a file, a directory, a long name, a
/// symlink's target, a hard link, a rename's new name, a fifo, a file since deleted) appears
/// anywhere on the store: not as a backing name, not in a header, a record, a side record or
/// an xattr name. Positive control: with plaintext names the same walk finds every one.
#[test]
fn no_plaintext_name_reaches_the_store() {
    if !fuse_available() {
        return;
    }
    let long = format!("long-{}", "q".repeat(200));
    let names: Vec<String> = [
        "patient-4711-hiv.pdf",
        "acme-corp",
        "payroll-2026-12.xlsx",
        "tenant-omega",
        "sub-delta",
        "link-to-the-diagnosis",
        "hardlink-alias",
        "renamed-report.txt",
        "renamed-tenant",
        "deleted-draft.doc",
        "fifo-named-pipe",
        "user.diagnosis-code",
        "value-of-the-diagnosis",
        long.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut m = Mount::new(4096, &[]);
    let data = common::pattern(9000, 7);
    fs::write(m.p("patient-4711-hiv.pdf"), &data).unwrap();
    fs::create_dir(m.p("acme-corp")).unwrap();
    fs::write(m.p("acme-corp/payroll-2026-12.xlsx"), &data).unwrap();
    fs::create_dir_all(m.p("tenant-omega/sub-delta")).unwrap();
    fs::write(m.p(&format!("tenant-omega/sub-delta/{long}")), &data).unwrap();
    std::os::unix::fs::symlink(
        "../patient-4711-hiv.pdf",
        m.p("acme-corp/link-to-the-diagnosis"),
    )
    .unwrap();
    fs::hard_link(m.p("patient-4711-hiv.pdf"), m.p("acme-corp/hardlink-alias")).unwrap();
    fs::write(m.p("acme-corp/report.txt"), &data).unwrap();
    fs::rename(
        m.p("acme-corp/report.txt"),
        m.p("acme-corp/renamed-report.txt"),
    )
    .unwrap();
    fs::rename(m.p("tenant-omega"), m.p("renamed-tenant")).unwrap();
    fs::write(m.p("deleted-draft.doc"), &data).unwrap();
    fs::remove_file(m.p("deleted-draft.doc")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.p("acme-corp/fifo-named-pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    for p in ["patient-4711-hiv.pdf", "acme-corp"] {
        rustix::fs::setxattr(
            m.p(p),
            c"user.diagnosis-code",
            b"value-of-the-diagnosis",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let mut value = [0u8; 64];
    let n = rustix::fs::getxattr(m.p("acme-corp"), c"user.diagnosis-code", &mut value[..]).unwrap();
    assert_eq!(&value[..n], b"value-of-the-diagnosis");
    // Everything reads back under its plaintext name, the long one too.
    let listed: BTreeSet<String> = fs::read_dir(m.p("renamed-tenant/sub-delta"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, BTreeSet::from([long.clone()]));
    assert_eq!(
        fs::read(m.p(&format!("renamed-tenant/sub-delta/{long}"))).unwrap(),
        data
    );
    assert_eq!(
        fs::read(m.p("acme-corp/link-to-the-diagnosis")).unwrap(),
        data
    );
    m.stop();
    let mut found = Vec::new();
    store_bytes(&m.backing, &mut found);
    let hits: Vec<String> = names
        .iter()
        .flat_map(|n| {
            found
                .iter()
                .filter(|(_, bytes)| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
                .map(move |(what, _)| format!("{:.40}… in {what}", n))
        })
        .collect();
    if common::plaintext_names() {
        // The positive control: the walk sees names where they are (not those gone: deleted,
        // or renamed away).
        for n in names
            .iter()
            .filter(|n| *n != "deleted-draft.doc" && *n != "tenant-omega")
        {
            assert!(
                hits.iter().any(|h| h.starts_with(&format!("{:.40}…", n))),
                "{n} not found on a store with plaintext names: the walk misses something"
            );
        }
    } else {
        assert!(
            hits.is_empty(),
            "plaintext names on the store:\n{}",
            hits.join("\n")
        );
        // The long name has its side record.
        assert!(found
            .iter()
            .any(|(what, b)| what.starts_with("name of") && b.ends_with(b".name")));
    }
}

/// Names up to 255 bytes (stored under a hashed name with a side record when encrypted) work
/// for files, directories, renames in both directions, hard links and removal, which leaves
/// no side record behind; and so does a path as long as the mount allows (about 4000 bytes,
/// whose stored form is four times that).
#[test]
fn long_names_and_deep_paths() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let long = |c: char| c.to_string().repeat(255);
    let (a, b, d) = (long('a'), long('b'), long('d'));
    fs::write(m.p(&a), b"long").unwrap();
    assert_eq!(fs::read(m.p(&a)).unwrap(), b"long");
    assert!(
        fs::write(m.p(&"x".repeat(256)), b"x").is_err(),
        "256 bytes is too long"
    );
    fs::rename(m.p(&a), m.p("short")).unwrap();
    fs::rename(m.p("short"), m.p(&b)).unwrap();
    fs::hard_link(m.p(&b), m.p(&a)).unwrap();
    fs::create_dir(m.p(&d)).unwrap();
    fs::write(m.p(&format!("{d}/{a}")), b"inside").unwrap();
    fs::rename(m.p(&b), m.p(&format!("{d}/{b}"))).unwrap();
    let listed: BTreeSet<String> = fs::read_dir(m.p(&d))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, BTreeSet::from([a.clone(), b.clone()]));
    assert_eq!(fs::read(m.p(&format!("{d}/{b}"))).unwrap(), b"long");
    assert_eq!(fs::read(m.p(&a)).unwrap(), b"long", "the hard link");
    let side_records = || {
        let mut n = 0;
        let mut stack = vec![m.backing.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().ends_with(".name") {
                    n += 1;
                }
            }
        }
        n
    };
    if !common::plaintext_names() {
        assert_eq!(
            side_records(),
            4,
            "one per long name on the store: /a /d /d/a /d/b"
        );
    }
    fs::remove_file(m.p(&a)).unwrap();
    fs::remove_dir_all(m.p(&d)).unwrap();
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    assert_eq!(side_records(), 0, "no side record outlives its entry");
    if !common::plaintext_names() {
        // A crash between removing an entry and its side record leaves the side record: the
        // directory still lists empty, and still goes.
        fs::create_dir(m.p("e")).unwrap();
        fs::write(m.p(&format!("e/{a}")), b"x").unwrap();
        fs::remove_file(m.b(&format!("e/{a}"))).unwrap();
        assert_eq!(side_records(), 1);
        assert_eq!(fs::read_dir(m.p("e")).unwrap().count(), 0);
        fs::remove_dir(m.p("e")).unwrap();
        assert_eq!(side_records(), 0);
    }

    // A path of about 4000 bytes, as deep as the mount allows.
    let mut path = String::new();
    while m.p(&path).as_os_str().len() + 11 + 20 < 4095 {
        path.push_str(if path.is_empty() {
            "d123456789"
        } else {
            "/d123456789"
        });
        fs::create_dir(m.p(&path)).unwrap();
    }
    let file = format!("{path}/f");
    fs::write(m.p(&file), b"deep").unwrap();
    assert_eq!(fs::read(m.p(&file)).unwrap(), b"deep");
    assert!(m.p(&file).as_os_str().len() > 4000);
    fs::rename(m.p("d123456789"), m.p("e123456789")).unwrap();
    let moved = format!("e{}", &file[1..]);
    assert_eq!(fs::read(m.p(&moved)).unwrap(), b"deep");
    fs::remove_dir_all(m.p("e123456789")).unwrap();
}
