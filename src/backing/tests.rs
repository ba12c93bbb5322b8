//! Every call refuses to act through a symlink planted in the store, checked by what changed
//! *outside* the store; each attack has a positive control (the same call on a real entry
//! does act), so a call that silently does nothing cannot pass.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

fn p(s: &str) -> CanonicalPath {
    CanonicalPath::from_user(Path::new(s)).unwrap()
}

struct Scene {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    outside: PathBuf,
}

/// A store with `d/f` (a file) and `e/` (a directory), and beside it an `outside` directory
/// holding `victim` (mode 0600) and `vdir/`.
fn scene() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(store.join("d")).unwrap();
    std::fs::create_dir_all(store.join("e")).unwrap();
    std::fs::write(store.join("d/f"), b"inside").unwrap();
    std::fs::create_dir_all(outside.join("vdir")).unwrap();
    std::fs::write(outside.join("victim"), b"secret").unwrap();
    rustix::fs::setxattr(
        outside.join("victim"),
        c"user.secret",
        b"secret",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::fs::set_permissions(
        outside.join("victim"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    Scene {
        _tmp: tmp,
        store,
        outside,
    }
}

fn both_resolvers(test: impl Fn(&Backing, &Scene)) {
    for walk in [false, true] {
        let s = scene();
        let b = Backing::open(&s.store).unwrap();
        if walk {
            b.use_component_walk();
        }
        test(&b, &s);
    }
}

fn swap_dir_for_symlink(s: &Scene, dir: &str, to: &Path) {
    let at = s.store.join(dir);
    std::fs::rename(&at, s.store.join(format!("{dir}.moved"))).unwrap();
    std::os::unix::fs::symlink(to, &at).unwrap();
}

fn is_refused(e: &io::Error) -> bool {
    e.raw_os_error().is_none() || e.raw_os_error() == Some(libc::ELOOP)
}

#[test]
fn a_symlinked_parent_directory_is_never_followed() {
    both_resolvers(|b, s| {
        // Positive control: through the real directory every call acts.
        b.chmod(&p("d/f"), 0o640, None).unwrap();
        assert_eq!(
            std::fs::metadata(s.store.join("d/f")).unwrap().mode() & 0o777,
            0o640
        );

        std::fs::write(s.outside.join("vdir/f"), b"outside").unwrap();
        swap_dir_for_symlink(s, "d", &s.outside.join("vdir"));
        let f = p("d/f");
        assert!(is_refused(&b.chmod(&f, 0o777, None).unwrap_err()));
        assert!(is_refused(&b.metadata(&f).unwrap_err()));
        assert!(is_refused(&b.open_file(&f, true, Atime::Keep).unwrap_err()));
        assert!(is_refused(&b.unlink(&f, None).unwrap_err()));
        assert!(is_refused(&b.create_file(&p("d/new"), 0o600).unwrap_err()));
        assert!(is_refused(&b.mkdir(&p("d/newdir"), 0o700).unwrap_err()));
        assert!(is_refused(&b.symlink(b"x", &p("d/newlink")).unwrap_err()));
        assert!(is_refused(
            &b.rename(&p("e"), &p("d/e"), RenameFlags::empty())
                .unwrap_err()
        ));
        assert!(is_refused(&b.link(&p("d.moved/f"), &p("d/g")).unwrap_err()));
        assert!(is_refused(&b.list_dir(&p("d"), Atime::Keep).unwrap_err()));
        assert!(is_refused(
            &b.set_xattr(&f, c"user.x", b"1", 0, None).unwrap_err()
        ));
        assert!(is_refused(&b.chown(&f, Some(1), None, None).unwrap_err()));

        // Nothing changed outside.
        let vdir = s.outside.join("vdir");
        assert_eq!(std::fs::read(vdir.join("f")).unwrap(), b"outside");
        assert_eq!(
            std::fs::metadata(vdir.join("f")).unwrap().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = std::fs::read_dir(&vdir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("f")]);
        assert!(s.store.join("e").is_dir());
    });
}

#[test]
fn a_file_swapped_for_a_symlink_is_never_followed() {
    both_resolvers(|b, s| {
        let f = p("d/f");
        let id = Identity::of(&b.metadata(&f).unwrap());
        // Positive control: the real file is opened, chmodded, timed and given xattrs.
        b.set_xattr(&f, c"user.x", b"1", 0, Some(id)).unwrap();
        assert_eq!(b.get_xattr(&f, c"user.x", 8, Some(id)).unwrap(), b"1");
        assert_eq!(b.get_xattr(&f, c"user.x", 0, Some(id)).unwrap().len(), 1);
        assert_eq!(b.get_xattr(&f, c"user.x", 8, None).unwrap(), b"1");
        assert_eq!(b.list_xattr(&f, 64, None).unwrap(), b"user.x\0");
        b.set_times(
            &f,
            &[libc::timespec {
                tv_sec: 5,
                tv_nsec: 0,
            }; 2],
            Some(id),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(s.store.join("d/f")).unwrap().mtime(), 5);
        drop(b.open_file(&f, true, Atime::Keep).unwrap());

        // Moved, not removed: a removed file's inode number could be reused by the symlink.
        std::fs::rename(s.store.join("d/f"), s.store.join("d/old")).unwrap();
        std::os::unix::fs::symlink(s.outside.join("victim"), s.store.join("d/f")).unwrap();
        assert!(is_refused(
            &b.open_file(&f, false, Atime::Keep).unwrap_err()
        ));
        assert!(is_refused(&b.chmod(&f, 0o666, None).unwrap_err()));
        // Times and xattrs of a symlink are its own: they act on the symlink itself, never
        // on its target; with the identity the kernel named, not at all.
        let seven = [libc::timespec {
            tv_sec: 7,
            tv_nsec: 0,
        }; 2];
        assert_eq!(
            b.set_times(&f, &seven, Some(id))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ESTALE)
        );
        b.set_times(&f, &seven, None).unwrap();
        let link = std::fs::symlink_metadata(s.store.join("d/f")).unwrap();
        assert_eq!(link.mtime(), 7);
        // user.* xattrs are not allowed on symlinks (EPERM): the target's are never reached
        // (its user.secret is readable by path, the positive control).
        assert_eq!(
            rustix::fs::getxattr(s.outside.join("victim"), c"user.secret", &mut [0u8; 8][..])
                .unwrap(),
            6
        );
        assert!(b.set_xattr(&f, c"user.x", b"1", 0, None).is_err());
        assert!(b.get_xattr(&f, c"user.secret", 64, None).is_err());
        // chown acts on the symlink itself, never on its target; identity says it is not the
        // file the kernel named.
        assert_eq!(
            b.chown(&f, Some(1), None, Some(id))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ESTALE)
        );
        b.chown(&f, Some(1), None, None).unwrap();
        assert_eq!(
            std::fs::symlink_metadata(s.store.join("d/f"))
                .unwrap()
                .uid(),
            1
        );
        // A write through a new hard link goes nowhere either: link does not follow.
        b.link(&f, &p("e/l")).unwrap();
        assert!(std::fs::symlink_metadata(s.store.join("e/l"))
            .unwrap()
            .file_type()
            .is_symlink());

        let victim = std::fs::metadata(s.outside.join("victim")).unwrap();
        assert_eq!(victim.mode() & 0o7777, 0o600);
        assert_eq!(victim.uid(), rustix::process::geteuid().as_raw());
        assert_ne!(victim.mtime(), 7);
        assert_eq!(std::fs::read(s.outside.join("victim")).unwrap(), b"secret");
    });
}

#[test]
fn a_changed_inode_is_not_touched() {
    both_resolvers(|b, s| {
        let f = p("d/f");
        let id = Identity::of(&b.metadata(&f).unwrap());
        std::fs::rename(s.store.join("d/f"), s.store.join("d/old")).unwrap();
        std::fs::write(s.store.join("d/f"), b"planted").unwrap();
        std::fs::set_permissions(s.store.join("d/f"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let stale = |e: io::Error| e.raw_os_error() == Some(libc::ESTALE);
        assert!(stale(b.chmod(&f, 0o666, Some(id)).unwrap_err()));
        assert!(stale(b.unlink(&f, Some(id)).unwrap_err()));
        assert!(stale(
            b.open_file_expecting(&f, true, Atime::Keep, id)
                .unwrap_err()
        ));
        assert_eq!(
            std::fs::metadata(s.store.join("d/f")).unwrap().mode() & 0o777,
            0o600
        );
        // Positive control: the inode it names now is acted on when that is the one expected.
        let now = Identity::of(&b.metadata(&f).unwrap());
        b.unlink(&f, Some(now)).unwrap();
        assert!(!s.store.join("d/f").exists());
    });
}

#[test]
fn a_fifo_in_a_files_place_is_refused_without_blocking() {
    both_resolvers(|b, s| {
        std::fs::remove_file(s.store.join("d/f")).unwrap();
        rustix::fs::mknodat(
            CWD,
            s.store.join("d/f"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = b.open_file(&p("d/f"), false, Atime::Keep).unwrap_err();
        assert!(e.to_string().contains("a fifo"), "{e}");
        assert!(b.read_link(&p("d/f")).is_err());
    });
}

#[test]
fn deep_paths_beyond_path_max_resolve_in_pieces() {
    both_resolvers(|b, s| {
        let name = "n".repeat(200);
        let mut rel = String::new();
        for _ in 0..30 {
            rel.push('/');
            rel.push_str(&name);
            b.mkdir(&p(&rel), 0o700).unwrap();
        }
        assert!(rel.len() > 4096);
        let file = p(&format!("{rel}/f"));
        b.create_file(&file, 0o600).unwrap();
        assert!(b.metadata(&file).unwrap().is_file());
        // A symlink deep down is still refused.
        let mid = 20 * 201;
        let dir_on_host = s.store.join(&rel[1..mid]);
        std::fs::rename(&dir_on_host, s.store.join("e/moved")).unwrap();
        std::os::unix::fs::symlink(s.store.join("e/moved"), &dir_on_host).unwrap();
        assert!(is_refused(&b.metadata(&file).unwrap_err()));
    });
}

#[test]
fn kmsfs_directories_must_be_real_and_owned() {
    let s = scene();
    let b = Backing::open(&s.store).unwrap();
    // Positive control.
    let meta = b.meta_dir(".kmsfs", true).unwrap();
    meta.write_atomic("config", b"cfg").unwrap();
    assert_eq!(meta.read("config", 16).unwrap(), b"cfg");
    assert!(meta.read("config", 2).is_err(), "the size cap holds");
    std::fs::remove_dir_all(s.store.join(".kmsfs")).unwrap();

    std::os::unix::fs::symlink(&s.outside, s.store.join(".kmsfs")).unwrap();
    let e = b.meta_dir(".kmsfs", true).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    std::fs::remove_file(s.store.join(".kmsfs")).unwrap();

    std::fs::create_dir(s.store.join(".kmsfs")).unwrap();
    std::fs::set_permissions(
        s.store.join(".kmsfs"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    assert!(b
        .meta_dir(".kmsfs", false)
        .unwrap_err()
        .to_string()
        .contains("writable"));
    std::fs::set_permissions(
        s.store.join(".kmsfs"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    if rustix::process::geteuid().is_root() {
        // Another user's directory in a store root owned by root: refused. The store root's
        // owner's: accepted (they control everything beneath it anyway).
        let nobody = Some(rustix::fs::Uid::from_raw(65534));
        rustix::fs::chownat(CWD, s.store.join(".kmsfs"), nobody, None, AtFlags::empty()).unwrap();
        assert!(b
            .meta_dir(".kmsfs", false)
            .unwrap_err()
            .to_string()
            .contains("owned by"));
        rustix::fs::chownat(CWD, &s.store, nobody, None, AtFlags::empty()).unwrap();
        let b = Backing::open(&s.store).unwrap();
        b.meta_dir(".kmsfs", false).unwrap();
        rustix::fs::chownat(
            CWD,
            &s.store,
            Some(rustix::fs::Uid::ROOT),
            None,
            AtFlags::empty(),
        )
        .unwrap();
    }

    // A record planted as a symlink is neither read nor followed when unlinked.
    std::fs::remove_dir_all(s.store.join(".kmsfs")).unwrap();
    let meta = b.meta_dir(".kmsfs", true).unwrap();
    std::os::unix::fs::symlink(s.outside.join("victim"), s.store.join(".kmsfs/rec")).unwrap();
    assert!(meta.read("rec", MAX_RECORD).is_err());
    meta.unlink("rec").unwrap();
    assert_eq!(std::fs::read(s.outside.join("victim")).unwrap(), b"secret");
}

#[test]
fn pieces_cut_at_component_boundaries() {
    let long = format!(
        "{}/{}/{}",
        "a".repeat(1500),
        "b".repeat(1500),
        "c".repeat(1500)
    );
    let parts = pieces(long.as_bytes());
    assert!(parts.len() >= 2);
    assert!(parts.iter().all(|p| p.len() <= PIECE));
    assert_eq!(parts.join(&b'/'), long.as_bytes());
    assert_eq!(pieces(b"x/y"), vec![&b"x/y"[..]]);
}

/// A directory's record is looked up in the directory found, never through a symlink planted
/// in its place: the symlink itself is what `child_metadata` reports (the control: the real
/// file's metadata is the outside file's when followed, the store's own when not).
#[test]
fn a_records_lookup_in_its_directory_reports_a_planted_symlink_not_its_target() {
    both_resolvers(|b, s| {
        let found = b.lookup(&p("/d")).unwrap();
        let real = found.child_metadata("f").unwrap();
        assert!(real.is_file());
        assert_eq!(
            real.ino(),
            std::fs::metadata(s.store.join("d/f")).unwrap().ino()
        );

        std::os::unix::fs::symlink(s.outside.join("victim"), s.store.join("d/rec")).unwrap();
        let planted = found.child_metadata("rec").unwrap();
        assert!(
            planted.file_type().is_symlink(),
            "followed the planted symlink"
        );
        let victim = std::fs::metadata(s.outside.join("victim")).unwrap();
        assert_ne!(planted.ino(), victim.ino());

        for bad in ["", ".", "..", "f/x", "../outside"] {
            assert!(found.child_metadata(bad).is_err(), "{bad:?} was looked up");
        }
        // Only in a directory.
        let file = b.lookup(&p("/d/f")).unwrap();
        assert!(file.child_metadata("x").is_err());
    });
}

/// A new file gets its name in its directory as resolved beneath the root when it is named,
/// not through the descriptor it was made with: a store that moves the directory out from
/// under the root meanwhile (a create may wait seconds for its key) gets no entry made
/// outside. The control: left in place, the file is named in the store.
#[test]
fn a_new_file_is_not_named_in_a_directory_moved_out_of_the_store_meanwhile() {
    both_resolvers(|b, s| {
        let tmp = b.new_temporary_file(&p("/e"), 0o600).unwrap();
        tmp.file().write_all_at(b"kept", 0).unwrap();
        tmp.persist_noclobber(&p("/e/named")).unwrap();
        assert_eq!(std::fs::read(s.store.join("e/named")).unwrap(), b"kept");

        let tmp = b.new_temporary_file(&p("/e"), 0o600).unwrap();
        tmp.file().write_all_at(b"moved", 0).unwrap();
        std::fs::rename(s.store.join("e"), s.outside.join("e")).unwrap();
        assert!(tmp.persist_noclobber(&p("/e/escaped")).is_err());
        assert!(
            !s.outside.join("e/escaped").exists(),
            "named outside the store"
        );
        assert!(s.outside.join("e/named").exists());
    });
}
