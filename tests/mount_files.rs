//! Regular files through a real mount: create, read, write at random offsets, append,
//! truncate, sparse writes, O_EXCL / O_TRUNC, fsync (mmap: mount_mmap.rs); and the backing
//! store holds only ciphertext.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use common::mount::{fuse_available, Mount};
use common::{held_up, pattern, within_200ms};

#[test]
fn write_read_and_the_backing_store_is_ciphertext() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let secret = b"cardholder 4111-1111-1111-1111 expires 12/29\n".repeat(300);
    fs::write(m.p("card.txt"), &secret).unwrap();
    assert_eq!(fs::read(m.p("card.txt")).unwrap(), secret);
    assert_eq!(
        fs::metadata(m.p("card.txt")).unwrap().len(),
        secret.len() as u64
    );
    let raw = fs::read(m.b("card.txt")).unwrap();
    assert!(
        !raw.windows(19).any(|w| w == b"4111-1111-1111-1111"),
        "plaintext on the backing store"
    );
    let (ok, info) = m.info("card.txt");
    assert!(ok, "{info}");
}

#[test]
fn random_offset_writes_match_a_model() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(512, &[]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("f"))
        .unwrap();
    let mut model = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for i in 0..300 {
        let off = next(20_000);
        let len = next(3000) as usize;
        let data = pattern(len, i as u8);
        f.write_all_at(&data, off).unwrap();
        if len > 0 {
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        }
        if i % 50 == 0 {
            let cut = next(25_000);
            f.set_len(cut).unwrap();
            model.resize(cut as usize, 0);
        }
    }
    drop(f);
    assert_eq!(fs::read(m.p("f")).unwrap(), model);
}

#[test]
fn append_truncate_and_sparse() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let mut a = OpenOptions::new()
        .append(true)
        .create(true)
        .open(m.p("log"))
        .unwrap();
    for i in 0..100 {
        writeln!(a, "line {i}").unwrap();
    }
    drop(a);
    let text = fs::read_to_string(m.p("log")).unwrap();
    assert_eq!(text.lines().count(), 100);
    assert!(text.ends_with("line 99\n"));

    let f = OpenOptions::new().write(true).open(m.p("log")).unwrap();
    f.set_len(5).unwrap();
    assert_eq!(fs::read(m.p("log")).unwrap(), b"line ");
    f.set_len(10_000).unwrap();
    let grown = fs::read(m.p("log")).unwrap();
    assert_eq!(grown.len(), 10_000);
    assert!(grown[5..].iter().all(|&b| b == 0));

    let mut s = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("sparse"))
        .unwrap();
    s.seek(SeekFrom::Start(5 << 20)).unwrap();
    s.write_all(b"end").unwrap();
    drop(s);
    m.remount();
    let sparse = fs::read(m.p("sparse")).unwrap();
    assert_eq!(sparse.len(), (5 << 20) + 3);
    assert!(sparse[..5 << 20].iter().all(|&b| b == 0));
    assert_eq!(&sparse[5 << 20..], b"end");
}

#[test]
fn open_flags() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"0123456789").unwrap();
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.p("f"))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("f"))
        .unwrap();
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 0);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(m.p("f"))
        .unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let mut back = String::new();
    fs::File::open(m.p("f"))
        .unwrap()
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "synced");
    assert_eq!(
        fs::read(m.p("missing")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn two_handles_see_one_file() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let a = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("f"))
        .unwrap();
    let b = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    a.write_all_at(b"hello", 0).unwrap();
    b.write_all_at(b" world", 5).unwrap();
    let mut buf = [0u8; 11];
    a.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello world");
}

#[test]
fn growth_beyond_free_space_is_refused_at_once() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("huge"))
        .unwrap();
    let t0 = std::time::Instant::now();
    // Beyond free space: ENOSPC. Beyond the backing filesystem's whole size: EFBIG.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let b = std::ffi::CString::new(m.backing.to_str().unwrap()).unwrap();
    // SAFETY: valid path and out-parameter.
    assert_eq!(unsafe { libc::statvfs(b.as_ptr(), &mut st) }, 0);
    let (free, total) = (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize);
    let err = f.set_len(free + (total - free) / 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let err = f.set_len(999_999_999_999_999).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    let err = f.write_all_at(b"x", 999_999_999_999_999).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "refused at once"
    );
    assert_eq!(f.metadata().unwrap().len(), 0, "nothing was written");
}

#[test]
fn modes_owners_and_set_id_bits_are_as_on_linux() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &["--allow-other"]);
    // Let another user reach the mount point.
    fs::set_permissions(m.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // statx for the mode alone, as `stat -c %a` asks: served from the kernel's attribute
    // cache when it is fresh, so a mode changed behind the kernel's back would show stale.
    let mode = |p: &str| {
        let path = std::ffi::CString::new(m.p(p).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid C string and a zeroed statx buffer the call fills.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_MODE,
                &mut stx,
            )
        };
        assert_eq!(r, 0, "statx {p}");
        u32::from(stx.stx_mode) & 0o7777
    };
    let sh = |uid: u32, script: &str| {
        let st = std::process::Command::new("sh")
            .current_dir(&m.mnt)
            .arg("-c")
            .arg(script)
            .uid(uid)
            .gid(uid)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    // Exactly the caller's mode and umask: the daemon's own umask does not apply.
    sh(0, "umask 0; : > plain; mkdir dir; mkfifo fifo");
    assert_eq!(
        (mode("plain"), mode("dir"), mode("fifo")),
        (0o666, 0o777, 0o666)
    );
    // Set-id bits asked for at create survive the chown that gives the file its owner.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o6777)
        .open(m.p("setid"))
        .unwrap();
    fs::set_permissions(m.p("setid"), fs::Permissions::from_mode(0o6777)).unwrap();
    assert_eq!(mode("setid"), 0o6777);
    // A write by someone else clears them.
    sh(65534, "printf x >> setid");
    assert_eq!(mode("setid"), 0o777);
    assert_eq!(fs::read(m.p("setid")).unwrap(), b"x");
    // Root's writes keep them; a truncate by someone else clears them; without group execute
    // the set-group-id bit (mandatory locking) stays. Each seen at once, not after a cache
    // expires.
    let set = |bits: u32| fs::set_permissions(m.p("setid"), fs::Permissions::from_mode(bits));
    set(0o6777).unwrap();
    OpenOptions::new()
        .append(true)
        .open(m.p("setid"))
        .unwrap()
        .write_all(b"y")
        .unwrap();
    assert_eq!(mode("setid"), 0o6777);
    sh(65534, "truncate -s 1 setid");
    assert_eq!(mode("setid"), 0o777);
    set(0o6766).unwrap();
    sh(65534, "printf z >> setid");
    assert_eq!(mode("setid"), 0o2766);
    assert_eq!(fs::read(m.p("setid")).unwrap(), b"xz");
    // In a set-group-id directory, entries take its group, and directories its bit.
    fs::create_dir(m.p("shared")).unwrap();
    std::os::unix::fs::chown(m.p("shared"), None, Some(65534)).unwrap();
    fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o2777)).unwrap();
    sh(0, "umask 022; : > shared/f; mkdir shared/sub");
    let f = fs::metadata(m.p("shared/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (0, 65534));
    assert_eq!(mode("shared/sub"), 0o2755);
    assert_eq!(fs::metadata(m.p("shared/sub")).unwrap().gid(), 65534);
}

/// The kernel gives a FUSE mount 128 KiB of readahead; the daemon, as root, widens it to
/// 1 MiB (streaming reads keep more requests in flight).
#[test]
fn a_mount_by_root_reads_ahead_one_mib() {
    if !fuse_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: only root may set a mount's readahead");
        return;
    }
    let m = Mount::new(4096, &[]);
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(fs::read_to_string(&knob).unwrap().trim(), "1024", "{knob}");
}

/// The kernel holds callers to the authenticated modes (`default_permissions`) on a mount
/// others can reach; a mount root makes without `--allow-other` serves root alone, which they
/// would not hold back but for a missing execute bit, and that is still refused there.
#[test]
fn permissions_are_checked_wherever_they_bind_someone() {
    if !fuse_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a mount by root is what this is about");
        return;
    }
    let kernel_checks = |m: &Mount| {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == m.mnt.to_str())
            .expect("the mount is listed");
        line.contains("default_permissions")
    };
    let access = |p: &std::path::Path, mode: i32| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        unsafe { libc::access(c.as_ptr(), mode) == 0 }
    };

    let root_only = Mount::new(4096, &[]);
    assert!(!kernel_checks(&root_only));
    let script = root_only.p("script");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    // No execute bit: refused, by access(2) and by exec, as root is on a local disk.
    assert!(!access(&script, libc::X_OK));
    assert!(access(&script, libc::R_OK | libc::W_OK));
    let err = std::process::Command::new(&script).status().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    fs::set_permissions(&script, fs::Permissions::from_mode(0o744)).unwrap();
    assert!(access(&script, libc::X_OK));
    assert!(std::process::Command::new(&script)
        .status()
        .unwrap()
        .success());
    // Root reads a file of mode 0 and writes a read-only one, as on a local disk.
    fs::write(root_only.p("locked"), "x").unwrap();
    fs::set_permissions(root_only.p("locked"), fs::Permissions::from_mode(0o400)).unwrap();
    fs::write(root_only.p("locked"), "y").unwrap();
    fs::set_permissions(root_only.p("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    assert_eq!(fs::read(root_only.p("locked")).unwrap(), b"y");

    let shared = Mount::new(4096, &["--allow-other"]);
    assert!(kernel_checks(&shared));
    fs::set_permissions(shared.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mode) in [("private", 0o600), ("public", 0o644)] {
        fs::write(shared.p(name), "secret").unwrap();
        fs::set_permissions(shared.p(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    let cat_as_nobody = |name: &str| {
        std::process::Command::new("cat")
            .arg(shared.p(name))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let private = cat_as_nobody("private");
    assert!(!private.status.success());
    assert!(String::from_utf8_lossy(&private.stderr).contains("Permission denied"));
    // Positive control: the same user reads what its mode lets them.
    assert_eq!(cat_as_nobody("public").stdout, b"secret");
}

/// A key service stuck for 10 s on one file's `Decrypt` holds up that file's open only: a
/// listing with a stat of every entry (`ls -l`) of its directory, a `stat`, a read of another
/// open file and a close of another handle each answer within 200 ms meanwhile.
#[test]
fn a_key_call_stuck_on_one_file_holds_up_nothing_else() {
    if !fuse_available() {
        return;
    }
    // No kernel attribute cache: every stat reaches the daemon.
    let mut m = Mount::new(4096, &["--cache-timeout", "0"]);
    fs::create_dir(m.p("d")).unwrap();
    for name in ["slow", "a", "b"] {
        fs::write(m.p(&format!("d/{name}")), pattern(5000, 7)).unwrap();
    }
    let stored = m.stored("d/slow");
    m.set_env("KMSFS_INJECT_KMS_HANG", &format!("10000:{stored}"));
    m.remount();
    let a = fs::File::open(m.p("d/a")).unwrap();
    let b = fs::File::open(m.p("d/b")).unwrap();
    let slow = m.p("d/slow");
    // The open of `slow` waits for its key.
    let stuck = held_up(move || fs::read(&slow).map(|d| d.len()));
    let meanwhile = "a key call was stuck";
    within_200ms("ls -l", meanwhile, || {
        let mut listed = 0;
        for entry in fs::read_dir(m.p("d")).unwrap() {
            fs::symlink_metadata(entry.unwrap().path()).unwrap();
            listed += 1;
        }
        assert_eq!(listed, 3);
    });
    within_200ms("stat", meanwhile, || {
        assert_eq!(fs::metadata(m.p("d/a")).unwrap().len(), 5000);
        assert_eq!(fs::metadata(m.p("d/slow")).unwrap().len(), 5000);
    });
    within_200ms("a read of another open file", meanwhile, || {
        let mut buf = vec![0u8; 5000];
        a.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(5000, 7));
    });
    within_200ms("a close of another handle", meanwhile, || drop(b));
    assert_eq!(stuck.finish().unwrap(), 5000);
}

/// A key service stuck for 10 s on a new file's `GenerateDataKey` (a create that waits for its
/// key: the key service answered fast until then) holds up that create only: creates, a
/// mkdir, a rename and an unlink elsewhere each answer within 200 ms meanwhile (the key is
/// generated before the create takes the volume's namespace lock). (Not in the same
/// directory: the kernel locks a directory across a create in it.)
#[test]
fn a_creates_stuck_key_call_holds_up_no_other_change_of_names() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &["--cache-timeout", "0"]);
    // (Another directory: the kernel itself locks a directory across a create in it.)
    fs::create_dir(m.p("d")).unwrap();
    fs::create_dir(m.p("x")).unwrap();
    fs::write(m.p("x/old"), b"old").unwrap();
    let stored = m.stored("d/new");
    m.set_env("KMSFS_INJECT_KMS_HANG", &format!("10000:{stored}"));
    m.remount();
    let new = m.p("d/new");
    // The create waits for its key.
    let creating = held_up(move || fs::write(&new, b"new"));
    let stuck = "a create's key call was stuck";
    within_200ms("a create", stuck, || {
        fs::write(m.p("x/other"), b"other").unwrap()
    });
    within_200ms("a mkdir", stuck, || fs::create_dir(m.p("e")).unwrap());
    within_200ms("a rename", stuck, || {
        fs::rename(m.p("x/old"), m.p("e/old")).unwrap()
    });
    within_200ms("an unlink", stuck, || {
        fs::remove_file(m.p("x/other")).unwrap()
    });
    creating.finish().unwrap();
    assert_eq!(fs::read(m.p("d/new")).unwrap(), b"new");
    assert_eq!(fs::read(m.p("e/old")).unwrap(), b"old");
}

/// Bytes of `file`'s pages that are dirty in the page cache (not yet handed to the disk),
/// from `cachestat(2)` (Linux 6.5), which neither libc's nor rustix's wrappers cover yet.
fn dirty_bytes(file: &fs::File) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: both pointers are to live structs of the layout the syscall takes.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0,
        )
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    stat.nr_dirty * 4096
}

/// A file growing by a streaming write has the disk start on what it wrote as it goes
/// (write-behind), so the final `fsync` or `close` does not wait for all of it: after 24 MiB
/// written with no sync, at most the last 8 MiB (and the final block) of its backing file
/// are still dirty, where a plain file written the same way beside the store has them all.
#[test]
fn a_streaming_write_hands_its_pages_to_the_disk_as_it_goes() {
    if !fuse_available() {
        return;
    }
    const MIB: u64 = 1 << 20;
    let m = Mount::new(4096, &[]);
    let chunk = vec![0x5au8; 128 << 10];
    let write_24_mib = |p: &std::path::Path| {
        let mut f = fs::File::create(p).unwrap();
        for _ in 0..(24 * MIB as usize / chunk.len()) {
            f.write_all(&chunk).unwrap();
        }
    };
    // Control: the page cache does keep a plain file's 24 MiB dirty for a while here.
    let plain = m.dir.path().join("plain");
    write_24_mib(&plain);
    let plain_dirty = dirty_bytes(&fs::File::open(&plain).unwrap());
    assert!(
        plain_dirty >= 20 * MIB,
        "control: only {plain_dirty} bytes of a plain file just written are dirty"
    );
    write_24_mib(&m.p("stream"));
    let stored = fs::File::open(m.b("stream")).unwrap();
    assert!(stored.metadata().unwrap().len() > 24 * MIB);
    let dirty = dirty_bytes(&stored);
    assert!(
        dirty <= 9 * MIB,
        "{} MiB of the streamed file's backing pages are still dirty",
        dirty / MIB
    );
}
