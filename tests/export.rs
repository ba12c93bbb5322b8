//! `kmsfs export`: a volume decrypted to a directory and to a tar stream equals what the mount
//! shows (contents, modes, times, symlinks, hard links, fifos); a subtree exports alone; a
//! tampered file is listed and skipped (directory) or ends the stream (tar); a non-empty
//! destination is refused.

mod common;

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
