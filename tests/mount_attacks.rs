//! The threat model's attacks (docs/SECURITY.md) made on the backing store while the volume
//! is mounted (and after a remount): the application gets EIO, the daemon logs the path and
//! the reason once, never returns wrong data, and keeps serving every other file.
//!
//! And issue #14: entries of the store swapped for symlinks (by its owner, or by another local
//! user of a root `--allow-other` mount, in the part of the store it owns), a file swapped for
//! a fifo, kmsfs's own directories swapped for symlinks: nothing outside the store is ever
//! read, written, chmodded, created or deleted (see the section comment further down). These
//! need root; without it they are skipped.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mount::{fuse_available, kmsfs, Mount};
use common::pattern;

fn eio(path: std::path::PathBuf) {
    let err = fs::read(&path).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "{}: {err}",
        path.display()
    );
}

#[test]
fn attacks_while_mounted_give_eio_and_the_daemon_carries_on() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("dir")).unwrap();
    for name in ["a", "b", "c", "d", "dir/e", "untouched"] {
        fs::write(m.p(name), pattern(3 * 4096 + 10, name.len() as u8)).unwrap();
    }
    let sealed = 4096 + 28;
    let offset = fs::read(m.b("a")).unwrap().len() - (3 * sealed + 10 + 28);

    // Move a file on the backing store.
    fs::rename(m.b("a"), m.b("a-moved")).unwrap();
    eio(m.p("a-moved"));
    // Swap two files.
    let (b, c) = (fs::read(m.b("b")).unwrap(), fs::read(m.b("c")).unwrap());
    fs::write(m.b("b"), &c).unwrap();
    fs::write(m.b("c"), &b).unwrap();
    eio(m.p("b"));
    eio(m.p("c"));
    // Reorder two blocks.
    let mut d = fs::read(m.b("d")).unwrap();
    let first = d[offset..offset + sealed].to_vec();
    d.copy_within(offset + sealed..offset + 2 * sealed, offset);
    d[offset + sealed..offset + 2 * sealed].copy_from_slice(&first);
    fs::write(m.b("d"), &d).unwrap();
    eio(m.p("d"));
    // Move a whole directory.
    fs::rename(m.b("dir"), m.b("dir2")).unwrap();
    eio(m.p("dir2/e"));

    // The daemon still serves the file nobody touched.
    assert_eq!(
        fs::read(m.p("untouched")).unwrap(),
        pattern(3 * 4096 + 10, 9)
    );
    let log = m.log();
    assert!(
        log.contains(&m.stored("a-moved")) && log.contains("context mismatch"),
        "{log}"
    );
    assert!(
        log.contains(&m.stored("d")) && log.contains("authentication failed at block 0"),
        "{log}"
    );

    // And after a remount, the same.
    m.remount();
    eio(m.p("a-moved"));
    eio(m.p("d"));
    assert_eq!(
        fs::read(m.p("untouched")).unwrap(),
        pattern(3 * 4096 + 10, 9)
    );
}

#[test]
fn truncation_and_spliced_headers_and_foreign_files_give_eio() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    let other = Mount::new(4096, &[]);
    for name in ["t", "s", "donor"] {
        fs::write(m.p(name), pattern(2 * 4096 + 5, 3)).unwrap();
    }
    fs::write(other.p("foreign"), b"from another volume").unwrap();
    let raw = fs::read(m.b("t")).unwrap();
    let header = raw.len() - (2 * (4096 + 28) + 5 + 28);
    // Truncate at a block boundary.
    fs::write(m.b("t"), &raw[..header + 2 * (4096 + 28)]).unwrap();
    eio(m.p("t"));
    // Splice s's header onto donor's body.
    let (s, donor) = (fs::read(m.b("s")).unwrap(), fs::read(m.b("donor")).unwrap());
    let spliced = [&s[..header], &donor[header..]].concat();
    fs::write(m.b("s"), spliced).unwrap();
    eio(m.p("s"));
    // A file copied from another volume.
    fs::copy(other.b("foreign"), m.b("foreign")).unwrap();
    eio(m.p("foreign"));
    assert_eq!(fs::read(m.p("donor")).unwrap(), pattern(2 * 4096 + 5, 3));
}

/// Issue 15, point 4, on a live mount: `O_TRUNC` gives a file a new file id and key (same
/// inode number, a handle opened before reads the new content), so a block saved before it
/// and spliced into the rewritten file at its own index gives EIO. Positive control (and the
/// residual risk of point 5): the same splice into a file rewritten in place, without
/// truncation, reads without error as a mix of two states.
#[test]
fn o_trunc_renews_the_file_and_blocks_from_before_it_give_eio() {
    if !fuse_available() {
        return;
    }
    use std::io::{Read, Seek, Write};
    let m = Mount::new(4096, &[]);
    let sealed = 4096 + 28;
    let (old, new) = (pattern(3 * 4096, 1), pattern(3 * 4096, 2));
    for name in ["t", "control"] {
        fs::write(m.p(name), &old).unwrap();
    }
    let saved_t = fs::read(m.b("t")).unwrap();
    let saved_control = fs::read(m.b("control")).unwrap();
    let header = saved_t.len() - 3 * sealed;
    let ino = fs::metadata(m.p("t")).unwrap().ino();
    let mut held = fs::File::open(m.p("t")).unwrap();
    // O_TRUNC, then a rewrite of the whole file.
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("t"))
        .unwrap()
        .write_all(&new)
        .unwrap();
    assert_eq!(fs::metadata(m.p("t")).unwrap().ino(), ino);
    let raw = fs::read(m.b("t")).unwrap();
    assert_ne!(raw[16..32], saved_t[16..32], "the file id changed");
    let mut seen = Vec::new();
    held.rewind().unwrap();
    held.read_to_end(&mut seen).unwrap();
    assert_eq!(
        seen, new,
        "a handle opened before O_TRUNC reads the new content"
    );
    drop(held);
    // Rewritten in place, without truncation: same file id.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m.p("control"))
        .unwrap();
    f.write_all(&new).unwrap();
    drop(f);
    let control = fs::read(m.b("control")).unwrap();
    assert_eq!(control[16..32], saved_control[16..32]);
    // Splice the old block 1 into each.
    let at = header + sealed;
    let splice = |name: &str, raw: &[u8], saved: &[u8]| {
        let mut spliced = raw.to_vec();
        spliced[at..at + sealed].copy_from_slice(&saved[at..at + sealed]);
        fs::write(m.b(name), spliced).unwrap();
    };
    splice("t", &raw, &saved_t);
    splice("control", &control, &saved_control);
    eio(m.p("t"));
    let mixed = fs::read(m.p("control")).unwrap();
    assert_eq!(mixed[4096..8192], old[4096..8192]);
    assert_eq!(mixed[..4096], new[..4096]);
}

// ---------------------------------------------------------------------------------------------
// Issue #14: the daemon never acts outside the store.
//
// The attacker owns part of the store (a second local user of a root `--allow-other` mount
// writes the backing entries of the files it made) or all of it, and swaps entries for
// symlinks to things outside the store while the mount is live. Whatever the call through the
// mount then does (it should fail with EIO or ESTALE), nothing outside the store may be read,
// written, chmodded, created or deleted: each test snapshots the outside victim before and
// after (type, mode, owner, links, size, times, content, symlink target, xattrs; a file's
// access time too, set in the past so that a read moves it) and fails on any difference.
// Each also makes the same calls on an entry nobody swapped, which must take effect: a test
// whose calls never reach the daemon cannot pass for a safe daemon.
//
// The races are made deterministic: the attacker holds descriptors (the kernel then asks the
// daemon about the inode it already has, by number), and the kernel's attributes are
// refreshed just before the swap, so its permission checks, which trust attributes for the
// 1 s TTL, pass on what the attacker owned a moment ago.
// ---------------------------------------------------------------------------------------------

/// Gives `root` and everything beneath it (not following symlinks) to `uid`:`uid`.
fn chown_tree(root: &Path, uid: u32) {
    std::os::unix::fs::lchown(root, Some(uid), Some(uid)).unwrap();
    if fs::symlink_metadata(root).unwrap().is_dir() {
        for e in fs::read_dir(root).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

/// The unprivileged attacker (uid and gid of `nobody`).
const NOBODY: u32 = 65534;
/// An access time in the past (2001), so that any read of a victim file moves it.
const OLD_ATIME: i64 = 978_307_200;

/// Whether the test runs as root (a root daemon, and a root to drop to `nobody` from).
fn root_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the store attacks need root under CI=true"
        );
        eprintln!("skipping: the store attacks need root (a root daemon, a user to drop to)");
    }
    root
}

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> CString {
    CString::new(p.as_ref().as_bytes()).unwrap()
}

/// A syscall's result: Ok (with nothing to say) or the errno.
fn sys(r: libc::c_int) -> io::Result<String> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(String::new())
    }
}

fn fd_of(r: libc::c_int) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn open_at(dir: Option<&OwnedFd>, path: impl AsRef<std::ffi::OsStr>, flags: i32) -> OwnedFd {
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    let p = cstr(path);
    // SAFETY: a valid C string; the descriptor is owned by the OwnedFd.
    fd_of(unsafe { libc::openat(at, p.as_ptr(), flags | libc::O_CLOEXEC, 0o644) })
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
}

/// The path that reaches what `fd` holds without looking its name up again.
fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/thread-self/fd/{}", fd.as_raw_fd())
}

/// Makes the kernel fetch the attributes of what `fd` holds now (they are then trusted for the
/// TTL, permission checks included).
fn refresh(fd: &OwnedFd) {
    // SAFETY: zeroed statx is a valid out-parameter; "" with AT_EMPTY_PATH names the fd.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut st,
        )
    };
    assert_eq!(r, 0, "statx: {}", io::Error::last_os_error());
}

/// Runs `f` on a thread of its own as `nobody` (no groups, no capabilities). Raw syscalls:
/// they change the calling thread's credentials only, where glibc's wrappers would change
/// every thread of the test process.
fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let n = NOBODY as libc::c_long;
            // SAFETY: plain syscalls on this thread's credentials.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, n, n, n), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, n, n, n), 0);
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn xattrs(p: &Path) -> Vec<String> {
    let c = cstr(p);
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: valid path and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let cn = CString::new(name).unwrap();
            let mut v = vec![0u8; 64 * 1024];
            // SAFETY: as above.
            let l =
                unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            v.truncate(l.max(0) as usize);
            format!(
                "{}={}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&v)
            )
        })
        .collect()
}

/// One line per entry of the tree at `root` with everything an attack could change (see the
/// section comment). Reads files with `O_NOATIME`, so taking it moves no access time.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
        let m = match fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) => {
                out.push(format!("{}: {e}", p.display()));
                return;
            }
        };
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let mut line = format!(
            "{rel:?}: mode {:o} owner {}:{} links {} size {} mtime {}.{:09} ctime {}.{:09} \
             xattrs {:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            xattrs(p),
        );
        if m.file_type().is_symlink() {
            line += &format!(" -> {:?}", fs::read_link(p).unwrap());
        }
        if m.is_file() {
            use std::hash::{Hash, Hasher};
            use std::io::Read;
            let mut bytes = Vec::new();
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOATIME)
                .open(p)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            line += &format!(" atime {} content {:016x}", m.atime(), h.finish());
        }
        out.push(line);
        if m.is_dir() {
            let mut names: Vec<PathBuf> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                walk(root, &n, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// Fails, naming what changed, unless `before` and `after` (snapshots) agree.
fn assert_unchanged(what: &str, before: &[String], after: &[String], context: &str) {
    let gone: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
    let new: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{what}: kmsfs acted outside the store ({context})\nbefore: {gone:#?}\nafter: {new:#?}"
    );
}

/// Sets the access time of `p` in the past (leaving its modification time).
fn age_atime(p: &Path) {
    let times = [
        libc::timespec {
            tv_sec: OLD_ATIME,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    let c = cstr(p);
    // SAFETY: a valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", io::Error::last_os_error());
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// What the attack swaps on the backing store: the directory `store/n/d` for a symlink to the
/// outside victim directory, or the file `store/n/d/f` for a symlink to the victim's `f`.
#[derive(Clone, Copy, Debug)]
enum Swap {
    Dir,
    File,
}

/// How the attacker holds `f`: open for reading and writing, or as an `O_PATH` descriptor (no
/// open on the daemon's side, so a call by path makes the daemon find the file again).
#[derive(Clone, Copy, Debug)]
enum Hold {
    Fd,
    Path,
}

/// What the attacker holds: `mnt/n`, `mnt/n/<name>` and `mnt/n/<name>/f`, and `src`, a file in
/// `mnt/n` the call may move or link.
struct Held {
    name: &'static str,
    n: OwnedFd,
    dir: OwnedFd,
    file: OwnedFd,
    src: &'static str,
}

/// A root daemon's `--allow-other` mount with `mnt/n` owned by nobody, in which nobody made
/// (through the mount) two identical directories: `d`, the one attacked, and `c`, the control.
/// Each holds `f` (a file), `keep` (a file), `sub/` (an empty directory) and `link` (a symlink
/// to `f`); `mnt/n` also holds
/// the files `x` and `x2`. Outside the store, `outside/` is root's (0700), holding `f` (a byte
/// copy of `store/n/d/f`, as a backup of the store would be, root's, 0600), `keep`,
/// `outside-only` (root's, 0600), `sub/` (empty, 0700) and `link` (a symlink to
/// `/root/outside-only`); `f` carries the xattr
/// `user.secret=outside-only`. A call through the mount that returns `outside-only` has read
/// root's directory.
struct Stage {
    m: Mount,
    outside: PathBuf,
}

impl Stage {
    fn new() -> Option<Stage> {
        if !fuse_available() || !root_available() {
            return None;
        }
        let m = Mount::new(4096, &["--allow-other"]);
        let top = m.backing.parent().unwrap().to_path_buf();
        for p in [&top, &m.backing] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::create_dir(m.p("n")).unwrap();
        std::os::unix::fs::chown(m.p("n"), Some(NOBODY), Some(NOBODY)).unwrap();
        as_nobody(|| {
            for d in ["n/d", "n/c"] {
                fs::create_dir(m.p(d)).unwrap();
                fs::write(m.p(&format!("{d}/f")), pattern(5000, 1)).unwrap();
                fs::write(m.p(&format!("{d}/keep")), b"kept").unwrap();
                fs::create_dir(m.p(&format!("{d}/sub"))).unwrap();
                std::os::unix::fs::symlink("f", m.p(&format!("{d}/link"))).unwrap();
            }
            fs::write(m.p("n/x"), pattern(3000, 2)).unwrap();
            fs::write(m.p("n/x2"), pattern(3000, 3)).unwrap();
        });
        // Backing entries are the daemon's (root's); the store's owner opens this part of
        // the store to nobody, who is then the store attacker there too.
        assert_eq!(fs::metadata(m.b("n/d/f")).unwrap().uid(), 0);
        chown_tree(&m.b("n"), NOBODY);
        // Named now, while the store can be read: the attacker (nobody) asks again.
        for p in ["n/d", "n/d/f", "n/c", "n/c/f"] {
            m.b(p);
        }
        // Root's group on what nobody may chown, so that its chown to itself shows.
        for p in ["n/c", "n/c/f", "n/d", "n/d/f"] {
            std::os::unix::fs::chown(m.p(p), None, Some(0)).unwrap();
        }
        let outside = top.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
        fs::copy(m.b("n/d/f"), outside.join("f")).unwrap();
        fs::write(outside.join("keep"), b"root's own file").unwrap();
        fs::write(outside.join("outside-only"), b"root's secret").unwrap();
        fs::create_dir(outside.join("sub")).unwrap();
        std::os::unix::fs::symlink("/root/outside-only", outside.join("link")).unwrap();
        fs::set_permissions(outside.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        let (f, v) = (cstr(outside.join("f")), b"outside-only");
        // SAFETY: a valid path, name and value of the given length.
        let r = unsafe {
            libc::setxattr(
                f.as_ptr(),
                c"user.secret".as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr: {}", io::Error::last_os_error());
        for f in ["f", "keep", "outside-only"] {
            fs::set_permissions(outside.join(f), fs::Permissions::from_mode(0o600)).unwrap();
            age_atime(&outside.join(f));
        }
        Some(Stage { m, outside })
    }

    /// As nobody: `attack.call` on the control directory `c` (it must succeed), then on `d`
    /// right after `attack.swap`; then the swap is undone. Err says what the daemon did outside
    /// the store (changed the victim, or returned what it holds).
    fn run(&self, attack: &Attack) -> Result<(), String> {
        let m = &self.m;
        let before = snapshot(&self.outside);
        let (control, result, window) = as_nobody(|| {
            let held = |name: &'static str, src: &'static str| {
                let n = open_at(None, m.p("n"), libc::O_RDONLY | libc::O_DIRECTORY);
                let dir = open_at(Some(&n), name, libc::O_RDONLY | libc::O_DIRECTORY);
                let file = match attack.hold {
                    Hold::Fd => open_at(Some(&dir), "f", libc::O_RDWR),
                    Hold::Path => open_at(Some(&dir), "f", libc::O_PATH),
                };
                Held {
                    name,
                    n,
                    dir,
                    file,
                    src,
                }
            };
            let c = held("c", "x2");
            (attack.prepare)(&c).unwrap();
            let control = (attack.call)(&c);
            let d = held("d", "x");
            (attack.prepare)(&d).unwrap();
            let (what, target) = match attack.swap {
                Swap::Dir => (m.b("n/d"), self.outside.clone()),
                Swap::File => (m.b("n/d/f"), self.outside.join("f")),
            };
            let aside = what.with_extension("orig");
            for fd in [&d.n, &d.dir, &d.file] {
                refresh(fd);
            }
            let started = Instant::now();
            fs::rename(&what, &aside).unwrap();
            std::os::unix::fs::symlink(&target, &what).unwrap();
            let result = (attack.call)(&d);
            let window = started.elapsed();
            // Undone as far as the call left it possible (it may have moved the symlink).
            let _ = fs::remove_file(&what);
            let _ = fs::rename(&aside, &what);
            (control, result, window)
        });
        let name = attack.name;
        assert!(
            control.is_ok(),
            "control: {name} on the unswapped directory failed: {control:?}"
        );
        assert!(
            (attack.took_effect)(m),
            "control: {name} on the unswapped directory took no effect"
        );
        if window > Duration::from_millis(900) {
            // The kernel may have asked again and been told of the symlink, so the call may not
            // have reached the daemon: not a failure (nothing acted outside), but said.
            eprintln!("warning: {name} took {window:?}, beyond the kernel's attribute TTL");
        }
        let after = snapshot(&self.outside);
        let gone: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
        let new: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
        let leaked = matches!(&result, Ok(out) if out.contains("outside-only"));
        if gone.is_empty() && new.is_empty() && !leaked {
            return Ok(());
        }
        Err(format!(
            "{name} after a {:?} swap ({:?} held) returned {result:?}{}\n  outside before: \
             {gone:#?}\n  outside after: {new:#?}",
            attack.swap,
            attack.hold,
            if leaked {
                ", which is root's, outside"
            } else {
                ""
            },
        ))
    }
}

/// One call the attacker makes (through what it holds), and how its effect shows through the
/// mount when made on the control directory `c`.
struct Attack {
    name: &'static str,
    swap: Swap,
    hold: Hold,
    /// Made before the swap (on `d` as on `c`).
    prepare: fn(&Held) -> io::Result<String>,
    call: fn(&Held) -> io::Result<String>,
    took_effect: fn(&Mount) -> bool,
}

fn nothing(_: &Held) -> io::Result<String> {
    Ok(String::new())
}

/// Makes each attack on a fresh stage; fails listing every one that reached outside the store.
fn attack(attacks: &[Attack]) {
    let mut escaped = Vec::new();
    for a in attacks {
        let Some(stage) = Stage::new() else { return };
        if let Err(e) = stage.run(a) {
            escaped.push(e);
        }
    }
    assert!(
        escaped.is_empty(),
        "{} of {} attacks made the daemon act outside the store:\n{}",
        escaped.len(),
        attacks.len(),
        escaped.join("\n")
    );
}

fn fchmod(fd: &OwnedFd, mode: u32) -> io::Result<String> {
    // SAFETY: an open descriptor.
    sys(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

fn fchown(fd: &OwnedFd) -> io::Result<String> {
    // SAFETY: an open descriptor; nobody "gives" itself what it has.
    sys(unsafe { libc::fchown(fd.as_raw_fd(), NOBODY, NOBODY) })
}

fn fsetxattr(fd: &OwnedFd) -> io::Result<String> {
    let v = b"attacker";
    // SAFETY: an open descriptor, a C string and a value of the given length.
    sys(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c"user.attack".as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    })
}

/// The value of `user.secret`, if any.
fn fgetxattr(fd: &OwnedFd) -> io::Result<String> {
    let mut v = vec![0u8; 256];
    // SAFETY: an open descriptor, a C string and a buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            c"user.secret".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    v.truncate(n as usize);
    Ok(String::from_utf8_lossy(&v).into_owned())
}

/// Access and modification times of 2002-09-09.
const ATTACK_TIME: i64 = 1_031_529_600;

fn futimens(fd: &OwnedFd) -> io::Result<String> {
    let t = libc::timespec {
        tv_sec: ATTACK_TIME,
        tv_nsec: 0,
    };
    // SAFETY: an open descriptor and two timespecs.
    sys(unsafe { libc::futimens(fd.as_raw_fd(), [t, t].as_ptr()) })
}

fn renameat(from: &OwnedFd, a: &str, to: &OwnedFd, b: &str) -> io::Result<String> {
    let (a, b) = (cstr(a), cstr(b));
    // SAFETY: open directories and C strings.
    sys(unsafe { libc::renameat(from.as_raw_fd(), a.as_ptr(), to.as_raw_fd(), b.as_ptr()) })
}

fn linkat(from: &OwnedFd, a: &str, to: &OwnedFd, b: &str) -> io::Result<String> {
    let (a, b) = (cstr(a), cstr(b));
    // SAFETY: open directories and C strings.
    sys(unsafe { libc::linkat(from.as_raw_fd(), a.as_ptr(), to.as_raw_fd(), b.as_ptr(), 0) })
}

fn unlinkat(dir: &OwnedFd, a: &str, flags: i32) -> io::Result<String> {
    let a = cstr(a);
    // SAFETY: an open directory and a C string.
    sys(unsafe { libc::unlinkat(dir.as_raw_fd(), a.as_ptr(), flags) })
}

fn truncate(path: String, len: i64) -> io::Result<String> {
    let p = cstr(path);
    // SAFETY: a valid C string.
    sys(unsafe { libc::truncate(p.as_ptr(), len) })
}

fn ftruncate(fd: &OwnedFd, len: i64) -> io::Result<String> {
    // SAFETY: an open descriptor.
    sys(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

/// Opens `f` again through the held descriptor and writes at its start.
fn reopen_and_write(h: &Held) -> io::Result<String> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).open(fd_path(&h.file))?;
    f.write_all(b"attacker was here")?;
    f.sync_all()?;
    Ok(String::new())
}

/// Opens `f` again through the held descriptor and reads it (its length: the content is the
/// store's own).
fn reopen_and_read(h: &Held) -> io::Result<String> {
    Ok(format!("{} bytes", fs::read(fd_path(&h.file))?.len()))
}

fn list(path: &str) -> io::Result<String> {
    let mut names: Vec<String> = fs::read_dir(path)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names.join(","))
}

fn exists(m: &Mount, p: &str) -> bool {
    fs::symlink_metadata(m.p(p)).is_ok()
}

fn has_xattr(m: &Mount, p: &str) -> bool {
    xattrs(&m.p(p)).contains(&"user.attack=attacker".to_string())
}

fn mtime_is_attack_time(m: &Mount, p: &str) -> bool {
    fs::metadata(m.p(p)).unwrap().mtime() == ATTACK_TIME
}

fn reads(m: &Mount, p: &str, want: &[u8]) -> bool {
    fs::read(m.p(p)).is_ok_and(|got| got == want)
}

#[test]
fn chmod_through_held_fds_after_a_swap_for_a_symlink_stays_in_the_store() {
    attack(&[
        Attack {
            name: "fchmod of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchmod(&h.file, 0o777),
            took_effect: |m| mode(&m.p("n/c/f")) == 0o777,
        },
        Attack {
            name: "fchmod of a held directory, swapped itself",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchmod(&h.dir, 0o777),
            took_effect: |m| mode(&m.p("n/c")) == 0o777,
        },
        Attack {
            name: "fchmod of a held file, swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchmod(&h.file, 0o777),
            took_effect: |m| mode(&m.p("n/c/f")) == 0o777,
        },
        Attack {
            // A write by someone other than root clears set-id bits: the daemon's chmod.
            name: "write to a held set-user-id file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: |h| fchmod(&h.file, 0o4777),
            call: |h| {
                // SAFETY: an open descriptor and a buffer of the given length.
                let n = unsafe { libc::pwrite(h.file.as_raw_fd(), b"w".as_ptr().cast(), 1, 0) };
                sys(n as libc::c_int)
            },
            took_effect: |m| mode(&m.p("n/c/f")) == 0o777,
        },
    ]);
}

#[test]
fn chown_through_held_fds_after_a_swap_for_a_symlink_stays_in_the_store() {
    // Nobody gives itself what is its own (the group was root's): outside, root's file
    // would become nobody's.
    attack(&[
        Attack {
            name: "fchown of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchown(&h.file),
            took_effect: |m| fs::metadata(m.p("n/c/f")).unwrap().gid() == NOBODY,
        },
        Attack {
            name: "fchown of a held directory, swapped itself",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchown(&h.dir),
            took_effect: |m| fs::metadata(m.p("n/c")).unwrap().gid() == NOBODY,
        },
        Attack {
            name: "fchown of a held file, swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fchown(&h.file),
            took_effect: |m| fs::metadata(m.p("n/c/f")).unwrap().gid() == NOBODY,
        },
    ]);
}

#[test]
fn xattrs_through_held_fds_after_a_swap_for_a_symlink_stay_in_the_store() {
    attack(&[
        Attack {
            name: "fsetxattr of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fsetxattr(&h.file),
            took_effect: |m| has_xattr(m, "n/c/f"),
        },
        Attack {
            name: "fsetxattr of a held directory, swapped itself",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fsetxattr(&h.dir),
            took_effect: |m| has_xattr(m, "n/c"),
        },
        Attack {
            name: "fsetxattr of a held file, swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| fsetxattr(&h.file),
            took_effect: |m| has_xattr(m, "n/c/f"),
        },
        Attack {
            name: "fgetxattr of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            // The control has no user.secret: ENODATA shows the call was answered.
            call: |h| match fgetxattr(&h.file) {
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok("no such xattr".into()),
                other => other,
            },
            took_effect: |_| true,
        },
    ]);
}

#[test]
fn utimes_through_held_fds_after_a_swap_for_a_symlink_stay_in_the_store() {
    attack(&[
        Attack {
            name: "futimens of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| futimens(&h.file),
            took_effect: |m| mtime_is_attack_time(m, "n/c/f"),
        },
        Attack {
            name: "futimens of a held directory, swapped itself",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| futimens(&h.dir),
            took_effect: |m| mtime_is_attack_time(m, "n/c"),
        },
        Attack {
            name: "futimens of a held file, swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| futimens(&h.file),
            took_effect: |m| mtime_is_attack_time(m, "n/c/f"),
        },
    ]);
}

#[test]
fn create_in_a_held_dir_swapped_for_a_symlink_stays_in_the_store() {
    attack(&[
        Attack {
            name: "create (O_CREAT | O_EXCL) in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| {
                // SAFETY: an open directory and a C string.
                fd_of(unsafe {
                    libc::openat(
                        h.dir.as_raw_fd(),
                        c"new".as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    )
                })
                .map(|_| String::new())
            },
            took_effect: |m| m.p("n/c/new").is_file(),
        },
        Attack {
            name: "mkdir in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            // SAFETY: an open directory and a C string.
            call: |h| sys(unsafe { libc::mkdirat(h.dir.as_raw_fd(), c"new".as_ptr(), 0o755) }),
            took_effect: |m| m.p("n/c/new").is_dir(),
        },
        Attack {
            name: "symlink in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| {
                // SAFETY: an open directory and C strings.
                sys(unsafe { libc::symlinkat(c"f".as_ptr(), h.dir.as_raw_fd(), c"new".as_ptr()) })
            },
            took_effect: |m| m.p("n/c/new").is_symlink(),
        },
        Attack {
            name: "mkfifo in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| {
                // SAFETY: an open directory and a C string.
                sys(unsafe {
                    libc::mknodat(h.dir.as_raw_fd(), c"new".as_ptr(), libc::S_IFIFO | 0o644, 0)
                })
            },
            took_effect: |m| exists(m, "n/c/new"),
        },
    ]);
}

#[test]
fn unlink_and_rmdir_after_a_swap_for_a_symlink_stay_in_the_store() {
    attack(&[
        Attack {
            name: "unlink in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| unlinkat(&h.dir, "keep", 0),
            took_effect: |m| !exists(m, "n/c/keep"),
        },
        Attack {
            name: "rmdir in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| unlinkat(&h.dir, "sub", libc::AT_REMOVEDIR),
            took_effect: |m| !exists(m, "n/c/sub"),
        },
        Attack {
            name: "unlink of a file swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| unlinkat(&h.dir, "f", 0),
            took_effect: |m| !exists(m, "n/c/f"),
        },
    ]);
}

#[test]
fn rename_after_a_swap_for_a_symlink_stays_in_the_store() {
    attack(&[
        Attack {
            name: "rename of a store file over a name in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| renameat(&h.n, h.src, &h.dir, "f"),
            took_effect: |m| reads(m, "n/c/f", &pattern(3000, 3)),
        },
        Attack {
            name: "rename out of a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| renameat(&h.dir, "sub", &h.n, &format!("sub-of-{}", h.name)),
            took_effect: |m| m.p("n/sub-of-c").is_dir(),
        },
        Attack {
            name: "rename within a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| renameat(&h.dir, "keep", &h.dir, "keep2"),
            took_effect: |m| reads(m, "n/c/keep2", b"kept"),
        },
        Attack {
            name: "rename of a file swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| renameat(&h.dir, "f", &h.n, &format!("f-of-{}", h.name)),
            took_effect: |m| reads(m, "n/f-of-c", &pattern(5000, 1)),
        },
    ]);
}

#[test]
fn link_after_a_swap_for_a_symlink_stays_in_the_store() {
    attack(&[
        Attack {
            name: "link of a store file into a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| linkat(&h.n, h.src, &h.dir, "linked"),
            took_effect: |m| reads(m, "n/c/linked", &pattern(3000, 3)),
        },
        Attack {
            name: "link out of a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| linkat(&h.dir, "keep", &h.n, &format!("keep-of-{}", h.name)),
            took_effect: |m| reads(m, "n/keep-of-c", b"kept"),
        },
        Attack {
            name: "link of a file swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| linkat(&h.dir, "f", &h.n, &format!("f-of-{}", h.name)),
            took_effect: |m| reads(m, "n/f-of-c", &pattern(5000, 1)),
        },
    ]);
}

#[test]
fn truncate_after_a_swap_for_a_symlink_stays_in_the_store() {
    attack(&[
        Attack {
            name: "truncate by path of a file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Path,
            prepare: nothing,
            call: |h| truncate(fd_path(&h.file), 10),
            took_effect: |m| reads(m, "n/c/f", &pattern(10, 1)),
        },
        Attack {
            name: "ftruncate of a held file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| ftruncate(&h.file, 10),
            took_effect: |m| reads(m, "n/c/f", &pattern(10, 1)),
        },
        Attack {
            name: "truncate by path of a file swapped itself",
            swap: Swap::File,
            hold: Hold::Path,
            prepare: nothing,
            call: |h| truncate(fd_path(&h.file), 10),
            took_effect: |m| reads(m, "n/c/f", &pattern(10, 1)),
        },
        Attack {
            name: "ftruncate of a held file, swapped itself",
            swap: Swap::File,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| ftruncate(&h.file, 10),
            took_effect: |m| reads(m, "n/c/f", &pattern(10, 1)),
        },
    ]);
}

#[test]
fn open_read_and_write_after_a_swap_for_a_symlink_stay_in_the_store() {
    let written =
        |m: &Mount| fs::read(m.p("n/c/f")).is_ok_and(|d| d.starts_with(b"attacker was here"));
    attack(&[
        Attack {
            name: "reopen and write a file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Path,
            prepare: nothing,
            call: reopen_and_write,
            took_effect: written,
        },
        Attack {
            name: "reopen and write a file swapped itself",
            swap: Swap::File,
            hold: Hold::Path,
            prepare: nothing,
            call: reopen_and_write,
            took_effect: written,
        },
        Attack {
            name: "reopen and read a file, its directory swapped",
            swap: Swap::Dir,
            hold: Hold::Path,
            prepare: nothing,
            call: reopen_and_read,
            took_effect: |_| true,
        },
        Attack {
            name: "reopen and read a file swapped itself",
            swap: Swap::File,
            hold: Hold::Path,
            prepare: nothing,
            call: reopen_and_read,
            took_effect: |_| true,
        },
    ]);
}

#[test]
fn listing_and_readlink_in_a_held_dir_swapped_for_a_symlink_show_nothing_outside() {
    attack(&[
        Attack {
            name: "readlink in a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| {
                let mut buf = vec![0u8; 4096];
                // SAFETY: an open directory, a C string and a buffer of the given length.
                let n = unsafe {
                    libc::readlinkat(
                        h.dir.as_raw_fd(),
                        c"link".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            },
            took_effect: |m| fs::read_link(m.p("n/c/link")).is_ok_and(|t| t == Path::new("f")),
        },
        Attack {
            name: "list a held directory, swapped",
            swap: Swap::Dir,
            hold: Hold::Fd,
            prepare: nothing,
            call: |h| list(&fd_path(&h.dir)),
            took_effect: |m| list(m.p("n/c").to_str().unwrap()).is_ok_and(|l| l.contains("keep")),
        },
    ]);
}

/// `store/f` is swapped for a fifo while the kernel still takes `mnt/f` for a regular file: a
/// read through the mount must fail (EIO) within seconds, not leave a daemon thread waiting
/// for a writer that never comes.
fn fifo_in_a_files_place(read_only: bool) {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("f"), pattern(5000, 4)).unwrap();
    fs::write(m.p("g"), pattern(5000, 5)).unwrap();
    if read_only {
        m.set_extra(&["--read-only"]);
        m.remount();
    }
    // Control: the file reads before the swap.
    assert_eq!(fs::read(m.p("f")).unwrap(), pattern(5000, 4));
    let held = open_at(None, m.p("f"), libc::O_PATH);
    refresh(&held);
    fs::rename(m.b("f"), m.b("f.orig")).unwrap();
    let fifo = cstr(m.b("f"));
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("/proc/self/fd/{}", held.as_raw_fd());
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(path));
    });
    let mut result = rx.recv_timeout(Duration::from_secs(5));
    let hung = result.is_err();
    if hung {
        // Let the daemon go: a writer appears and leaves at once.
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(m.b("f"));
        result = rx.recv_timeout(Duration::from_secs(10));
    }
    assert!(
        !hung,
        "reading a file swapped for a fifo hung the daemon (then, with a writer: {result:?})"
    );
    let err = result.unwrap().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The daemon still serves the rest.
    assert_eq!(fs::read(m.p("g")).unwrap(), pattern(5000, 5));
}

#[test]
fn reading_a_file_swapped_for_a_fifo_gives_eio_without_hanging() {
    fifo_in_a_files_place(false);
}

#[test]
fn reading_a_file_swapped_for_a_fifo_on_a_read_only_mount_gives_eio_without_hanging() {
    fifo_in_a_files_place(true);
}

/// A genuine rebind record naming `/a`, as a rename of `/a` cut short leaves it: written by
/// the volume's own journal (records are MACed under the volume key, so a hand-made one would
/// be ignored and prove nothing). The volume must not be mounted.
fn record(m: &Mount) -> Vec<u8> {
    let volume = kmsfs::core::Volume::open(
        &m.backing,
        &kmsfs::core::OpenOptions {
            pin: vec![kmsfs::keys::spec::KeySpec::Local(m.key.clone())],
            ..Default::default()
        },
    )
    .unwrap();
    let journal = kmsfs::core::journal::Journal::new(&volume, false).unwrap();
    let pending = m.b(".kmsfs/pending");
    let before: Vec<_> = fs::read_dir(&pending)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let written = journal.begin(&[common::path("a")]).unwrap();
    let new = fs::read_dir(&pending)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !before.contains(p))
        .unwrap();
    let bytes = fs::read(new).unwrap();
    written.finish();
    bytes
}
/// A record's name as the daemon makes them (stamp, pid, counter).
const LEFT: &str = "0000000000000000187a5c1f00000000-4242-0";

/// A stopped volume with the file `/a`, whose writable mounts are shown to read the rebind
/// journal (the positive control of the journal attacks): a record left in `.kmsfs/pending/`
/// (made there by the daemon, for a rename) is tidied and gone after a mount, and another after
/// `kmsfs fsck --repair`.
fn journal_volume() -> Option<Mount> {
    if !fuse_available() || !root_available() {
        return None;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("b"), pattern(100, 6)).unwrap();
    fs::rename(m.p("b"), m.p("a")).unwrap();
    m.stop();
    let pending = m.b(".kmsfs/pending");
    assert!(
        pending.is_dir(),
        "control: a rename made no journal directory"
    );
    fs::write(pending.join(LEFT), record(&m)).unwrap();
    m.start();
    m.stop();
    assert!(
        !pending.join(LEFT).exists(),
        "control: a mount left a record in place"
    );
    fs::write(pending.join(LEFT), record(&m)).unwrap();
    let fsck = fsck_repair(&m);
    assert!(
        !pending.join(LEFT).exists(),
        "control: fsck --repair left a record in place: {fsck}"
    );
    Some(m)
}

fn fsck_repair(m: &Mount) -> String {
    let out = kmsfs()
        .arg("fsck")
        .arg(&m.backing)
        .arg("--repair")
        .arg("--key")
        .arg(format!("local:{}", m.key.display()))
        .output()
        .unwrap();
    format!(
        "fsck --repair: {} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Root's directory outside the store, with files that look like rebind records and some that
/// do not, and a subdirectory.
fn outside_records(m: &Mount, name: &str) -> PathBuf {
    let dir = m.backing.parent().unwrap().join(name);
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("0001-torn"), b"root's own file").unwrap();
    fs::write(dir.join("0002-record"), record(m)).unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/inner"), b"root's own file").unwrap();
    for f in ["0001-torn", "0002-record", "sub/inner"] {
        age_atime(&dir.join(f));
    }
    dir
}

/// What reads the journal of a stopped volume.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// A writable mount (which then renames `/a` through the mount, if it mounted).
    Mount,
    /// `kmsfs fsck --repair`.
    FsckRepair,
}

/// A journal volume on which `setup` puts a symlink to root's directory outside the store
/// (which it returns); after `reader` reads the journal, that directory must be as it was.
fn journal_attack(reader: Reader, setup: fn(&Mount) -> PathBuf) {
    let Some(mut m) = journal_volume() else {
        return;
    };
    let outside = setup(&m);
    let before = snapshot(&outside);
    let what = match reader {
        Reader::Mount => {
            let mounted = m.try_start();
            let renamed = mounted.as_ref().map(|()| fs::rename(m.p("a"), m.p("b")));
            m.stop();
            format!("mount: {mounted:?}, rename: {renamed:?}")
        }
        Reader::FsckRepair => fsck_repair(&m),
    };
    assert_unchanged(&format!("{reader:?}"), &before, &snapshot(&outside), &what);
}

/// `.kmsfs/pending` is a symlink to root's directory of files (some look like records).
fn pending_dir_symlinked(m: &Mount) -> PathBuf {
    let outside = outside_records(m, "outside");
    let pending = m.b(".kmsfs/pending");
    fs::remove_dir_all(&pending).unwrap();
    std::os::unix::fs::symlink(&outside, &pending).unwrap();
    outside
}

/// Records in `.kmsfs/pending` are symlinks to root's files.
fn pending_records_symlinked(m: &Mount) -> PathBuf {
    let outside = outside_records(m, "outside");
    for f in ["0001-torn", "0002-record"] {
        std::os::unix::fs::symlink(outside.join(f), m.b(".kmsfs/pending").join(f)).unwrap();
    }
    outside
}

/// `.kmsfs` itself is a symlink to root's copy of it outside the store (an authentic config:
/// the old daemon opens the volume through it), with things in its journal.
fn kmsfs_dir_symlinked(m: &Mount) -> PathBuf {
    let outside = m.backing.parent().unwrap().join("outside-kmsfs");
    copy_tree(&m.b(".kmsfs"), &outside);
    fs::create_dir_all(outside.join("pending")).unwrap();
    fs::write(outside.join("pending/0001-torn"), b"root's own file").unwrap();
    fs::write(outside.join("pending/0002-record"), record(m)).unwrap();
    for f in ["pending/0001-torn", "pending/0002-record"] {
        age_atime(&outside.join(f));
    }
    fs::remove_dir_all(m.b(".kmsfs")).unwrap();
    std::os::unix::fs::symlink(&outside, m.b(".kmsfs")).unwrap();
    outside
}

#[test]
fn a_pending_dir_symlinked_outside_is_left_alone_by_a_writable_mount() {
    journal_attack(Reader::Mount, pending_dir_symlinked);
}

#[test]
fn a_pending_dir_symlinked_outside_is_left_alone_by_fsck_repair() {
    journal_attack(Reader::FsckRepair, pending_dir_symlinked);
}

#[test]
fn pending_records_symlinked_outside_are_not_read_by_a_writable_mount() {
    journal_attack(Reader::Mount, pending_records_symlinked);
}

#[test]
fn pending_records_symlinked_outside_are_not_read_by_fsck_repair() {
    journal_attack(Reader::FsckRepair, pending_records_symlinked);
}

#[test]
fn a_kmsfs_dir_symlinked_outside_is_left_alone_by_a_writable_mount() {
    journal_attack(Reader::Mount, kmsfs_dir_symlinked);
}

#[test]
fn a_kmsfs_dir_symlinked_outside_is_left_alone_by_fsck_repair() {
    journal_attack(Reader::FsckRepair, kmsfs_dir_symlinked);
}

/// Copies a directory tree (files, directories), keeping modes.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir(to).unwrap();
    fs::set_permissions(to, fs::metadata(from).unwrap().permissions()).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_pending_dir_swapped_for_a_symlink_while_mounted_gets_no_record_outside() {
    if !fuse_available() || !root_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::write(m.p("a"), pattern(100, 7)).unwrap();
    // Control: a rename writes (and removes) a record in the real journal directory (which
    // the first one makes).
    fs::rename(m.p("a"), m.p("a2")).unwrap();
    let pending = m.b(".kmsfs/pending");
    let stamp = || fs::metadata(&pending).map(|m| (m.mtime(), m.mtime_nsec()));
    let was = stamp().unwrap();
    fs::rename(m.p("a2"), m.p("b")).unwrap();
    assert_ne!(stamp().unwrap(), was, "control: a rename wrote no record");
    let outside = outside_records(&m, "outside");
    fs::remove_dir_all(&pending).unwrap();
    std::os::unix::fs::symlink(&outside, &pending).unwrap();
    let before = snapshot(&outside);
    let renamed = fs::rename(m.p("b"), m.p("c"));
    let linked = fs::hard_link(m.p("b"), m.p("d")).or_else(|_| fs::hard_link(m.p("c"), m.p("d")));
    assert_unchanged(
        "a rename and a link through the mount",
        &before,
        &snapshot(&outside),
        &format!("rename: {renamed:?}, link: {linked:?}"),
    );
}

/// Names in a buffer of inotify events.
/// An inotify descriptor reporting every entry that appears in `dir`: made there, or renamed
/// into it (kmsfs makes new directories, nodes and symlinks in its staging directory first).
fn watch_new_entries(dir: &Path) -> OwnedFd {
    let watched = cstr(dir);
    // SAFETY: inotify_init1 has no preconditions; the descriptor is owned below.
    let ino = fd_of(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) }).unwrap();
    let mask = libc::IN_CREATE | libc::IN_MOVED_TO;
    // SAFETY: an inotify descriptor and a valid path.
    let wd = unsafe { libc::inotify_add_watch(ino.as_raw_fd(), watched.as_ptr(), mask) };
    assert!(wd >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
    ino
}

fn inotify_names(buf: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    let head = std::mem::size_of::<libc::inotify_event>();
    while at + head <= buf.len() {
        let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
        let name = &buf[at + head..at + head + len];
        let end = name.iter().position(|&b| b == 0).unwrap_or(len);
        names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        at += head + len;
    }
    names
}

/// Whether a backing name the racers see appear is one of the entries the test makes through
/// the mount (`r0`, `r1`, ...; encrypted, any name kmsfs writes for an entry).
fn made_by_the_test(name: &str) -> bool {
    if common::plaintext_names() {
        name.starts_with('r')
    } else {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// Not deterministic, so bounded: nobody watches its backing directory with inotify and,
/// the moment the daemon makes a new entry there (a create or mkdir through the mount), swaps
/// it for a symlink to root's file, between the daemon making the entry and setting its mode.
/// Root's file must keep its mode however often the race is won. (Positive control: entries
/// made in `c` get the mode asked for.)
#[test]
fn create_and_mkdir_raced_by_a_symlink_on_the_store_stay_in_the_store() {
    const ROUNDS: usize = 150;
    let Some(s) = Stage::new() else { return };
    let m = &s.m;
    let before = snapshot(&s.outside);
    let victim = s.outside.join("keep");
    let d_backing = m.b("n/d");
    let (won, results) = as_nobody(|| {
        let ino = watch_new_entries(&d_backing);
        std::thread::scope(|scope| {
            // The racer (nobody too: a thread has its creator's credentials).
            let racer = scope.spawn(|| {
                let mut won = 0;
                let mut swapped = std::collections::HashSet::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    // SAFETY: an inotify descriptor and a buffer of the given length.
                    let n =
                        unsafe { libc::read(ino.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    assert!(n > 0, "inotify read: {}", io::Error::last_os_error());
                    for name in inotify_names(&buf[..n as usize]) {
                        if name == "stop" {
                            return won;
                        }
                        if made_by_the_test(&name)
                            && !name.ends_with(".orig")
                            && swapped.insert(name.clone())
                        {
                            let at = d_backing.join(&name);
                            if fs::rename(&at, d_backing.join(format!("{name}.orig"))).is_ok()
                                && std::os::unix::fs::symlink(&victim, &at).is_ok()
                            {
                                won += 1;
                            }
                        }
                    }
                }
            });
            let mut results = Vec::new();
            for i in 0..ROUNDS {
                let p = m.p(&format!("n/d/r{i}"));
                let made = if i % 2 == 0 {
                    use std::os::unix::fs::OpenOptionsExt;
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o640)
                        .open(&p)
                        .map(drop)
                } else {
                    use std::os::unix::fs::DirBuilderExt;
                    fs::DirBuilder::new().mode(0o750).create(&p)
                };
                results.push(made.map_err(|e| e.to_string()));
            }
            // Straight on the store: the racer sees this name as it is, in either name mode.
            fs::create_dir(d_backing.join("stop")).unwrap();
            (racer.join().unwrap(), results)
        })
    });
    // Control: what is made where nobody races gets the mode asked for (umask 022 aside).
    as_nobody(|| {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(m.p("n/c/made"))
            .unwrap();
        fs::DirBuilder::new()
            .mode(0o750)
            .create(m.p("n/c/made-dir"))
            .unwrap();
    });
    assert_eq!(mode(&m.p("n/c/made")), 0o640, "control: create");
    assert_eq!(mode(&m.p("n/c/made-dir")), 0o750, "control: mkdir");
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_unchanged(
        "creates raced by a symlink",
        &before,
        &snapshot(&s.outside),
        &format!("{won} of {ROUNDS} new entries swapped (in time or not); {failed} calls failed"),
    );
    eprintln!("{won} of {ROUNDS} entries swapped, {failed} calls failed; root's file unchanged");
}

/// The red team's race: nobody hard-links a root-owned file it may write (root's group, mode
/// 0666, outside the store on the same filesystem) into its own backing directory, then, as
/// each new directory, fifo or symlink made through the mount appears there, exchanges it with
/// that link (`RENAME_EXCHANGE`), in a set-group-id directory. A daemon that set the owner and
/// mode by name after making the entry would chown root's file to nobody and give it the
/// fifo's set-id bits with root's group. The owner and mode are set before the entry has its
/// name, so the file outside keeps its owner, group and mode.
#[test]
fn new_entries_exchanged_with_a_hard_link_leave_the_linked_file_alone() {
    const ROUNDS: usize = 120;
    let Some(s) = Stage::new() else { return };
    let m = &s.m;
    let victim = m.backing.parent().unwrap().join("shared-rw");
    fs::write(&victim, b"root's file others may write").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o666)).unwrap();
    let owner = |p: &Path| {
        let st = fs::metadata(p).unwrap();
        (st.uid(), st.gid(), st.mode() & 0o7777)
    };
    let before = owner(&victim);
    // Set-group-id, root's group: what made the red team's fifo setgid-root.
    std::os::unix::fs::chown(m.p("n/d"), None, Some(0)).unwrap();
    fs::set_permissions(m.p("n/d"), fs::Permissions::from_mode(0o2777)).unwrap();
    let d_backing = m.b("n/d");
    let (won, failed) = as_nobody(|| {
        // Nobody may link root's file: protected_hardlinks allows a file it may write.
        fs::hard_link(&victim, d_backing.join("L-probe")).expect("a hard link to root's file");
        let ino = watch_new_entries(&d_backing);
        std::thread::scope(|scope| {
            let racer = scope.spawn(|| {
                let mut won = 0;
                let mut seen = std::collections::HashSet::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    // SAFETY: an inotify descriptor and a buffer of the given length.
                    let n =
                        unsafe { libc::read(ino.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    assert!(n > 0, "inotify read: {}", io::Error::last_os_error());
                    for name in inotify_names(&buf[..n as usize]) {
                        if name == "stop" {
                            return won;
                        }
                        if !made_by_the_test(&name) || !seen.insert(name.clone()) {
                            continue;
                        }
                        // A fresh link per entry, exchanged with it and left there.
                        seen.insert(format!("L{name}"));
                        let link = d_backing.join(format!("L{name}"));
                        if fs::hard_link(&victim, &link).is_err() {
                            continue;
                        }
                        let (at, l) = (cstr(d_backing.join(&name)), cstr(&link));
                        // SAFETY: two valid paths; the exchange swaps the two names.
                        let r = unsafe {
                            libc::renameat2(
                                libc::AT_FDCWD,
                                at.as_ptr(),
                                libc::AT_FDCWD,
                                l.as_ptr(),
                                libc::RENAME_EXCHANGE,
                            )
                        };
                        won += usize::from(r == 0);
                    }
                }
            });
            let mut failed = 0;
            for i in 0..ROUNDS {
                let p = m.p(&format!("n/d/r{i}"));
                let made = match i % 3 {
                    0 => {
                        use std::os::unix::fs::DirBuilderExt;
                        fs::DirBuilder::new().mode(0o750).create(&p)
                    }
                    1 => {
                        let c = cstr(&p);
                        // SAFETY: a valid path; a fifo asking for set-id bits.
                        match unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | 0o6755, 0) } {
                            0 => Ok(()),
                            _ => Err(io::Error::last_os_error()),
                        }
                    }
                    _ => std::os::unix::fs::symlink("target", &p),
                };
                failed += usize::from(made.is_err());
            }
            // Straight on the store: the racer sees this name as it is, in either name mode.
            fs::create_dir(d_backing.join("stop")).unwrap();
            (racer.join().unwrap(), failed)
        })
    });
    // Control: made where nobody races, the entries get their owner, group and mode (as the
    // mount shows them: the authenticated ones; backing entries carry none).
    as_nobody(|| {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o750)
            .create(m.p("n/d/made-dir"))
            .unwrap();
    });
    assert_eq!(
        owner(&m.p("n/d/made-dir")),
        (NOBODY, 0, 0o2750),
        "control: a new directory is nobody's, in root's group, set-group-id"
    );
    assert!(
        won > 0,
        "the racer never exchanged an entry: the test proves nothing"
    );
    assert_eq!(
        owner(&victim),
        before,
        "root's file changed owner or mode ({won} of {ROUNDS} entries exchanged, {failed} calls failed)"
    );
    eprintln!("{won} of {ROUNDS} entries exchanged, {failed} calls failed; root's file unchanged");
}

/// A local user who can open a backing file (0644 by default) holds `flock(LOCK_EX)` on it
/// forever. Header updates lock a range of kmsfs's own lock file instead, so a rename of that
/// file through the mount (which rewrites its header) and everything after it go on.
#[test]
fn a_lock_held_on_a_backing_file_does_not_stall_the_mount() {
    let Some(s) = Stage::new() else { return };
    let m = &s.m;
    let backing = m.b("n/d/f");
    let backing = &backing;
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let done_rx = std::sync::Mutex::new(done_rx);
            as_nobody(|| {
                let f = fs::File::open(backing).unwrap();
                // SAFETY: flock on an open descriptor.
                assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
                held_tx.send(()).unwrap();
                let _ = done_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            })
        });
        held_rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (from, to) = (m.p("n/d/f"), m.p("n/d/g"));
        scope.spawn(move || tx.send(fs::rename(&from, &to)).unwrap());
        let renamed = rx.recv_timeout(Duration::from_secs(10));
        done_tx.send(()).unwrap();
        let renamed = renamed.expect("the rename waited on the user's lock");
        renamed.unwrap();
    });
    // The file moved with its keys: it reads at its new name.
    assert_eq!(fs::read(m.p("n/d/g")).unwrap(), pattern(5000, 1));
}

// ---------------------------------------------------------------------------------------------
// Issue #15: what the mount shows is authenticated: kinds, symlink targets, modes and owners
// come from headers the store cannot forge; anything on the store kmsfs did not make is not
// shown. Each attack is made on the backing store by its owner while the volume is mounted.

fn errno_of(r: io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn a_file_replaced_by_a_symlink_on_the_store_is_not_shown() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("a.txt"), b"alpha").unwrap();
    fs::write(m.p("b.txt"), b"bravo").unwrap();
    fs::write(m.p("c.txt"), b"charlie").unwrap();
    // Positive control: both read as written.
    assert_eq!(fs::read(m.p("a.txt")).unwrap(), b"alpha");
    // a.txt becomes a symlink to b.txt (authentic content under another name): no content,
    // no type, no target of it is shown (after a remount: the kernel caches what it saw for a
    // second, and a live mount is attacked in `attacks_while_mounted_...` above).
    fs::remove_file(m.b("a.txt")).unwrap();
    std::os::unix::fs::symlink(m.b("b.txt").file_name().unwrap(), m.b("a.txt")).unwrap();
    m.remount();
    assert_eq!(errno_of(fs::read(m.p("a.txt"))), Some(libc::EIO));
    assert_eq!(
        errno_of(fs::symlink_metadata(m.p("a.txt"))),
        Some(libc::EIO)
    );
    assert_eq!(errno_of(fs::read_link(m.p("a.txt"))), Some(libc::EIO));
    // A symlink planted outright, to a file outside the store, likewise (a name the kernel
    // has not seen).
    std::os::unix::fs::symlink("/etc/hostname", m.b("planted")).unwrap();
    assert_eq!(errno_of(fs::read(m.p("planted"))), Some(libc::EIO));
    assert_eq!(errno_of(fs::read_link(m.p("planted"))), Some(libc::EIO));
    // The untouched files still read.
    assert_eq!(fs::read(m.p("b.txt")).unwrap(), b"bravo");
    assert_eq!(fs::read(m.p("c.txt")).unwrap(), b"charlie");
    let log = m.log();
    assert!(
        log.contains(&format!(
            "{}: a symlink on the backing store, which kmsfs did not make",
            m.stored("a.txt")
        )),
        "{log}"
    );
}

#[test]
fn symlinks_are_encrypted_objects_bound_to_their_path() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/target-of-the-link"), b"t").unwrap();
    std::os::unix::fs::symlink("target-of-the-link", m.p("d/l1")).unwrap();
    std::os::unix::fs::symlink("target-of-the-link", m.p("d/l2")).unwrap();
    assert_eq!(
        fs::read_link(m.p("d/l1")).unwrap(),
        Path::new("target-of-the-link")
    );
    assert_eq!(fs::read(m.p("d/l1")).unwrap(), b"t");
    // On the store: regular files, and the target appears in none of them.
    for l in ["d/l1", "d/l2"] {
        let meta = fs::symlink_metadata(m.b(l)).unwrap();
        assert!(meta.file_type().is_file(), "{l}");
        let raw = fs::read(m.b(l)).unwrap();
        assert!(!raw.windows(18).any(|w| w == b"target-of-the-link"), "{l}");
    }
    // Swapping two symlinks' objects on the store: neither is shown.
    let (a, b) = (
        fs::read(m.b("d/l1")).unwrap(),
        fs::read(m.b("d/l2")).unwrap(),
    );
    fs::write(m.b("d/l1"), &b).unwrap();
    fs::write(m.b("d/l2"), &a).unwrap();
    m.remount();
    assert_eq!(errno_of(fs::read_link(m.p("d/l1"))), Some(libc::EIO));
    fs::write(m.b("d/l1"), &a).unwrap();
    fs::write(m.b("d/l2"), &b).unwrap();
    m.remount();
    // Positive control: put back, both are symlinks again; a rename through the mount rebinds
    // one (its own directory and a whole directory's), and it keeps its target.
    assert_eq!(
        fs::read_link(m.p("d/l2")).unwrap(),
        Path::new("target-of-the-link")
    );
    fs::rename(m.p("d/l1"), m.p("d/renamed")).unwrap();
    fs::rename(m.p("d"), m.p("e")).unwrap();
    m.remount();
    assert_eq!(
        fs::read_link(m.p("e/renamed")).unwrap(),
        Path::new("target-of-the-link")
    );
    assert_eq!(fs::read(m.p("e/l2")).unwrap(), b"t");
    // Moved on the store (not through the mount): not shown.
    fs::rename(m.b("e/renamed"), m.b("e/moved")).unwrap();
    assert_eq!(errno_of(fs::read_link(m.p("e/moved"))), Some(libc::EIO));
}

#[test]
fn modes_and_owners_shown_are_the_authenticated_ones() {
    if !fuse_available() || !root_available() {
        return;
    }
    let mut m = Mount::new(4096, &["--allow-other"]);
    let top = m.backing.parent().unwrap().to_path_buf();
    fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.p("secret"), b"the owner's eyes only").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("shared"), b"for everyone").unwrap();
    fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.p("private")).unwrap();
    fs::set_permissions(m.p("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.p("private/inner"), b"inner").unwrap();
    fs::set_permissions(m.p("private/inner"), fs::Permissions::from_mode(0o644)).unwrap();
    let nobody_reads = |p: PathBuf| as_nobody(move || fs::read(p).map_err(|e| e.raw_os_error()));
    // Positive control: nobody reads the shared file, not the others.
    assert_eq!(nobody_reads(m.p("shared")).unwrap(), b"for everyone");
    assert_eq!(nobody_reads(m.p("secret")), Err(Some(libc::EACCES)));
    assert_eq!(nobody_reads(m.p("private/inner")), Err(Some(libc::EACCES)));

    // The store's owner opens everything up on the store: modes, owners, set-id bits.
    for p in ["secret", "private", "private/inner", "private/.kmsfs-dir"] {
        fs::set_permissions(m.b(p), fs::Permissions::from_mode(0o4777)).unwrap();
        std::os::unix::fs::chown(m.b(p), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    m.remount();
    for p in ["secret", "private", "private/inner"] {
        let meta = fs::metadata(m.p(p)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{p}");
        assert_eq!(meta.mode() & 0o4000, 0, "{p}");
    }
    assert_eq!(fs::metadata(m.p("secret")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::metadata(m.p("private")).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(nobody_reads(m.p("secret")), Err(Some(libc::EACCES)));
    assert_eq!(nobody_reads(m.p("private/inner")), Err(Some(libc::EACCES)));

    // An edit of a header's mode bytes on the store (a file whose only slot says 0600; the
    // checksum fixed, as anyone can): the file is not shown at all.
    let made = fs::File::options()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(m.p("edited"))
        .unwrap();
    drop(made);
    let mut raw = fs::read(m.b("edited")).unwrap();
    assert_eq!(
        raw[77..79],
        [0x01, 0x80],
        "mode 0600 at its documented offset"
    );
    raw[78] = 0xa4; // 0644
    let slot = u32::from_be_bytes(raw[12..16].try_into().unwrap()) as usize;
    let sum = kmsfs::format::header::slot_checksum(
        raw[..64].try_into().unwrap(),
        &raw[64..64 + slot - 16],
    );
    raw[64 + slot - 16..64 + slot].copy_from_slice(&sum);
    fs::write(m.b("edited"), &raw).unwrap();
    m.remount();
    assert_eq!(errno_of(fs::metadata(m.p("edited"))), Some(libc::EIO));
    assert_eq!(nobody_reads(m.p("edited")), Err(Some(libc::EIO)));
    // A directory's record swapped for another's (here: the root's, which is 0755).
    fs::copy(m.b(".kmsfs-dir"), m.b("private/.kmsfs-dir")).unwrap();
    m.remount();
    assert_eq!(errno_of(fs::metadata(m.p("private"))), Some(libc::EIO));
    assert_eq!(nobody_reads(m.p("private/inner")), Err(Some(libc::EIO)));
    // And one removed: the directory is not shown either.
    fs::remove_file(m.b("private/.kmsfs-dir")).unwrap();
    m.remount();
    assert_eq!(errno_of(fs::metadata(m.p("private"))), Some(libc::EIO));

    // chmod and chown through the mount change what is shown, and nothing on the store's
    // entries (they stay the store owner's business).
    fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("shared"), Some(NOBODY), None).unwrap();
    m.remount();
    let meta = fs::metadata(m.p("shared")).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o640, NOBODY));
    assert_eq!(nobody_reads(m.p("shared")).unwrap(), b"for everyone");
    let backing = fs::metadata(m.b("shared")).unwrap();
    assert_eq!((backing.mode() & 0o7777, backing.uid()), (0o600, 0));
}

#[test]
fn fifos_and_device_nodes_are_objects_and_planted_ones_are_not_shown() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let fifo = CString::new(m.p("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let meta = fs::symlink_metadata(m.p("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert!(fs::symlink_metadata(m.b("fifo")).unwrap().is_file());
    // A fifo planted on the store, and a device node: not shown.
    let planted = CString::new(m.b("planted-fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(planted.as_ptr(), 0o666) }, 0);
    let null = CString::new(m.b("null").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; /dev/null's device number.
    let made = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    m.remount();
    assert_eq!(
        errno_of(fs::symlink_metadata(m.p("planted-fifo"))),
        Some(libc::EIO)
    );
    if made == 0 {
        assert_eq!(errno_of(fs::symlink_metadata(m.p("null"))), Some(libc::EIO));
    }
    // fsck names them; the fifo made through the mount is fine.
    let out = kmsfs()
        .args(["fsck", "--key"])
        .arg(format!("local:{}", m.key.display()))
        .arg(&m.backing)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("/planted-fifo") && text.contains("not-kmsfs"),
        "{text}"
    );
    assert!(!text.contains("/fifo:"), "{text}");
}

// Found by the red team of issue #15: the store writer chooses nothing the mount signs.

/// The key ids of the envelopes in every slot of the backing file `p`.
fn envelope_keys(p: &Path) -> Vec<String> {
    let f = fs::File::open(p).unwrap();
    let (h, _) =
        kmsfs::core::file::read_header(&f, &kmsfs::format::context::CanonicalPath::root()).unwrap();
    let mut ids: Vec<String> = h
        .candidates()
        .iter()
        .flat_map(|(_, c)| c.envelopes.iter().map(|e| e.key.key_id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn a_chmod_or_chown_never_signs_another_objects_header_put_in_place() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::create_dir(m.p("vault")).unwrap();
    fs::set_permissions(m.p("vault"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.p("vault/secret"), b"vault secret").unwrap();
    fs::set_permissions(m.p("vault/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.p("home")).unwrap();
    fs::write(m.p("home/mine"), b"mine").unwrap();
    // Positive control: chmod and chown of one's own objects take effect.
    fs::set_permissions(m.p("home/mine"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("home"), Some(1234), Some(1234)).unwrap();
    assert_eq!(
        fs::metadata(m.p("home/mine")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(fs::metadata(m.p("home")).unwrap().uid(), 1234);
    // The store writer puts the vault's record and the secret's header under the attacker's
    // own names, then the attacker chmods and chowns those names through the mount (with
    // descriptors opened before, so the kernel asks the daemon).
    let (dir_fd, file_fd) = (
        fs::File::open(m.p("home")).unwrap(),
        fs::File::open(m.p("home/mine")).unwrap(),
    );
    let (vault_record, secret) = (
        fs::read(m.b("vault/.kmsfs-dir")).unwrap(),
        fs::read(m.b("vault/secret")).unwrap(),
    );
    // (Named first: with encrypted names, `mine`'s stored name needs home's own record.)
    let (home_record, home_mine) = (m.b("home/.kmsfs-dir"), m.b("home/mine"));
    fs::write(&home_record, &vault_record).unwrap();
    fs::write(&home_mine, &secret).unwrap();
    let dir_chmod = dir_fd.set_permissions(fs::Permissions::from_mode(0o777));
    let file_chmod = file_fd.set_permissions(fs::Permissions::from_mode(0o666));
    let file_chown = std::os::unix::fs::fchown(&file_fd, Some(65534), Some(65534));
    assert!(dir_chmod.is_err() && file_chmod.is_err() && file_chown.is_err());
    // What was signed is still the vault's own, and nothing else: put back on its own path,
    // it shows exactly what its owner set.
    assert_eq!(fs::read(&home_record).unwrap(), vault_record);
    assert_eq!(fs::read(&home_mine).unwrap(), secret);
    m.remount();
    let vault = fs::metadata(m.p("vault")).unwrap();
    assert_eq!((vault.mode() & 0o7777, vault.uid()), (0o700, 0));
    let secret = fs::metadata(m.p("vault/secret")).unwrap();
    assert_eq!((secret.mode() & 0o7777, secret.uid()), (0o600, 0));
    assert_eq!(errno_of(fs::metadata(m.p("home"))), Some(libc::EIO));
}

#[test]
fn a_damaged_newer_slot_does_not_undo_a_chmod() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("diary"), b"dear diary").unwrap();
    fs::set_permissions(m.p("diary"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(m.p("diary"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.p("diary")).unwrap().mode() & 0o7777, 0o600);
    // Flip one checksum byte of each slot in turn: whichever is left says 0600.
    let raw = fs::read(m.b("diary")).unwrap();
    let slot = u32::from_be_bytes(raw[12..16].try_into().unwrap()) as usize;
    for s in 0..2 {
        let mut torn = raw.clone();
        torn[64 + (s + 1) * slot - 1] ^= 1;
        fs::write(m.b("diary"), &torn).unwrap();
        m.remount();
        assert_eq!(
            fs::metadata(m.p("diary")).unwrap().mode() & 0o7777,
            0o600,
            "slot {s} torn"
        );
    }
}

#[test]
fn acls_cannot_be_set_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::create_dir(m.p("d")).unwrap();
    let set = |name: &str, value: &[u8]| {
        let (p, n) = (cstr(m.p("d")), CString::new(name).unwrap());
        // SAFETY: a valid path, name and value of the given length.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error().raw_os_error())
        }
    };
    // Positive control: a user attribute is kept.
    assert_eq!(set("user.note", b"kept"), Ok(()));
    // An ACL giving everyone rwx (version 2, USER_OBJ, GROUP_OBJ, OTHER, all rwx) would open
    // the backing directory itself.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for tag in [0x01u16, 0x04, 0x20] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&7u16.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let before = fs::metadata(m.b("d")).unwrap().mode();
    assert_eq!(
        set("system.posix_acl_access", &acl),
        Err(Some(libc::EOPNOTSUPP))
    );
    assert_eq!(fs::metadata(m.b("d")).unwrap().mode(), before);
    assert_eq!(before & 0o777, 0o700);
}

#[test]
fn a_config_put_back_while_mounted_is_not_followed() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    m.stop();
    let old_config = fs::read(m.b(".kmsfs/config")).unwrap();
    let old_id = envelope_keys_of_config(&old_config);
    let new_key = m.dir.path().join("keys/new.key");
    let out = kmsfs()
        .arg("rewrap")
        .arg(&m.backing)
        .arg("--to-key")
        .arg(format!("local:{}", new_key.display()))
        .arg("--retire-old")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = kmsfs::keys::local::LocalKey::load(&new_key)
        .unwrap()
        .id()
        .to_string();
    for pin in [None, Some(format!("local:{}", new_key.display()))] {
        if let Some(pin) = &pin {
            m.set_extra(&["--pending-creates", "0", "--key", pin]);
        } else {
            m.set_extra(&["--pending-creates", "0"]);
        }
        m.start();
        // Positive control: a new file's key is under the volume's (new) key.
        fs::write(m.p("f1"), b"one").unwrap();
        assert_eq!(envelope_keys(&m.b("f1")), vec![new_id.clone()]);
        // The retired key's config, authentic, put back on the store while mounted.
        let genuine = fs::read(m.b(".kmsfs/config")).unwrap();
        fs::write(m.b(".kmsfs/config"), &old_config).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        fs::write(m.p("f2"), b"two").unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        fs::write(m.p("f3"), b"three").unwrap();
        for f in ["f2", "f3"] {
            assert_eq!(
                envelope_keys(&m.b(f)),
                vec![new_id.clone()],
                "{f} ({pin:?})"
            );
        }
        assert!(
            m.log().contains("not following the trusted keys changed"),
            "{}",
            m.log()
        );
        fs::write(m.b(".kmsfs/config"), &genuine).unwrap();
        m.stop();
        for f in ["f1", "f2", "f3"] {
            fs::remove_file(m.b(f)).unwrap();
        }
    }
    assert_ne!(old_id, new_id);
}

/// The first trusted key id of a config's bytes (parsed, not authenticated).
fn envelope_keys_of_config(bytes: &[u8]) -> String {
    kmsfs::format::config::UnverifiedConfig::parse(bytes)
        .unwrap()
        .claimed()
        .trusted_keys[0]
        .id
        .clone()
}

#[test]
fn a_listing_never_takes_a_kind_from_another_names_header() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::create_dir_all(m.p("pub/dd")).unwrap();
    fs::write(m.p("pub/f"), b"f").unwrap();
    let kinds = |m: &Mount| -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = fs::read_dir(m.p("pub"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.file_type().unwrap().is_dir(),
                )
            })
            .collect();
        out.sort();
        out
    };
    // Positive control (and it warms the daemon's header cache with the record's inode).
    assert_eq!(kinds(&m), [("dd".into(), true), ("f".into(), false)]);
    let _ = fs::metadata(m.p("pub/dd"));
    // The store writer hard-links dd's record under a new name: listed as what a name of no
    // header of its own is (a file whose lookup fails), never as a directory.
    fs::hard_link(m.b("pub/dd/.kmsfs-dir"), m.b("pub/xx")).unwrap();
    assert_eq!(
        kinds(&m),
        [
            ("dd".into(), true),
            ("f".into(), false),
            ("xx".into(), false)
        ]
    );
    assert_eq!(errno_of(fs::metadata(m.p("pub/xx"))), Some(libc::EIO));
}

/// The names in directory `dir` of the mount.
fn listed(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// With encrypted names a name decrypts only in the directory it was written in: an entry
/// moved (or copied) into another directory on the store, under its stored name, is not shown
/// there, nor is a long name whose side record was swapped for another's, and `fsck` names
/// both. Positive control: the same entries in their own directories list and read.
#[test]
fn entries_moved_between_directories_on_the_store_are_not_shown() {
    if !fuse_available() || common::plaintext_names() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    for d in ["a", "b"] {
        fs::create_dir(m.p(d)).unwrap();
    }
    let (l1, l2) = ("x".repeat(200), "y".repeat(200));
    fs::write(m.p("a/secret"), b"a's").unwrap();
    fs::write(m.p(&format!("a/{l1}")), b"long one").unwrap();
    fs::write(m.p(&format!("a/{l2}")), b"long two").unwrap();
    fs::write(m.p("b/other"), b"b's").unwrap();
    assert_eq!(
        listed(&m.p("a")),
        vec!["secret".to_string(), l1.clone(), l2.clone()]
    );
    // The store writer copies a's entry into b under its stored name, and swaps the two long
    // names' side records.
    let from = m.b("a/secret");
    let copied = m.b("b").join(from.file_name().unwrap());
    fs::copy(&from, &copied).unwrap();
    let side = |p: PathBuf| PathBuf::from(format!("{}.name", p.display()));
    let (s1, s2) = (side(m.b(&format!("a/{l1}"))), side(m.b(&format!("a/{l2}"))));
    let (c1, c2) = (fs::read(&s1).unwrap(), fs::read(&s2).unwrap());
    fs::write(&s1, &c2).unwrap();
    fs::write(&s2, &c1).unwrap();
    m.remount();
    assert_eq!(listed(&m.p("b")), vec!["other".to_string()]);
    assert_eq!(listed(&m.p("a")), vec!["secret".to_string()]);
    assert_eq!(fs::read(m.p("a/secret")).unwrap(), b"a's");
    assert_eq!(fs::read(m.p("b/other")).unwrap(), b"b's");
    assert!(
        m.log().contains("whose name kmsfs did not write"),
        "{}",
        m.log()
    );
    m.stop();
    let out = kmsfs()
        .arg("fsck")
        .arg(&m.backing)
        .arg("--key")
        .arg(format!("local:{}", m.key.display()))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert_eq!(report.matches("foreign-name").count(), 3, "{report}");
    // Put back, they list again.
    fs::write(&s1, &c1).unwrap();
    fs::write(&s2, &c2).unwrap();
    fs::remove_file(&copied).unwrap();
    m.start();
    assert_eq!(listed(&m.p("a")), vec!["secret".to_string(), l1, l2]);
}

/// The names in directory `dir` of the mount, as a set.
fn listing_set(dir: &Path) -> std::collections::BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Red team: a directory removed on the store behind the mount leaves its node (and the id
/// the daemon remembers of it); a new directory made through the mount that gets the same
/// backing inode number (ext4 hands a freed number straight back) must name its entries under
/// its own record's id, or they would list while mounted and be gone after a remount.
#[test]
fn a_new_directory_reusing_a_removed_ones_inode_keeps_its_names() {
    if !fuse_available() || common::plaintext_names() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let mut reused = Vec::new();
    for i in 0..5 {
        let old = format!("old{i}");
        fs::create_dir(m.p(&old)).unwrap();
        // A lookup in it has the daemon remember its id (no file: the kernel would keep that
        // inode, whose number ext4 may hand to the next directory, a clash of its own).
        assert!(!m.p(&format!("{old}/x")).exists());
        let ino = fs::metadata(m.p(&old)).unwrap().ino();
        // The attacker (or anyone writing the store) removes it there.
        fs::remove_dir_all(m.b(&old)).unwrap();
        let new = format!("new{i}");
        fs::create_dir(m.p(&new)).unwrap();
        fs::write(m.p(&format!("{new}/report.txt")), "written after").unwrap();
        if fs::metadata(m.p(&new)).unwrap().ino() == ino {
            reused.push(new);
        }
    }
    if reused.is_empty() {
        eprintln!("no inode number was reused on this backing filesystem; nothing shown");
        return;
    }
    m.remount();
    for new in &reused {
        assert_eq!(
            fs::read_to_string(m.p(&format!("{new}/report.txt")))
                .ok()
                .as_deref(),
            Some("written after"),
            "{new} (reusing a removed directory's inode): a file written through the mount \
             is gone after a remount"
        );
    }
}

/// Red team: `fsck --repair` beside a writer (here `kmsfs import`) must never remove a long
/// name's side record between the writer writing it and linking its entry: the name would be
/// lost (the entry's name is only its hash). A young side record without its entry is left.
#[test]
fn fsck_repair_never_unnames_a_file_being_created() {
    if !fuse_available() || common::plaintext_names() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::create_dir(m.p("d")).unwrap();
    let unnamed = unnamed_imports(&m, "z", 60, 256 << 10, || {
        let _ = kmsfs()
            .args(["fsck", "--repair"])
            .arg(&m.backing)
            .output()
            .unwrap();
    });
    assert!(
        unnamed.is_empty(),
        "{} files created beside `fsck --repair` are no longer listed: {unnamed:?}",
        unnamed.len()
    );
}

/// Red team: a failing `rmdir` (the directory is not empty) must never remove the side record
/// of a long name another writer of the store (`kmsfs import`, a second mount) is creating
/// there: side records are only removed with their directory, inside the staging directory.
#[test]
fn a_failing_rmdir_never_unnames_a_file_another_writer_is_creating() {
    if !fuse_available() || common::plaintext_names() {
        return;
    }
    let m = Mount::new(4096, &[]);
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/keep"), "keeps d non-empty").unwrap();
    let unnamed = unnamed_imports(&m, "y", 150, 4, || {
        assert!(fs::remove_dir(m.p("d")).is_err(), "d is not empty");
    });
    assert!(
        unnamed.is_empty(),
        "{} imported files lost their side record to a failing rmdir: {unnamed:?}",
        unnamed.len()
    );
}

/// `kmsfs import`s `n` files of `size` bytes with long names (190 × `letter`, then a number)
/// into `d`, calling `meanwhile` until they are all made; the numbers of those made that `d`
/// does not list.
fn unnamed_imports(
    m: &Mount,
    letter: &str,
    n: usize,
    size: usize,
    mut meanwhile: impl FnMut(),
) -> Vec<usize> {
    let src = m.dir.path().join("src");
    fs::write(&src, vec![7u8; size]).unwrap();
    let long = letter.repeat(190);
    let (backing, long2) = (m.backing.clone(), long.clone());
    let importer = std::thread::spawn(move || {
        (0..n)
            .filter(|i| {
                kmsfs()
                    .arg("import")
                    .arg(&backing)
                    .arg(format!("d/{long2}{i}"))
                    .arg("--from")
                    .arg(&src)
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
            .collect::<Vec<usize>>()
    });
    while !importer.is_finished() {
        meanwhile();
    }
    let made = importer.join().unwrap();
    let listed = listing_set(&m.p("d"));
    made.into_iter()
        .filter(|i| !listed.contains(&format!("{long}{i}")))
        .collect()
}

/// Red team: a side record needs no MAC only because its content must be a long name
/// encrypted in its directory: a short entry's name copied into a side record beside a
/// planted `kmsfs.long.H` entry (H its hash) must not list that name twice.
#[test]
fn a_side_record_holding_a_short_name_is_not_a_name() {
    if !fuse_available() || common::plaintext_names() {
        return;
    }
    use base64::Engine;
    use sha2::Digest;
    let m = Mount::new(4096, &[]);
    fs::create_dir(m.p("q")).unwrap();
    fs::write(m.p("q/patient.txt"), "secret").unwrap();
    let short = m.b("q/patient.txt");
    let s = short.file_name().unwrap().to_str().unwrap().to_string();
    let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&s));
    let dir = short.parent().unwrap();
    fs::hard_link(&short, dir.join(format!("kmsfs.long.{h}"))).unwrap();
    fs::write(dir.join(format!("kmsfs.long.{h}.name")), &s).unwrap();
    let names: Vec<String> = fs::read_dir(m.p("q"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["patient.txt".to_string()],
        "listed twice: {names:?}"
    );
}
