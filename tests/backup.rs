//! Backups, both ways (docs/BACKUP.md):
//! - of the plaintext, through a read-only mount: restic, rsync -a and tar restore to a plain
//!   directory equal to the original, byte for byte;
//! - of the ciphertext, by copying BACKING as it is: the copy mounts and reads elsewhere, and a
//!   single file restored to another path is refused until `kmsfs adopt` rebinds it.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::path::Path;

use common::mount::{fuse_available, kmsfs, Mount};
use common::{assert_success, sh, tools_present};

/// A mounted volume holding a copy of [`original`] (stopped), its work directory and the
/// original.
fn volume_with_original() -> (Mount, std::path::PathBuf, std::path::PathBuf) {
    let mut m = Mount::new(4096, &[]);
    let work = m.dir.path().to_path_buf();
    let orig = original(&work);
    sh(
        &work,
        &format!("cp -a {}/. {}/", orig.display(), m.mnt.display()),
    );
    m.stop();
    (m, work, orig)
}

/// A tree with some depth, sizes, a symlink and a hard link.
fn original(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("original");
    let repo = env!("CARGO_MANIFEST_DIR");
    sh(
        dir,
        &format!(
            "mkdir -p {t} && cp -r {repo}/src {repo}/tests {repo}/docs {t}/ && \
             head -c 3000000 /dev/urandom > {t}/blob.bin && ln -s src {t}/link && \
             ln {t}/blob.bin {t}/blob-again.bin",
            t = tree.display()
        ),
    );
    tree
}

#[test]
fn restic_rsync_and_tar_of_a_read_only_mount_restore_the_original() {
    if !fuse_available() || !tools_present(&["restic", "rsync", "tar", "diff"]) {
        return;
    }
    let (mut m, work, orig) = volume_with_original();
    m.set_extra(&["--read-only"]);
    m.start();
    let mnt = m.mnt.display().to_string();
    // restic: back up the mount, restore elsewhere.
    sh(
        &work,
        &format!(
            "export RESTIC_PASSWORD=test RESTIC_REPOSITORY={w}/repo RESTIC_CACHE_DIR={w}/cache
             restic init -q
             restic backup -q {mnt}
             restic restore -q latest --target {w}/restic-out
             diff -r --no-dereference {o} {w}/restic-out{mnt}",
            w = work.display(),
            o = orig.display()
        ),
    );
    // rsync -a and tar of the mount.
    sh(
        &work,
        &format!(
            "rsync -aH {mnt}/ {w}/rsync-out/
             diff -r --no-dereference {o} {w}/rsync-out
             mkdir {w}/tar-out && tar -C {mnt} -cf - . | tar -C {w}/tar-out -xf -
             diff -r --no-dereference {o} {w}/tar-out
             test $(stat -c %h {w}/rsync-out/blob.bin) = 2",
            w = work.display(),
            o = orig.display()
        ),
    );
}

#[test]
fn a_copy_of_the_ciphertext_mounts_elsewhere_and_a_moved_file_needs_adopt() {
    if !fuse_available() || !tools_present(&["rsync", "diff"]) {
        return;
    }
    let (mut m, work, orig) = volume_with_original();
    // The backup: BACKING copied as it is, restored to another machine's directory.
    let restored = work.join("restored");
    sh(
        &work,
        &format!("rsync -aH {}/ {}/", m.backing.display(), restored.display()),
    );
    // Mount the restored copy instead of the original.
    m.backing = restored.clone();
    m.start();
    sh(
        &work,
        &format!(
            "diff -r --no-dereference {} {}",
            orig.display(),
            m.mnt.display()
        ),
    );
    // One file restored from the backup to another place (a directory made through the mount:
    // one made on the store has no record and is not shown) is refused until adopted.
    fs::create_dir(m.p("recovered")).unwrap();
    m.stop();
    // Copied to the name recovered/FORMAT.md has on the store (m.backing is the restored
    // copy now): with encrypted names a name only decrypts in the directory it was made for.
    fs::copy(m.b("docs/FORMAT.md"), m.b("recovered/FORMAT.md")).unwrap();
    m.start();
    let err = fs::read(m.p("recovered/FORMAT.md")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    m.stop();
    let out = kmsfs()
        .arg("adopt")
        .arg(&restored)
        .arg("recovered/FORMAT.md")
        .arg("--from")
        .arg("docs/FORMAT.md")
        .output()
        .unwrap();
    assert_success(&out);
    m.start();
    assert_eq!(
        fs::read(m.p("recovered/FORMAT.md")).unwrap(),
        fs::read(orig.join("docs/FORMAT.md")).unwrap()
    );
}
