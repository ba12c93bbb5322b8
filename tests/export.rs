//! `kmsfs export`: a volume decrypted to a directory and to a tar stream equals what the mount
//! shows (contents, modes, times, symlinks, hard links, fifos); a subtree exports alone; a
//! tampered file is listed and skipped (directory) or ends the stream (tar); a non-empty
//! destination is refused.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use common::ObjectKind;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::mount::{fuse_available, kmsfs, Mount};
use common::{assert_success, pattern};

/// `kmsfs export BACKING DEST ARGS...`.
fn export(backing: &Path, dest: &str, args: &[&str]) -> std::process::Command {
    let mut c = kmsfs();
    c.arg("export").arg(backing).arg(dest).args(args);
    c
}

/// Everything `export` promises to keep, per relative path.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                format!("dir mode={:o} mtime={}", m.mode() & 0o7777, m.mtime())
            } else if ft.is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_fifo() {
                format!("fifo mode={:o}", m.mode() & 0o7777)
            } else {
                let link = match inodes.get(&m.ino()) {
                    Some(first) => format!(" linked to {first}"),
                    None => {
                        if m.nlink() > 1 {
                            inodes.insert(m.ino(), rel.clone());
                        }
                        String::new()
                    }
                };
                let data = fs::read(&p).unwrap();
                format!(
                    "file mode={:o} mtime={} len={} sum={}{link}",
                    m.mode() & 0o7777,
                    m.mtime(),
                    data.len(),
                    data.iter().map(|&b| b as u64).sum::<u64>()
                )
            };
            out.insert(rel, what);
        }
    }
    out
}

fn populate(m: &Mount) {
    fs::create_dir_all(m.p("docs/empty")).unwrap();
    fs::write(m.p("docs/a.txt"), b"alpha").unwrap();
    fs::write(m.p("docs/big.bin"), pattern(300_000, 3)).unwrap();
    fs::set_permissions(m.p("docs/a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::hard_link(m.p("docs/a.txt"), m.p("docs/a-again.txt")).unwrap();
    std::os::unix::fs::symlink("a.txt", m.p("docs/link")).unwrap();
    let fifo = std::ffi::CString::new(m.p("docs/pipe").to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fs::write(m.p("top.txt"), b"top").unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    for p in ["docs/a.txt", "top.txt", "docs/empty", "docs"] {
        fs::File::open(m.p(p)).unwrap().set_modified(old).unwrap();
    }
}

#[test]
fn export_to_a_directory_and_to_tar_equals_the_mount() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    populate(&m);
    let want = tree(&m.mnt);
    m.stop();
    let out = m.dir.path().join("out");
    let run = export(&m.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_success(&run);
    let report = String::from_utf8(run.stdout).unwrap();
    assert!(
        report.starts_with("exported 3 files (300008 bytes), 3 directories, 1 hard links, 1 symlinks, 1 special files"),
        "{report}"
    );
    assert_eq!(tree(&out), want);

    let tarball = m.dir.path().join("out.tar");
    let run = export(&m.backing, "-", &[])
        .stdout(fs::File::create(&tarball).unwrap())
        .output()
        .unwrap();
    assert_success(&run);
    let untar = m.dir.path().join("untar");
    fs::create_dir(&untar).unwrap();
    let st = Command::new("tar")
        .arg("-xpf")
        .arg(&tarball)
        .arg("-C")
        .arg(&untar)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(tree(&untar), want);

    // A subtree alone; a destination that is not empty is refused.
    let sub = m.dir.path().join("sub");
    let run = export(&m.backing, sub.to_str().unwrap(), &["--subtree", "docs"])
        .output()
        .unwrap();
    assert_success(&run);
    let sub_tree = tree(&sub.join("docs"));
    assert_eq!(sub_tree.len(), 6);
    assert_eq!(sub_tree.get("big.bin"), want.get("docs/big.bin"));
    assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
    let again = export(&m.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}

#[test]
fn a_tampered_file_is_listed_in_a_directory_export_and_ends_a_tar_stream() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("good"), b"fine").unwrap();
    fs::write(m.p("bad"), pattern(10_000, 1)).unwrap();
    m.stop();
    let mut raw = fs::read(m.b("bad")).unwrap();
    let n = raw.len();
    raw[n - 100] ^= 1;
    fs::write(m.b("bad"), &raw).unwrap();
    let out = m.dir.path().join("out");
    let run = export(&m.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.starts_with("not exported: /bad: authentication failed at block 2\n"),
        "{err}"
    );
    assert_eq!(fs::read(out.join("good")).unwrap(), b"fine");
    assert!(!out.join("bad").exists(), "no partial file left");
    let run = export(&m.backing, "-", &[])
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_ne!(run.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&run.stderr).contains("/bad"));
}

// The store is hostile: everything on it but file contents (types, modes, owners, device
// numbers, symlinks, hard links) is the attacker's. Each test below plants one thing on a
// volume's backing store, checks what export makes of it in a directory and in a tar stream,
// checks that nothing outside DEST changed, and has a positive control beside it.

/// Whether the tests run as root (mknod, chown to another user).
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let r = unsafe { libc::geteuid() } == 0;
    if !r {
        eprintln!("not root; skipping");
    }
    r
}

/// Every entry beneath `root` but those under `skip`, with what a write through a symlink, a
/// chmod or a chown would change (type, mode, owner, length, contents, mtime, ctime, target).
fn snapshot(root: &Path, skip: &[&Path]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let what = if m.is_dir() {
                stack.push(p.clone());
                String::from("dir")
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                format!("{:?}", fs::read(&p).unwrap())
            } else {
                format!("rdev {}", m.rdev())
            };
            out.insert(
                p.display().to_string(),
                format!(
                    "{what} mode={:o} owner={}:{} len={} mtime={}.{} ctime={}.{}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                ),
            );
        }
    }
    out
}

/// Member path, header and contents of each entry of a tar stream.
fn members(bytes: &[u8]) -> BTreeMap<String, (tar::Header, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        out.insert(name, (e.header().clone(), data));
    }
    out
}

/// `kmsfs export BACKING - ARGS`: its tar stream and stderr, failing the test unless it
/// succeeds.
fn tar_export(backing: &Path, args: &[&str]) -> (Vec<u8>, String) {
    let run = export(backing, "-", args).output().unwrap();
    assert_success(&run);
    (run.stdout, String::from_utf8(run.stderr).unwrap())
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn device_nodes_on_the_store_are_skipped_unless_devices_is_given() {
    if !root() {
        return;
    }
    // Device nodes as a mount makes them (objects whose authenticated header says so): a
    // local user of a root mount may make one in a directory of theirs.
    let v = common::TestVolume::new(4096);
    v.write("plain.txt", b"plain");
    v.object(
        "null",
        ObjectKind::CharDevice,
        0o666,
        libc::makedev(1, 3),
        &[],
    );
    // A second one whose name would start a line of its own if printed as it is.
    v.object(
        "z\nnot exported: forged",
        ObjectKind::BlockDevice,
        0o600,
        libc::makedev(7, 0),
        &[],
    );
    let top = v.dir.path();
    let out = top.join("out");
    let before = snapshot(top, &[&out]);

    // Default: skipped, one line on stderr naming it; the ordinary file still arrives.
    let run = export(&v.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_success(&run);
    let err = String::from_utf8(run.stderr).unwrap();
    assert_eq!(
        err,
        "skipped: /null: a character device 1:3 (not recreated without --devices)\n\
         skipped: /z\\nnot exported: forged: a block device 7:0 (not recreated without --devices)\n"
    );
    assert!(String::from_utf8(run.stdout)
        .unwrap()
        .contains("0 special files in"));
    assert_eq!(fs::read(out.join("plain.txt")).unwrap(), b"plain");
    assert!(fs::symlink_metadata(out.join("null")).is_err());
    let (stream, err) = tar_export(&v.backing, &[]);
    assert!(
        err.starts_with("skipped: /null: a character device 1:3"),
        "{err}"
    );
    let m = members(&stream);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["plain.txt"]);
    assert_eq!(snapshot(top, &[&out]), before);

    // Positive control: with --devices it is recreated, in the directory and in the stream.
    let dev_out = top.join("dev-out");
    let run = export(&v.backing, dev_out.to_str().unwrap(), &["--devices"])
        .output()
        .unwrap();
    assert_success(&run);
    assert!(
        run.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let m = fs::symlink_metadata(dev_out.join("null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    assert_eq!(m.mode() & 0o7777, 0o666);
    let (stream, _) = tar_export(&v.backing, &["--devices"]);
    let m = members(&stream);
    let (h, _) = &m["null"];
    assert_eq!(h.entry_type(), tar::EntryType::Char);
    assert_eq!(
        (h.device_major().unwrap(), h.device_minor().unwrap()),
        (Some(1), Some(3))
    );
    assert_eq!(snapshot(top, &[&out, &dev_out]), before);
}

#[test]
fn set_id_bits_on_the_store_are_never_exported() {
    // Set-id bits a user of a mount set on their own files (authenticated), and more that the
    // store's writer set on the backing entries (ignored: the positive control for that is
    // the plain 0640 coming out as 0640).
    let v = common::TestVolume::new(4096);
    v.mkdir_as("shared", 0o3775, None);
    v.write_as("shared/tool", b"#!/bin/sh\n", 0o6755, None);
    v.write_as("shared/notes", b"notes", 0o640, None);
    for p in ["shared/notes", "shared/tool"] {
        fs::set_permissions(v.backing_file(p), fs::Permissions::from_mode(0o6777)).unwrap();
    }
    let top = v.dir.path();
    let out = top.join("out");
    let before = snapshot(top, &[&out]);
    let run = export(&v.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_success(&run);
    // set-user-id and set-group-id gone; the rest of the mode kept (the sticky bit too), the
    // ordinary 0640 exactly (the positive control).
    assert_eq!(mode(&out.join("shared/tool")), 0o755);
    assert_eq!(mode(&out.join("shared/notes")), 0o640);
    assert_eq!(mode(&out.join("shared")), 0o1775);
    let (stream, _) = tar_export(&v.backing, &[]);
    let m = members(&stream);
    assert_eq!(m["shared/tool"].0.mode().unwrap(), 0o755);
    assert_eq!(m["shared/notes"].0.mode().unwrap(), 0o640);
    assert_eq!(m["shared"].0.mode().unwrap(), 0o1775);
    assert_eq!(m["shared/tool"].1, b"#!/bin/sh\n");
    assert_eq!(snapshot(top, &[&out]), before);
}

#[test]
fn owners_on_the_store_are_taken_only_with_same_owner() {
    if !root() {
        return;
    }
    // Owned by uid 65534 as far as the volume says (a user of the mount made them); the
    // backing entries say 12345, which nothing may take.
    let v = common::TestVolume::new(4096);
    v.mkdir_as("d", 0o755, Some((65534, 65534)));
    v.write_as("d/f", b"data", 0o644, Some((65534, 65534)));
    v.object("d/l", ObjectKind::Symlink, 0o777, 0, b"f");
    v.chown("d/l", 65534, 65534);
    for p in ["d", "d/f", "d/l"] {
        std::os::unix::fs::lchown(v.backing_file(p), Some(12345), Some(12345)).unwrap();
    }
    // SAFETY: no preconditions.
    let me = unsafe { (libc::geteuid(), libc::getegid()) };
    let owner = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let top = v.dir.path();
    let (out, same) = (top.join("out"), top.join("same"));
    let untarred = top.join("untarred");
    let untarred_same = top.join("untarred-same");
    let before = snapshot(top, &[&out, &same, &untarred, &untarred_same]);

    // Default: everything belongs to the exporter, in the directory and in the stream (whose
    // headers carry no user or group names that an extracting tar would look up instead).
    assert_success(
        &export(&v.backing, out.to_str().unwrap(), &[])
            .output()
            .unwrap(),
    );
    for p in ["d", "d/f", "d/l"] {
        assert_eq!(owner(&out.join(p)), me, "{p}");
    }
    let (stream, _) = tar_export(&v.backing, &[]);
    for (name, (h, _)) in members(&stream) {
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap()),
            (me.0 as u64, me.1 as u64),
            "{name}"
        );
        assert_eq!(h.username_bytes(), Some(&b""[..]), "{name}");
        assert_eq!(h.groupname_bytes(), Some(&b""[..]), "{name}");
    }
    // What tar extracting as root (which restores owners) makes of it.
    let untar = |stream: &[u8], into: &Path| {
        let tarball = top.join("stream.tar");
        fs::write(&tarball, stream).unwrap();
        fs::create_dir(into).unwrap();
        let st = Command::new("tar")
            .arg("-xpf")
            .arg(&tarball)
            .arg("-C")
            .arg(into)
            .status()
            .unwrap();
        assert!(st.success());
        fs::remove_file(&tarball).unwrap();
    };
    untar(&stream, &untarred);
    for p in ["d", "d/f", "d/l"] {
        assert_eq!(owner(&untarred.join(p)), me, "{p}");
    }

    // With --same-owner: the stored owners (the symlink's own too).
    assert_success(
        &export(&v.backing, same.to_str().unwrap(), &["--same-owner"])
            .output()
            .unwrap(),
    );
    for p in ["d", "d/f", "d/l"] {
        assert_eq!(owner(&same.join(p)), (65534, 65534), "{p}");
    }
    assert_eq!(fs::read(same.join("d/f")).unwrap(), b"data");
    let (stream, _) = tar_export(&v.backing, &["--same-owner"]);
    for (name, (h, _)) in members(&stream) {
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap()),
            (65534, 65534),
            "{name}"
        );
    }
    untar(&stream, &untarred_same);
    assert_eq!(owner(&untarred_same.join("d/f")), (65534, 65534));
    assert_eq!(owner(&untarred_same.join("d/l")), (65534, 65534));
    assert_eq!(
        snapshot(top, &[&out, &same, &untarred, &untarred_same]),
        before
    );
}

#[test]
fn a_symlink_planted_in_place_of_a_directory_is_never_exported_nor_followed() {
    let v = common::TestVolume::new(4096);
    v.mkdir("d");
    v.write("d/x", b"inside");
    v.write("keep", b"keep");
    v.object("link", ObjectKind::Symlink, 0o777, 0, b"keep");
    let top = v.dir.path();
    let outside = top.join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("secret"), b"outside plaintext").unwrap();
    fs::write(outside.join("sub/more"), b"more").unwrap();

    // Positive control: as stored, d is a directory and d/x is exported, and the symlink
    // kmsfs made is exported with its authenticated target.
    let first = top.join("first");
    assert_success(
        &export(&v.backing, first.to_str().unwrap(), &[])
            .output()
            .unwrap(),
    );
    assert_eq!(fs::read(first.join("d/x")).unwrap(), b"inside");
    assert_eq!(
        fs::read_link(first.join("link")).unwrap(),
        Path::new("keep")
    );

    // The attacker swaps d for a symlink to a directory outside the store, and the symlink
    // object for a plain symlink elsewhere.
    fs::rename(v.backing_file("d"), top.join("d-was")).unwrap();
    std::os::unix::fs::symlink(&outside, v.backing_file("d")).unwrap();
    fs::remove_file(v.backing_file("link")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", v.backing_file("link")).unwrap();
    let out = top.join("out");
    let before = snapshot(top, &[&out, &first]);
    let run = export(&v.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    // Reported, not exported: neither is something kmsfs made.
    assert_eq!(run.status.code(), Some(3));
    let err = String::from_utf8(run.stderr).unwrap();
    assert!(
        err.contains("/d: an entry on the backing store that kmsfs did not make"),
        "{err}"
    );
    assert!(
        err.contains("/link: an entry on the backing store"),
        "{err}"
    );
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"keep");
    let mut names: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["keep"]);
    // A tar stream stops at the first (a backup must not look complete).
    let run = export(&v.backing, "-", &[]).output().unwrap();
    assert_eq!(run.status.code(), Some(3));
    assert!(!run
        .stdout
        .windows(b"outside plaintext".len())
        .any(|w| w == b"outside plaintext"));

    // A subtree through it is refused in one line, before DEST is created.
    let sub = top.join("sub");
    for dest in [sub.to_str().unwrap(), "-"] {
        let run = export(&v.backing, dest, &["--subtree", "d/secret"])
            .stdout(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(1));
        let err = String::from_utf8(run.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        // With encrypted names the lookup of d/secret reads d's record first (for the id
        // names in d are encrypted under), and that is where it meets the symlink.
        let refused = if common::plaintext_names() {
            "/d/secret: a symlink on the backing store"
        } else {
            "cannot open the record of /d: /d/.kmsfs-dir: a symlink on the backing store"
        };
        assert!(err.contains(refused), "{err}");
    }
    assert!(!sub.exists());
    assert_eq!(snapshot(top, &[&out, &first]), before);
}

#[test]
fn a_dest_holding_a_symlink_or_inside_the_store_is_refused_and_nothing_is_written() {
    let v = common::TestVolume::new(4096);
    v.mkdir("docs");
    v.write("docs/a.txt", b"alpha");
    let top = v.dir.path();
    let outside = top.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("a.txt"), b"precious").unwrap();
    let dest = top.join("dest");
    fs::create_dir(&dest).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("docs")).unwrap();
    let before = snapshot(top, &[]);
    let run = export(&v.backing, dest.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8(run.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not empty"), "{err}");
    // Inside the store (or the store itself), or a file: refused, nothing created.
    let inside = v.backing_file("docs/plain");
    let file = outside.join("a.txt");
    for (d, why) in [
        (inside.as_path(), "inside the backing store"),
        (v.backing.as_path(), "inside the backing store"),
        (file.as_path(), "not a directory"),
    ] {
        let run = export(&v.backing, d.to_str().unwrap(), &[])
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(1), "{}", d.display());
        let err = String::from_utf8(run.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(snapshot(top, &[]), before);

    // Positive control: the same export into a new directory writes docs/a.txt, mode 0700 on
    // the directory export created (the store's modes are anyone's to set).
    let fresh = top.join("fresh");
    assert_success(
        &export(&v.backing, fresh.to_str().unwrap(), &[])
            .output()
            .unwrap(),
    );
    assert_eq!(fs::read(fresh.join("docs/a.txt")).unwrap(), b"alpha");
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(snapshot(top, &[&fresh]), before);
}

#[test]
fn a_hard_link_planted_on_the_store_does_not_give_a_file_another_name() {
    let v = common::TestVolume::new(4096);
    v.write("a.txt", b"alpha");
    v.write("b.txt", b"bravo");
    // The attacker links a.txt's backing file under a name kmsfs never bound it to.
    fs::hard_link(v.backing_file("a.txt"), v.backing_file("0stolen")).unwrap();
    fs::hard_link(v.backing_file("a.txt"), v.backing_file("z-stolen")).unwrap();
    let top = v.dir.path();
    let out = top.join("out");
    let before = snapshot(top, &[&out]);
    let run = export(&v.backing, out.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3));
    let err = String::from_utf8(run.stderr).unwrap();
    assert!(
        err.contains("not exported: /0stolen: context mismatch")
            && err.contains("not exported: /z-stolen: context mismatch"),
        "{err}"
    );
    // Positive control: the names kmsfs bound are exported (a.txt alone, not linked).
    assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(out.join("b.txt")).unwrap(), b"bravo");
    assert_eq!(fs::metadata(out.join("a.txt")).unwrap().nlink(), 1);
    let mut names: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "b.txt"]);
    // A tar stream ends at the first one, with no member for it.
    let run = export(&v.backing, "-", &[]).output().unwrap();
    assert_eq!(run.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&run.stderr).contains("/0stolen: context mismatch"));
    assert_eq!(snapshot(top, &[&out]), before);
}
