//! Rename through a real mount (hard links: mount_links.rs). The data key follows the name:
//! after a rename the header on the backing store names only the new path (in both slots), a
//! directory rename rebinds every file beneath it; everything still reads after a remount.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;

use common::mount::{fuse_available, Mount};
use common::{held_up, pattern, within_200ms};

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

/// Two mounts of one store see each other's names, long ones included, and each other's
/// renames of files and directories (after the kernel's one-second attribute cache).
#[test]
fn two_mounts_of_one_store_see_each_others_names() {
    if !fuse_available() {
        return;
    }
    let m1 = Mount::new(4096, &[]);
    let m2 = m1.another();
    let long = "n".repeat(220);
    fs::create_dir(m1.p("dir")).unwrap();
    fs::write(m1.p(&format!("dir/{long}")), b"from one").unwrap();
    fs::write(m1.p("dir/short"), b"short").unwrap();
    let listed = |m: &Mount, d: &str| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(m.p(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(listed(&m2, "dir"), vec![long.clone(), "short".to_string()]);
    assert_eq!(fs::read(m2.p(&format!("dir/{long}"))).unwrap(), b"from one");
    fs::rename(m2.p("dir"), m2.p("moved")).unwrap();
    fs::rename(m2.p("moved/short"), m2.p(&format!("moved/{long}2"))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(listed(&m1, "moved"), vec![long.clone(), format!("{long}2")]);
    assert_eq!(fs::read(m1.p(&format!("moved/{long}2"))).unwrap(), b"short");
    assert!(!m1.p("dir").exists());
}

/// Found by the shared-storage model test: a directory rename binds each name of a file in
/// turn (in parallel), and binding the second name must not drop the first's new envelope,
/// which names nothing yet.
#[test]
fn a_directory_holding_two_names_of_one_file_renames_and_back() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("e")).unwrap();
    fs::write(m.p("e/z"), pattern(3000, 9)).unwrap();
    fs::hard_link(m.p("e/z"), m.p("e/w")).unwrap();
    for (from, to) in [("e", "d"), ("d", "e"), ("e", "d")] {
        fs::rename(m.p(from), m.p(to)).unwrap();
        for name in ["z", "w"] {
            assert_eq!(
                fs::read(m.p(&format!("{to}/{name}"))).unwrap(),
                pattern(3000, 9)
            );
        }
    }
    m.remount();
    assert_eq!(fs::read(m.p("d/w")).unwrap(), pattern(3000, 9));
}

/// A key service stuck for 10 s on a rename's `ReEncrypt` (for the new name) holds up the
/// rename only: the open file being renamed reads meanwhile, within 200 ms (a write waits: the
/// kernel itself locks the file's inode across a rename), and the handle writes after.
#[test]
fn a_renames_stuck_key_call_leaves_the_open_file_readable() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &["--cache-timeout", "0"]);
    fs::write(m.p("f"), pattern(5000, 3)).unwrap();
    let to = m.stored("g");
    m.set_env("KMSFS_INJECT_KMS_HANG", &format!("10000:{to}"));
    m.remount();
    let held = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    let (from, dest) = (m.p("f"), m.p("g"));
    // The rename waits for its key call.
    let renaming = held_up(move || fs::rename(&from, &dest));
    within_200ms("a read", "the rename's key call was stuck", || {
        let mut buf = vec![0u8; 5000];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(5000, 3));
    });
    renaming.finish().unwrap();
    // (Not opened again by its new name: that Decrypt would be held up too.)
    assert_eq!(fs::metadata(m.p("g")).unwrap().len(), 5000);
    held.write_all_at(b"meanwhile", 0).unwrap();
    held.sync_all().unwrap();
    let mut head = [0u8; 9];
    held.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"meanwhile");
}

/// A key service stuck for 10 s on one `ReEncrypt` of a directory rename's sweep holds up
/// that rename only: meanwhile, within 200 ms each, `ls -l` of another directory, `stat` and
/// reads of an open file elsewhere, `close` of another handle, and creates, renames and
/// removals elsewhere in the volume (the sweep's key calls are made before the volume's
/// namespace lock is taken).
#[test]
fn a_directory_renames_stuck_key_call_holds_up_nothing_else() {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &["--cache-timeout", "0"]);
    fs::create_dir_all(m.p("d/sub")).unwrap();
    fs::create_dir(m.p("x")).unwrap();
    for i in 0..5 {
        fs::write(m.p(&format!("d/sub/f{i}")), pattern(3000, i)).unwrap();
    }
    fs::write(m.p("d/stuck"), b"stuck").unwrap();
    fs::write(m.p("x/open"), pattern(5000, 9)).unwrap();
    fs::write(m.p("x/other"), b"other").unwrap();
    // The stored name of `stuck` is the same in `d` and, after the rename, in `e` (the
    // directory keeps its id): the sweep's ReEncrypt for it names it in both contexts.
    let stuck = m.stored("d/stuck");
    let stuck = stuck.rsplit('/').next().unwrap().to_string();
    m.set_env("KMSFS_INJECT_KMS_HANG", &format!("10000:{stuck}"));
    m.remount();
    let held = fs::File::open(m.p("x/open")).unwrap();
    let to_close = fs::File::open(m.p("x/other")).unwrap();
    let (from, dest) = (m.p("d"), m.p("e"));
    // The rename waits for its key call.
    let renaming = held_up(move || fs::rename(&from, &dest));
    let meanwhile = "a directory rename's key call was stuck";
    within_200ms("ls -l of another directory", meanwhile, || {
        let out = std::process::Command::new("ls")
            .arg("-l")
            .arg(m.p("x"))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("open"));
    });
    within_200ms("stat of an open file", meanwhile, || {
        assert_eq!(fs::metadata(m.p("x/open")).unwrap().len(), 5000);
    });
    within_200ms("a read of an open file", meanwhile, || {
        let mut buf = vec![0u8; 5000];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(5000, 9));
    });
    within_200ms("close of another handle", meanwhile, || {
        let mut f = to_close.try_clone().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        drop(f);
    });
    drop(to_close);
    within_200ms("a create elsewhere", meanwhile, || {
        fs::write(m.p("x/new"), b"new").unwrap();
    });
    within_200ms("a mkdir elsewhere", meanwhile, || {
        fs::create_dir(m.p("x/dir")).unwrap()
    });
    within_200ms("a rename elsewhere", meanwhile, || {
        fs::rename(m.p("x/new"), m.p("x/renamed")).unwrap();
    });
    within_200ms("an unlink elsewhere", meanwhile, || {
        fs::remove_file(m.p("x/renamed")).unwrap();
    });
    // It did it, once its call came.
    renaming.finish().unwrap();
    assert!(!m.p("d").exists());
    for i in 0..5 {
        assert_eq!(
            fs::read(m.p(&format!("e/sub/f{i}"))).unwrap(),
            pattern(3000, i)
        );
    }
    assert_eq!(fs::read(m.p("e/stuck")).unwrap(), b"stuck");
}

/// A rename to a path far longer than the file's first (its header must grow: every block
/// moves) while a handle has the file open for writing, and another reads it: the handles go
/// on where the blocks are now, and nothing written before or after is lost.
#[test]
fn open_handles_keep_working_across_a_rename_that_grows_the_header() {
    if !fuse_available() {
        return;
    }
    use std::io::{Read, Seek, Write};
    let mut m = Mount::new(4096, &[]);
    let first = pattern(300_000, 7);
    let mut writer = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    writer.write_all(&first).unwrap();
    writer.sync_all().unwrap();
    let mut reader = fs::File::open(m.p("f")).unwrap();
    // Eight directories of 150-byte names: far beyond the room a header made for "f" keeps.
    let long = "d".repeat(150);
    let mut deep = String::new();
    for _ in 0..8 {
        deep.push_str(&long);
        fs::create_dir(m.p(&deep)).unwrap();
        deep.push('/');
    }
    let before = fs::metadata(m.b("f")).unwrap().len();
    let moved = format!("{deep}f");
    fs::rename(m.p("f"), m.p(&moved)).unwrap();
    let after = fs::metadata(m.b(&moved)).unwrap().len();
    assert!(after > before, "the header grew: {before} -> {after} bytes");
    let more = pattern(50_000, 8);
    writer.write_all(&more).unwrap();
    writer.sync_all().unwrap();
    let mut got = Vec::new();
    reader.seek(std::io::SeekFrom::Start(0)).unwrap();
    reader.read_to_end(&mut got).unwrap();
    let mut want = first.clone();
    want.extend_from_slice(&more);
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "read through the handle opened before the rename"
    );
    drop((writer, reader));
    m.remount();
    assert!(fs::read(m.p(&moved)).unwrap() == want, "after a remount");
}
