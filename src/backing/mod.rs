//! The backing store: the only code that makes syscalls on it.
//!
//! The store is hostile, while mounted as well as offline: whoever can write to it can replace
//! any entry (a directory kmsfs keeps, a parent of the file the kernel just looked up, the file
//! itself) with a symlink, a fifo or a directory a moment before the daemon acts on it. A
//! daemon that turned names back into host paths and called path-based syscalls would then
//! chmod, create, unlink or read anywhere on the host, as root. So [`Backing`] holds an
//! `O_PATH` descriptor of the backing root and reaches everything beneath it by resolving the
//! stored path *relative to that descriptor* without following any symlink in any component
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`; where
//! `openat2` is missing, a walk that opens one component at a time with `O_NOFOLLOW`).
//!
//! Every change then acts on a descriptor: on the opened object itself (`fchownat` with
//! `AT_EMPTY_PATH`, or `chmod`/`utimensat`/xattrs through `/proc/self/fd/N`, which reaches
//! exactly the inode that descriptor holds), or by name relative to the parent directory's
//! descriptor (`unlinkat`, `renameat2`, `linkat`, `mkdirat`, `mknodat`, `symlinkat`,
//! `openat(O_CREAT | O_EXCL | O_NOFOLLOW)`). A symlink met on the way fails the call with
//! `EIO`; so does an entry of the wrong type (a fifo where a file was, a directory where a
//! symlink was), and a change that names the inode it expects ([`Identity`]) fails with
//! `ESTALE` if another inode stands there now. Nothing is ever done through a symlink.
//!
//! Paths shown in messages are the volume's own (`/a/b`); the backing root's host path appears
//! only where an operator needs it.
//!
//! kmsfs's own directory in the store (`.kmsfs/` and what it holds) is reached as a
//! [`MetaDir`]: opened without following symlinks, refused unless it is a real directory owned
//! by the daemon's uid, and read, written and unlinked only through its descriptor, with a
//! size cap on every read.

// This module is the one place that makes syscalls on the store (see clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags, CWD};

use crate::format::context::CanonicalPath;

/// A longer relative path is resolved in pieces: `openat2` takes at most `PATH_MAX` bytes,
/// and the deepest trees a mount allows are longer than that.
const PIECE: usize = 2048;

/// Directory and inode of a backing entry: what the kernel named when it looked it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    pub fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What a directory entry says of itself, without a stat.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: OsString,
    pub ino: u64,
    /// `libc::DT_*`.
    pub kind: u8,
}

/// The type a backing entry must have for a call to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Anything but a symlink.
    NotSymlink,
    File,
    Dir,
    Symlink,
}

/// Access times: a read-only mount must not write them to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Atime {
    Update,
    Keep,
}

/// The error for an entry that is not what the store should hold there (a symlink, a fifo in
/// a file's place): `EIO`, with what was found.
pub fn hostile(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!(
        "{what} (refused: the backing store changed under the mount)"
    ))
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A symlink met while resolving is `ELOOP`, or `ENOTDIR` where a directory was expected (the
/// kernel only ever asks about paths whose directories it looked up as directories), or
/// `EXDEV` (an escape `RESOLVE_BENEATH` stopped): the store changed under us, never a user
/// error.
fn resolve_err(e: rustix::io::Errno, path: &dyn std::fmt::Display) -> io::Error {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV | rustix::io::Errno::NOTDIR => {
            hostile(format!("{path}: a symlink on the backing store"))
        }
        e => e.into(),
    }
}

fn kind_name(meta: &Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device node"
    }
}

fn check_kind(meta: &Metadata, want: Want, path: &dyn std::fmt::Display) -> io::Result<()> {
    let ft = meta.file_type();
    let ok = match want {
        Want::NotSymlink => !ft.is_symlink(),
        Want::File => ft.is_file(),
        Want::Dir => ft.is_dir(),
        Want::Symlink => ft.is_symlink(),
    };
    if ok {
        Ok(())
    } else {
        Err(hostile(format!(
            "{path}: {} on the backing store where {} was expected",
            kind_name(meta),
            match want {
                Want::NotSymlink => "no symlink",
                Want::File => "a regular file",
                Want::Dir => "a directory",
                Want::Symlink => "a symlink",
            }
        )))
    }
}

/// `ESTALE` when another inode stands where `expect` was (logged once, with the path, by
/// whoever reports the failed call).
fn check_identity(meta: &Metadata, expect: Option<Identity>) -> io::Result<()> {
    match expect {
        Some(id) if id != Identity::of(meta) => Err(errno(libc::ESTALE)),
        _ => Ok(()),
    }
}

fn proc_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

fn metadata_of(fd: &OwnedFd) -> io::Result<Metadata> {
    use std::os::fd::FromRawFd;
    // fstat on an O_PATH descriptor reports the object itself (the symlink, for a symlink).
    // Borrowed as a File without a dup (two syscalls per stat, on every lookup).
    // SAFETY: `fd` is open for the whole call, and ManuallyDrop never closes the borrow.
    let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    file.metadata()
}

/// The relative bytes of a canonical path (empty for the root).
fn relative(path: &CanonicalPath) -> Vec<u8> {
    path.to_relative_path().into_os_string().into_vec()
}

/// Splits relative bytes into pieces of at most [`PIECE`] bytes at component boundaries (a
/// single longer component stays whole; the kernel refuses it with `ENAMETOOLONG`).
fn pieces(rel: &[u8]) -> Vec<&[u8]> {
    if rel.len() <= PIECE {
        return vec![rel];
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut last_cut = None;
    for (i, &b) in rel.iter().enumerate() {
        if b == b'/' {
            if i - start > PIECE {
                if let Some(cut) = last_cut {
                    out.push(&rel[start..cut]);
                    start = cut + 1;
                }
            }
            last_cut = Some(i);
        }
    }
    if rel.len() - start > PIECE {
        if let Some(cut) = last_cut.filter(|&c| c > start) {
            out.push(&rel[start..cut]);
            start = cut + 1;
        }
    }
    out.push(&rel[start..]);
    out
}

/// The backing root, and every syscall kmsfs makes beneath it.
pub struct Backing {
    root: OwnedFd,
    root_path: PathBuf,
    /// `openat2` answered `ENOSYS` (or a test asked for the fallback walk).
    walk: AtomicBool,
    /// Whether other processes may be changing the store now (see [`Presence`]).
    presence: std::sync::Arc<Presence>,
    /// kmsfs's own directory, once checked, for [`Backing::open_locks`]: every write, header
    /// update and pending create opens the lock file, and checking the directory each time
    /// cost five syscalls more. (The descriptor keeps naming the directory that was checked,
    /// whatever is put at its name since.)
    locks_dir: std::sync::OnceLock<MetaDir>,
    /// Descriptors of the lock file through which no lock is held, for the next to use.
    spare_locks: SpareLocks,
}

/// Descriptors of `.kmsfs/header.lock` no lock is held through: opening one costs an
/// `openat`, a `stat` and, later, a `close`; a header update takes one and every open file's
/// data lock holds one. Each is used by one holder at a time (an OFD lock belongs to its
/// descriptor, so two holders of one would not exclude each other), and goes back only with
/// no lock held through it.
#[derive(Default, Clone)]
struct SpareLocks(std::sync::Arc<std::sync::Mutex<Vec<File>>>);

impl SpareLocks {
    /// More than the mount's request threads use at once.
    const KEPT: usize = 64;

    fn take(&self) -> Option<File> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Releases `range` through `file` (taken from a holder being dropped), then keeps it;
    /// if the release fails, the descriptor is closed, which releases.
    fn release(&self, file: Option<File>, range: Range) {
        if let Some(file) = file {
            if unlock_range(&file, range).is_ok() {
                self.put(file);
            }
        }
    }

    /// Keeps `file`, which holds no lock now. (Called from `Drop`: never panics.)
    fn put(&self, file: File) {
        let mut spare = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < Self::KEPT {
            spare.push(file);
        }
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backing({})", self.root_path.display())
    }
}

impl Backing {
    /// Opens the backing root. The operator names it, so symlinks in `root` itself are theirs
    /// to follow; nothing beneath it is followed.
    pub fn open(root: &Path) -> io::Result<Backing> {
        let root_fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Backing {
            root: root_fd,
            root_path: root.to_path_buf(),
            walk: AtomicBool::new(false),
            presence: Default::default(),
            locks_dir: Default::default(),
            spare_locks: Default::default(),
        })
    }

    /// Resolves with the `O_NOFOLLOW` component walk instead of `openat2` (for tests of the
    /// fallback; kernels before 5.6 take it by themselves).
    #[cfg(test)]
    pub fn use_component_walk(&self) {
        self.walk.store(true, Ordering::Relaxed);
    }

    /// The host path of the backing root, for messages and for the operator.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// The root's own metadata.
    pub fn root_metadata(&self) -> io::Result<Metadata> {
        metadata_of(&self.root)
    }

    /// Opens `rel` beneath `dir` with `flags`, following no symlink on the way.
    fn open_beneath(
        &self,
        dir: &OwnedFd,
        rel: &[u8],
        flags: OFlags,
        mode: Mode,
        shown: &dyn std::fmt::Display,
    ) -> io::Result<OwnedFd> {
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        if !self.walk.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(dir, OsStr::from_bytes(rel), flags, mode, resolve) {
                Err(rustix::io::Errno::NOSYS) => self.walk.store(true, Ordering::Relaxed),
                // openat2 asks to be retried when a rename raced with the walk.
                Err(rustix::io::Errno::AGAIN) => {
                    return rustix::fs::openat2(dir, OsStr::from_bytes(rel), flags, mode, resolve)
                        .map_err(|e| resolve_err(e, shown))
                }
                r => return r.map_err(|e| resolve_err(e, shown)),
            }
        }
        // The fallback: one component at a time, none of them followed if it is a symlink.
        let comps: Vec<&[u8]> = rel
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        if comps.iter().any(|c| *c == b"..") {
            return Err(errno(libc::EXDEV));
        }
        let Some((last, dirs)) = comps.split_last() else {
            return rustix::fs::openat(dir, ".", flags, mode).map_err(|e| resolve_err(e, shown));
        };
        let mut cur: Option<OwnedFd> = None;
        for d in dirs {
            let at = cur.as_ref().unwrap_or(dir);
            let next = rustix::fs::openat(
                at,
                OsStr::from_bytes(d),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| resolve_err(e, shown))?;
            cur = Some(next);
        }
        let at = cur.as_ref().unwrap_or(dir);
        rustix::fs::openat(at, OsStr::from_bytes(last), flags | OFlags::NOFOLLOW, mode)
            .map_err(|e| resolve_err(e, shown))
    }

    /// Opens the relative path `rel` beneath the root (in pieces, if long).
    fn resolve_rel(
        &self,
        rel: &[u8],
        flags: OFlags,
        mode: Mode,
        shown: &dyn std::fmt::Display,
    ) -> io::Result<OwnedFd> {
        let parts = pieces(rel);
        let (last, dirs) = parts.split_last().expect("at least one piece");
        let mut cur: Option<OwnedFd> = None;
        for d in dirs {
            let at = cur.as_ref().unwrap_or(&self.root);
            cur = Some(self.open_beneath(
                at,
                d,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                shown,
            )?);
        }
        let at = cur.as_ref().unwrap_or(&self.root);
        self.open_beneath(at, last, flags | OFlags::CLOEXEC, mode, shown)
    }

    fn resolve(&self, path: &CanonicalPath, flags: OFlags) -> io::Result<OwnedFd> {
        self.resolve_rel(&relative(path), flags, Mode::empty(), path)
    }

    /// The directory holding `path` (an `O_PATH` descriptor) and the entry's name in it.
    fn parent(&self, path: &CanonicalPath) -> io::Result<(OwnedFd, CString)> {
        let rel = relative(path);
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(cut) => (&rel[..cut], &rel[cut + 1..]),
            None => (&b""[..], &rel[..]),
        };
        if name.is_empty() {
            return Err(errno(libc::EINVAL));
        }
        let fd = self.resolve_rel(
            dir,
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
            &format_args!("the directory of {path}"),
        )?;
        Ok((fd, CString::new(name).map_err(|_| errno(libc::EINVAL))?))
    }

    /// An `O_PATH` descriptor of the entry itself (a symlink stays a symlink), with its
    /// metadata, checked for type and identity.
    fn object(
        &self,
        path: &CanonicalPath,
        want: Want,
        expect: Option<Identity>,
    ) -> io::Result<(OwnedFd, Metadata)> {
        let fd = self.resolve(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        let meta = metadata_of(&fd)?;
        check_kind(&meta, want, path)?;
        check_identity(&meta, expect)?;
        Ok((fd, meta))
    }

    /// `lstat`, keeping the entry's `O_PATH` descriptor: a stat that must then read a regular
    /// file's first bytes opens that very inode, without resolving the path again.
    pub fn lookup(&self, path: &CanonicalPath) -> io::Result<Found> {
        let fd = self.resolve(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        let meta = metadata_of(&fd)?;
        Ok(Found { fd, meta })
    }

    /// `lstat`: the entry itself, whatever it is.
    pub fn metadata(&self, path: &CanonicalPath) -> io::Result<Metadata> {
        self.lookup(path).map(|found| found.meta)
    }

    /// Whether something (anything) stands at `path`.
    pub fn exists(&self, path: &CanonicalPath) -> bool {
        self.metadata(path).is_ok()
    }

    /// Opens a regular file for reading (and writing). Anything else standing there (a
    /// symlink, a fifo, a device node, a directory) is refused before it is opened for I/O,
    /// so opening it can neither block nor touch a device.
    pub fn open_file(
        &self,
        path: &CanonicalPath,
        writable: bool,
        atime: Atime,
    ) -> io::Result<File> {
        let (fd, _) = self.object(path, Want::File, None)?;
        reopen(&fd, writable, atime)
    }

    /// Like [`Backing::open_file`], but only if the file is still the inode `expect`.
    pub fn open_file_expecting(
        &self,
        path: &CanonicalPath,
        writable: bool,
        atime: Atime,
        expect: Identity,
    ) -> io::Result<File> {
        let (fd, _) = self.object(path, Want::File, Some(expect))?;
        reopen(&fd, writable, atime)
    }

    /// Creates a new regular file (`O_EXCL`: an existing entry, symlink or not, is `EEXIST`).
    pub fn create_file(&self, path: &CanonicalPath, mode: u32) -> io::Result<File> {
        let (dir, name) = self.parent(path)?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_c_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// A new regular file in the directory `dir` that has its final name only once it is
    /// complete ([`TemporaryFile::persist_noclobber`]): unnamed (`O_TMPFILE`) where the
    /// backing filesystem can, else under a random `.kmsfs-tmp-` name removed on drop.
    pub fn new_temporary_file(
        &self,
        dir: &CanonicalPath,
        mode: u32,
    ) -> io::Result<TemporaryFile<'_>> {
        let dirfd = self.resolve(dir, OFlags::PATH | OFlags::DIRECTORY)?;
        match rustix::fs::openat(
            &dirfd,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        ) {
            Ok(fd) => {
                return Ok(TemporaryFile {
                    backing: self,
                    file: File::from(fd),
                    named: None,
                })
            }
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {}
            Err(e) => return Err(e.into()),
        }
        let name = format!("{}{:016x}", TEMP_PREFIX, rand::random::<u64>());
        let path = dir
            .join(name.as_bytes())
            .map_err(|_| errno(libc::ENAMETOOLONG))?;
        let file = self.create_file(&path, mode)?;
        Ok(TemporaryFile {
            backing: self,
            file,
            named: Some(path),
        })
    }

    /// Opens a directory for listing or syncing.
    pub fn open_dir(&self, path: &CanonicalPath, atime: Atime) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
        let fd = match atime {
            Atime::Keep => match self.resolve(path, flags | OFlags::NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.resolve(path, flags),
                r => r,
            },
            Atime::Update => self.resolve(path, flags),
        }?;
        Ok(File::from(fd))
    }

    /// The names in a directory, each with the inode number and type the directory records
    /// (`d_ino`, `d_type`), so a listing needs no stat per entry.
    pub fn list_dir(&self, path: &CanonicalPath, atime: Atime) -> io::Result<Vec<Entry>> {
        list_fd(OwnedFd::from(self.open_dir(path, atime)?))
    }

    /// Flushes a directory's entries (after a rename or create that must survive a crash).
    pub fn sync_dir(&self, path: &CanonicalPath) -> io::Result<()> {
        self.open_dir(path, Atime::Update)?.sync_all()
    }

    /// Makes the directory `path` holding the file `record_name` with `record` (its kmsfs
    /// record): made and filled in kmsfs's private staging directory, then renamed into place
    /// without replacing anything, so the directory appears with its record or not at all and
    /// nothing is ever done through a name someone else can swap. Backing directories are
    /// 0700 and belong to the daemon's user: what the mount shows comes from the record.
    pub fn make_dir(
        &self,
        path: &CanonicalPath,
        record_name: &str,
        record: &[u8],
    ) -> io::Result<Metadata> {
        let (dir, name) = self.parent(path)?;
        let staging = self.meta_dir(META_DIR, true)?.private_subdir(STAGING_DIR)?;
        let tmp = format!("{:016x}", rand::random::<u64>());
        rustix::fs::mkdirat(&staging.fd, tmp.as_str(), Mode::from_raw_mode(0o700))?;
        let made = || -> io::Result<Metadata> {
            let new = rustix::fs::openat(
                &staging.fd,
                tmp.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let file = File::from(rustix::fs::openat(
                &new,
                record_name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?);
            file.write_all_at(record, 0)?;
            let meta = metadata_of(&new)?;
            rename_noreplace(&staging.fd, tmp.as_str(), &dir, name.as_c_str())?;
            Ok(meta)
        };
        made().inspect_err(|_| {
            let _ = rustix::fs::unlinkat(
                &staging.fd,
                format!("{tmp}/{record_name}"),
                AtFlags::empty(),
            );
            let _ = rustix::fs::unlinkat(&staging.fd, tmp.as_str(), AtFlags::REMOVEDIR);
        })
    }

    /// Makes `path` a regular file holding `bytes` (a kmsfs object), complete before it has
    /// its name; never replaces anything.
    pub fn write_new(&self, path: &CanonicalPath, bytes: &[u8]) -> io::Result<Metadata> {
        self.write_new_as(path, bytes, false)
    }

    /// [`Backing::write_new`], with `finish` given the file before it has its name (to sync or
    /// tag it).
    pub fn write_new_with(
        &self,
        path: &CanonicalPath,
        bytes: &[u8],
        finish: impl FnOnce(&File) -> io::Result<()>,
    ) -> io::Result<Metadata> {
        let dir = path.parent().ok_or_else(|| errno(libc::EEXIST))?;
        let tmp = self.new_temporary_file(&dir, 0o600)?;
        tmp.file().write_all_at(bytes, 0)?;
        finish(tmp.file())?;
        let meta = tmp.file().metadata()?;
        tmp.persist_noclobber(path)?;
        Ok(meta)
    }

    /// [`Backing::write_new`], with the data on disk before the name appears (`durable`).
    pub fn write_new_as(
        &self,
        path: &CanonicalPath,
        bytes: &[u8],
        durable: bool,
    ) -> io::Result<Metadata> {
        self.write_new_with(
            path,
            bytes,
            |f| if durable { f.sync_data() } else { Ok(()) },
        )
    }

    pub fn mkdir(&self, path: &CanonicalPath, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(mode))?;
        Ok(())
    }

    pub fn mknod(&self, path: &CanonicalPath, mode: u32, rdev: u64) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        rustix::fs::mknodat(
            &dir,
            name.as_c_str(),
            kind,
            Mode::from_raw_mode(mode & 0o7777),
            rdev,
        )?;
        Ok(())
    }

    pub fn symlink(&self, target: &[u8], path: &CanonicalPath) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, name.as_c_str())?;
        Ok(())
    }

    /// The target of the symlink at `path` (anything else there is refused).
    pub fn read_link(&self, path: &CanonicalPath) -> io::Result<Vec<u8>> {
        let (fd, _) = self.object(path, Want::Symlink, None)?;
        let target = rustix::fs::readlinkat(&fd, c"", Vec::new())?;
        Ok(target.into_bytes())
    }

    /// Removes the non-directory at `path`, if it is still the inode `expect`.
    pub fn unlink(&self, path: &CanonicalPath, expect: Option<Identity>) -> io::Result<()> {
        self.remove(path, expect, AtFlags::empty())
    }

    /// Unlinks the entry at `path` unless it is a regular file with other names (`nlink` >
    /// 1), which the caller unlinks itself once it has seen to them; either way returns the
    /// entry's identity, and whether it was removed. One descriptor of the parent directory
    /// serves the `lstat` and the unlink.
    pub fn unlink_unless_linked(&self, path: &CanonicalPath) -> io::Result<(Identity, bool)> {
        let (dir, name) = self.parent(path)?;
        let st = rustix::fs::statat(&dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        let id = Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let file =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
        if file && st.st_nlink > 1 {
            return Ok((id, false));
        }
        rustix::fs::unlinkat(&dir, name.as_c_str(), AtFlags::empty())?;
        Ok((id, true))
    }

    /// Removes the empty directory at `path`, if it is still the inode `expect`.
    pub fn rmdir(&self, path: &CanonicalPath, expect: Option<Identity>) -> io::Result<()> {
        self.remove(path, expect, AtFlags::REMOVEDIR)
    }

    /// Removes the directory `path` if it holds nothing but its record `record_name` (and
    /// names `leftover` accepts: a side record a crash left behind its entry): it is first
    /// renamed into kmsfs's private staging directory (out of everyone else's reach), checked
    /// there to be the directory `expect` names and empty but for those (else put back:
    /// `ENOTEMPTY` or `ESTALE`), and only then emptied and removed. A crash part way
    /// leaves it in the staging directory, never a directory without its record in the tree.
    pub fn remove_dir(
        &self,
        path: &CanonicalPath,
        record_name: &str,
        leftover: &dyn Fn(&[u8]) -> bool,
        expect: Identity,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let staging = self.meta_dir(META_DIR, true)?.private_subdir(STAGING_DIR)?;
        let tmp = format!("{:016x}", rand::random::<u64>());
        rename_noreplace(&dir, name.as_c_str(), &staging.fd, tmp.as_str())?;
        let check = || -> io::Result<(OwnedFd, Vec<OsString>)> {
            let moved = rustix::fs::openat(
                &staging.fd,
                tmp.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if Identity::of(&metadata_of(&moved)?) != expect {
                return Err(errno(libc::ESTALE));
            }
            let listing = rustix::fs::openat(
                &moved,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let mut extra = Vec::new();
            for e in list_fd(listing)? {
                if e.name.as_bytes() == record_name.as_bytes() {
                    continue;
                }
                if !leftover(e.name.as_bytes()) {
                    return Err(errno(libc::ENOTEMPTY));
                }
                extra.push(e.name);
            }
            Ok((moved, extra))
        };
        let (moved, extra) = match check() {
            Ok(found) => found,
            Err(e) => {
                let back = rename_noreplace(&staging.fd, tmp.as_str(), &dir, name.as_c_str());
                if let Err(b) = back {
                    return Err(io::Error::other(format!(
                        "cannot put back {path} from {}: {b}",
                        staging.shown.join(&tmp).display()
                    )));
                }
                return Err(e);
            }
        };
        for name in extra
            .iter()
            .map(|n| n.as_os_str())
            .chain([OsStr::new(record_name)])
        {
            match rustix::fs::unlinkat(&moved, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        rustix::fs::unlinkat(&staging.fd, tmp.as_str(), AtFlags::REMOVEDIR)?;
        Ok(())
    }

    fn remove(
        &self,
        path: &CanonicalPath,
        expect: Option<Identity>,
        flags: AtFlags,
    ) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        if let Some(id) = expect {
            let st = rustix::fs::statat(&dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            if (st.st_dev, st.st_ino) != (id.dev, id.ino) {
                return Err(errno(libc::ESTALE));
            }
        }
        rustix::fs::unlinkat(&dir, name.as_c_str(), flags)?;
        Ok(())
    }

    /// `renameat2` of `from` to `to`, both beneath the root.
    pub fn rename(
        &self,
        from: &CanonicalPath,
        to: &CanonicalPath,
        flags: RenameFlags,
    ) -> io::Result<()> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        if flags == RenameFlags::NOREPLACE {
            return rename_noreplace(&fdir, fname.as_c_str(), &tdir, tname.as_c_str());
        }
        rustix::fs::renameat_with(&fdir, fname.as_c_str(), &tdir, tname.as_c_str(), flags)?;
        Ok(())
    }

    /// A hard link `to` of the entry at `from` (a symlink at `from` is linked as itself, never
    /// followed).
    pub fn link(&self, from: &CanonicalPath, to: &CanonicalPath) -> io::Result<()> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        rustix::fs::linkat(
            &fdir,
            fname.as_c_str(),
            &tdir,
            tname.as_c_str(),
            AtFlags::empty(),
        )?;
        Ok(())
    }

    /// Sets the permission bits of the entry at `path` (never a symlink), if it is the inode
    /// `expect`.
    pub fn chmod(
        &self,
        path: &CanonicalPath,
        mode: u32,
        expect: Option<Identity>,
    ) -> io::Result<()> {
        let (fd, _) = self.object(path, Want::NotSymlink, expect)?;
        chmod_fd(&fd, mode)
    }

    /// Changes the owner (None: keep) of the entry at `path`, if it is the inode `expect`. A
    /// symlink is changed as itself (`AT_EMPTY_PATH` on its `O_PATH` descriptor).
    pub fn chown(
        &self,
        path: &CanonicalPath,
        uid: Option<u32>,
        gid: Option<u32>,
        expect: Option<Identity>,
    ) -> io::Result<()> {
        let fd = self.resolve(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        let meta = metadata_of(&fd)?;
        check_identity(&meta, expect)?;
        chown_fd(&fd, uid, gid)
    }

    /// Sets access and modification times (`UTIME_NOW`/`UTIME_OMIT` allowed) of the entry at
    /// `path` (never a symlink), if it is the inode `expect`.
    pub fn set_times(
        &self,
        path: &CanonicalPath,
        times: &[libc::timespec; 2],
        expect: Option<Identity>,
    ) -> io::Result<()> {
        let t = self.itself(path, expect)?;
        let flags = if t.link {
            AtFlags::SYMLINK_NOFOLLOW
        } else {
            AtFlags::empty()
        };
        rustix::fs::utimensat(CWD, t.path.as_c_str(), &timestamps(times), flags)?;
        Ok(())
    }

    /// The entry at `path` by name in its parent's descriptor, for a path-taking call's
    /// no-follow form.
    fn by_name_in_parent(&self, path: &CanonicalPath) -> io::Result<Itself> {
        let (dir, name) = self.parent(path)?;
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.as_bytes());
        Ok(Itself {
            path: CString::new(p).map_err(|_| errno(libc::EINVAL))?,
            link: true,
            _hold: vec![dir],
        })
    }

    /// How to reach the entry at `path` itself (if it is the inode `expect`) with a
    /// path-taking call: anything but a symlink through its own descriptor's `/proc/self/fd`
    /// link; a symlink (whose own times and xattrs are its own business) by name in its
    /// parent's descriptor, with the call's no-follow form, so its target is never reached.
    fn itself(&self, path: &CanonicalPath, expect: Option<Identity>) -> io::Result<Itself> {
        if expect.is_none() && !path.is_root() {
            // A read needs no identity: by name in the parent, no-follow form, whatever
            // the entry is (one resolution, no stat).
            return self.by_name_in_parent(path);
        }
        let fd = self.resolve(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        let meta = metadata_of(&fd)?;
        check_identity(&meta, expect)?;
        if !meta.file_type().is_symlink() {
            return Ok(Itself {
                path: proc_path(&fd),
                link: false,
                _hold: vec![fd],
            });
        }
        self.by_name_in_parent(path)
    }

    /// Sets the times of the symlink at `path` itself (never its target).
    pub fn set_link_times(
        &self,
        path: &CanonicalPath,
        times: &[libc::timespec; 2],
    ) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        rustix::fs::utimensat(
            &dir,
            name.as_c_str(),
            &timestamps(times),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    pub fn set_xattr(
        &self,
        path: &CanonicalPath,
        name: &CStr,
        value: &[u8],
        flags: i32,
        expect: Option<Identity>,
    ) -> io::Result<()> {
        let t = self.itself(path, expect)?;
        let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
        if t.link {
            rustix::fs::lsetxattr(t.path.as_c_str(), name, value, flags)?;
        } else {
            rustix::fs::setxattr(t.path.as_c_str(), name, value, flags)?;
        }
        Ok(())
    }

    /// The value of xattr `name`; with `size` 0, just its length (as `getxattr(2)`).
    pub fn get_xattr(
        &self,
        path: &CanonicalPath,
        name: &CStr,
        size: usize,
        expect: Option<Identity>,
    ) -> io::Result<Vec<u8>> {
        let t = self.itself(path, expect)?;
        let p = t.path.as_c_str();
        if size == 0 {
            let n = if t.link {
                rustix::fs::lgetxattr_query(p, name)?
            } else {
                rustix::fs::getxattr_query(p, name)?
            };
            return Ok(vec![0; n]);
        }
        let mut buf = vec![0u8; size];
        let n = if t.link {
            rustix::fs::lgetxattr(p, name, &mut buf[..])?
        } else {
            rustix::fs::getxattr(p, name, &mut buf[..])?
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// The NUL-separated xattr names; with `size` 0, just their length (as `listxattr(2)`).
    pub fn list_xattr(
        &self,
        path: &CanonicalPath,
        size: usize,
        expect: Option<Identity>,
    ) -> io::Result<Vec<u8>> {
        let t = self.itself(path, expect)?;
        let p = t.path.as_c_str();
        if size == 0 {
            let n = if t.link {
                rustix::fs::llistxattr_query(p)?
            } else {
                rustix::fs::listxattr_query(p)?
            };
            return Ok(vec![0; n]);
        }
        let mut buf = vec![0u8; size];
        let n = if t.link {
            rustix::fs::llistxattr(p, &mut buf[..])?
        } else {
            rustix::fs::listxattr(p, &mut buf[..])?
        };
        buf.truncate(n);
        Ok(buf)
    }

    pub fn remove_xattr(
        &self,
        path: &CanonicalPath,
        name: &CStr,
        expect: Option<Identity>,
    ) -> io::Result<()> {
        let t = self.itself(path, expect)?;
        if t.link {
            rustix::fs::lremovexattr(t.path.as_c_str(), name)?;
        } else {
            rustix::fs::removexattr(t.path.as_c_str(), name)?;
        }
        Ok(())
    }

    /// The backing filesystem's `statvfs`.
    pub fn statvfs(&self) -> io::Result<rustix::fs::StatVfs> {
        Ok(rustix::fs::fstatvfs(&self.root)?)
    }

    /// Serializes changes to the header of the open backing `file` with every other kmsfs
    /// process and thread (a mount, on this host or another sharing the store, `rewrap`,
    /// `fsck --repair`), until the guard drops. The lock is a byte range (the file's inode
    /// number) of `.kmsfs/header.lock`, an `fcntl` open-file-description lock, which network
    /// filesystems (NFS, GlusterFS, CephFS) pass to their server; not a lock on the backing
    /// file itself: anyone who can open a backing file could hold that forever, while kmsfs's
    /// own directory is reachable only by the user it runs as. Each holder locks through a
    /// descriptor of its own (a spare one, see [`SpareLocks`]), so two threads of one
    /// process exclude each other too.
    pub fn lock_header(&self, file: &File) -> io::Result<HeaderLock> {
        let ino = file.metadata()?.ino();
        let lock = self.spare_lock()?;
        // On an error, the descriptor is closed, not kept: on a network filesystem a lock
        // the server granted may be held through it all the same, and closing releases it.
        lock_range(&lock, Range::Header(ino), true, true)?;
        Ok(HeaderLock {
            file: Some(lock),
            ino,
            spare: self.spare_locks.clone(),
        })
    }

    /// A descriptor of the lock file no lock is held through: a spare one, or a new one.
    fn spare_lock(&self) -> io::Result<File> {
        match self.spare_locks.take() {
            Some(file) => Ok(file),
            None => self.open_locks(),
        }
    }

    /// The lock file whose byte ranges [`Backing::lock_header`] and [`DataLock`] take.
    pub fn open_locks(&self) -> io::Result<File> {
        if let Some(dir) = self.locks_dir.get() {
            return dir.open_lock_file(HEADER_LOCKS);
        }
        let dir = self.meta_dir(META_DIR, true)?;
        let file = dir.open_lock_file(HEADER_LOCKS)?;
        let _ = self.locks_dir.set(dir);
        Ok(file)
    }

    /// kmsfs's own directory `name` at the backing root (see [`MetaDir`]).
    pub fn meta_dir(&self, name: &str, create: bool) -> io::Result<MetaDir> {
        let root_owner = self.root_metadata()?.uid();
        MetaDir::open_in(&self.root, &self.root_path, name, create, root_owner)
    }
}

/// `renameat2(RENAME_NOREPLACE)`, or, on a filesystem without it (GlusterFS's and other FUSE
/// clients answer EINVAL), the same with what it has: a regular file by `link` (which never
/// replaces) and `unlink`; a directory by a plain `rename` once nothing is there. Mounts of
/// the store make these under the volume's namespace lock, so no other mount changes the
/// names meanwhile; and a directory kmsfs makes always holds its record, which a rename never
/// replaces (ENOTEMPTY, given as EEXIST here).
fn rename_noreplace<F, T>(from_dir: impl AsFd, from: F, to_dir: impl AsFd, to: T) -> io::Result<()>
where
    F: rustix::path::Arg + Copy,
    T: rustix::path::Arg + Copy,
{
    // Asked every time: EINVAL also means "a directory into itself", which the fallback
    // refuses the same way.
    match rustix::fs::renameat_with(&from_dir, from, &to_dir, to, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL) => {}
        other => return Ok(other?),
    }
    let st = rustix::fs::statat(&from_dir, from, AtFlags::SYMLINK_NOFOLLOW)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        match rustix::fs::statat(&to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        return match rustix::fs::renameat(&from_dir, from, &to_dir, to) {
            Err(rustix::io::Errno::NOTEMPTY) => Err(errno(libc::EEXIST)),
            other => Ok(other?),
        };
    }
    rustix::fs::linkat(&from_dir, from, &to_dir, to, AtFlags::empty())?;
    rustix::fs::unlinkat(&from_dir, from, AtFlags::empty())?;
    Ok(())
}

/// Prefix of kmsfs's temporary files in any directory of the store (hidden from the mount).
pub const TEMP_PREFIX: &str = ".kmsfs-tmp-";
/// kmsfs's own directory at the backing root.
pub const META_DIR: &str = ".kmsfs";
/// Where a new directory gets its record before it is renamed into place, and where a
/// directory goes to be removed (see [`Backing::make_dir`], [`Backing::remove_dir`]).
const STAGING_DIR: &str = "staging";
/// The lock file whose byte ranges (one per inode) serialize header updates.
const HEADER_LOCKS: &str = "header.lock";

/// An entry found by [`Backing::lookup`]: its metadata, and its descriptor while this lives.
pub struct Found {
    fd: OwnedFd,
    pub meta: Metadata,
}

impl Found {
    /// Opens the regular file found, to read it without updating its access time; anything
    /// else is refused before it is opened.
    pub fn open_read(&self) -> io::Result<File> {
        check_kind(&self.meta, Want::File, &"the entry")?;
        reopen(&self.fd, false, Atime::Keep)
    }

    /// `lstat` of the entry `name` (one component) in the directory found: one syscall, no
    /// path resolved from the root again (a directory's stat reads its record this way).
    pub fn child_metadata(&self, name: &str) -> io::Result<Metadata> {
        check_kind(&self.meta, Want::Dir, &"the entry")?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(errno(libc::EINVAL));
        }
        // Through the descriptor's /proc link, which reaches exactly this directory; the
        // entry itself is not followed if it is a symlink.
        let path = format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd());
        std::fs::symlink_metadata(path)
    }
}

/// A path-taking call's way to an entry itself (see [`Backing::itself`]); the descriptors
/// it names stay open while it lives.
struct Itself {
    path: CString,
    /// A symlink, reached by name: use the call's no-follow form.
    link: bool,
    _hold: Vec<OwnedFd>,
}

/// A header lock held (see [`Backing::lock_header`]); released when dropped.
pub struct HeaderLock {
    file: Option<File>,
    /// The inode whose range it holds.
    ino: u64,
    spare: SpareLocks,
}

impl Drop for HeaderLock {
    fn drop(&mut self) {
        self.spare
            .release(self.file.take(), Range::Header(self.ino));
    }
}

/// Which byte range of `.kmsfs/header.lock` a lock takes: inode numbers cut to 61 bits (two
/// files that share a range only wait for each other), data locks above them, then the
/// volume's namespace lock.
#[derive(Clone, Copy)]
enum Range {
    Header(u64),
    Data(u64),
    Namespace,
    /// Held shared by every process using the store while it does (see [`Presence`]).
    Present,
    /// Held exclusively by a mount that runs alone (see [`Presence`]).
    Alone,
}

const INODES: u64 = 1 << 61;
/// Longest a create waits for its new file's data lock (see [`DataLock::hold`]).
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest a process waits for a mount running alone to let it in (see [`Presence`]).
const JOIN_AT_MOST: std::time::Duration = std::time::Duration::from_secs(120);

fn lock_range(lock: &File, range: Range, exclusive: bool, wait: bool) -> io::Result<()> {
    set_lock(
        lock,
        range_start(range),
        if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        },
        wait,
    )
}

/// The byte of the lock file that `range` is.
fn range_start(range: Range) -> u64 {
    match range {
        Range::Header(ino) => ino % INODES,
        Range::Data(ino) => INODES + ino % INODES,
        Range::Namespace => 2 * INODES,
        Range::Present => 2 * INODES + 1,
        Range::Alone => 2 * INODES + 2,
    }
}

/// Releases what [`lock_range`] took.
fn unlock_range(lock: &File, range: Range) -> io::Result<()> {
    set_lock(lock, range_start(range), libc::F_UNLCK, false)
}

/// [`lock_range`], trying every 10 ms for at most `at_most` (zero: once); false if another
/// still holds a conflicting lock then. A bounded wait, where `F_OFD_SETLKW` has none.
fn lock_range_within(
    lock: &File,
    range: Range,
    exclusive: bool,
    at_most: std::time::Duration,
) -> io::Result<bool> {
    let started = std::time::Instant::now();
    loop {
        match lock_range(lock, range, exclusive, false) {
            Ok(()) => return Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {}
            Err(e) => return Err(e),
        }
        if started.elapsed() >= at_most {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// An `fcntl` lock description: `len` bytes (0: to the end and beyond) from `at`.
fn flock_at(at: u64, len: u64, kind: i32) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: at as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    }
}

fn set_lock(lock: &File, at: u64, kind: i32, wait: bool) -> io::Result<()> {
    let range = flock_at(at, 1, kind);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: an open descriptor and a valid `struct flock` for an OFD lock command.
        if unsafe { libc::fcntl(lock.as_raw_fd(), cmd, &range) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The lock on one file's blocks and length, which every mount takes across a change of
/// them (a write, a truncate, a renewal) and a read that found the file changing: a writer
/// then sees the length another mount left (so the final-block flag is on exactly one
/// block), never half of another's write. Unlike [`HeaderLock`] it keeps its descriptor of
/// the lock file between takes (a write is too frequent to reopen it each time); one holder
/// per descriptor, so the holder serializes its own takes (a file's instance does).
pub struct DataLock {
    file: Option<File>,
    ino: u64,
    presence: std::sync::Arc<Presence>,
    spare: SpareLocks,
}

impl Drop for DataLock {
    /// A lock taken for good ([`DataLock::take_owned`]) is held until now.
    fn drop(&mut self) {
        self.spare.release(self.file.take(), Range::Data(self.ino));
    }
}

impl DataLock {
    pub fn new(backing: &Backing, file: &File) -> io::Result<Self> {
        let ino = file.metadata()?.ino();
        Ok(DataLock {
            file: Some(backing.spare_lock()?),
            ino,
            presence: backing.presence.clone(),
            spare: backing.spare_locks.clone(),
        })
    }

    fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("a data lock has its descriptor until dropped")
    }

    /// The inode of the file this lock is for.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Takes the lock (shared or exclusive) until the guard drops. A mount that runs alone
    /// takes no lock (see [`Presence`]).
    pub fn take(&self, exclusive: bool) -> io::Result<DataGuard<'_>> {
        if let Some(alone) = self.presence.unlocked() {
            return Ok(DataGuard {
                lock: self,
                alone: Some(alone),
            });
        }
        lock_range(self.file(), Range::Data(self.ino), exclusive, true)?;
        Ok(DataGuard {
            lock: self,
            alone: None,
        })
    }
}

/// The volume's namespace lock, which every mount holds across each change of names on the
/// store (create, mkdir, symlink, mknod, link, unlink, rmdir, rename): the cross-mount form
/// of a mount's own namespace mutex, so a rename on one mount never moves, binds or misses an
/// entry another mount is changing at that moment. One holder per descriptor: the mount
/// takes it under its own mutex.
pub struct NamespaceLock {
    file: File,
    presence: std::sync::Arc<Presence>,
    /// The lock was taken (not skipped, running alone) by the holder now.
    taken: AtomicBool,
}

impl NamespaceLock {
    pub fn new(backing: &Backing) -> io::Result<Self> {
        Ok(NamespaceLock {
            file: backing.open_locks()?,
            presence: backing.presence.clone(),
            taken: AtomicBool::new(false),
        })
    }

    /// Takes the lock (waiting for other mounts' changes); [`NamespaceLock::release`] gives it
    /// back. A mount that runs alone skips it; it switches to taking it only while holding
    /// its own namespace mutex, as its caller does here.
    pub fn take(&self) -> io::Result<()> {
        if !self.presence.shared.load(Ordering::Acquire) {
            return Ok(());
        }
        lock_range(&self.file, Range::Namespace, true, true)?;
        self.taken.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn release(&self) {
        if !self.taken.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = set_lock(&self.file, 2 * INODES, libc::F_UNLCK, false) {
            tracing::warn!("cannot release the volume's namespace lock: {e}");
        }
    }
}

/// Which processes use the store, so that a mount that is the only one may skip the locks
/// that order its changes with others ([`DataLock`], [`NamespaceLock`]) and the re-reads that
/// catch up with them: they cost a few syscalls per write, a fifth of a 4 KiB random write.
/// Every process using the store holds byte `Present` of the lock file shared while it does.
/// A writable mount that finds no other holder takes byte `Alone` exclusively and runs alone.
/// Any other process that comes (a mount, `rewrap`, `fsck`, `export`...) first waits for
/// `Alone` to be free; the alone mount polls for other holders of `Present` (every 100 ms),
/// and on finding one finishes the changes under way (it holds [`Presence::drain`] across
/// each unlocked one), turns to taking every lock, and releases `Alone`. All `fcntl` locks:
/// released by the kernel when a process dies, and passed to the server by network
/// filesystems, so hosts sharing the store see each other.
#[derive(Debug)]
pub struct Presence {
    /// Others may be changing the store: every change takes its locks (the default).
    shared: AtomicBool,
    /// Held shared across each change made without locks while alone; the turn to shared
    /// takes it exclusively, so no unlocked change is under way once it has.
    drain: std::sync::RwLock<()>,
    /// The descriptor holding `Present` (and `Alone`, while alone).
    held: std::sync::Mutex<Option<File>>,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            shared: AtomicBool::new(true),
            drain: std::sync::RwLock::new(()),
            held: std::sync::Mutex::new(None),
        }
    }
}

impl Presence {
    /// While alone: a guard that keeps the mount alone until dropped. None once shared.
    fn unlocked(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        if self.shared.load(Ordering::Acquire) {
            return None;
        }
        let guard = self.drain.read().unwrap_or_else(|e| e.into_inner());
        (!self.shared.load(Ordering::Acquire)).then_some(guard)
    }
}

impl Backing {
    /// Registers this process as one using the store (see [`Presence`]), until it exits;
    /// first waits for a mount running alone to notice and turn to locking. With
    /// `may_run_alone` (a writable mount), runs alone if no other process uses the store.
    /// Says whether it runs alone.
    pub fn join(&self, may_run_alone: bool) -> io::Result<bool> {
        self.register()?;
        Ok(may_run_alone && self.try_run_alone()?)
    }

    /// Registers this process as one using the store, once (see [`Backing::join`]). A process
    /// that cannot write kmsfs's own directory (a read-only store) registers through a
    /// read-only descriptor of the lock file, which takes the shared locks this needs.
    pub fn register(&self) -> io::Result<()> {
        let p = &self.presence;
        let mut held = p.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            return Ok(());
        }
        let file = match self.open_locks() {
            Ok(file) => file,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) => self
                .meta_dir(META_DIR, false)?
                .open_lock_file_read_only(HEADER_LOCKS)?,
            Err(e) => return Err(e),
        };
        lock_range(&file, Range::Present, false, true)?;
        // Wait for a mount running alone to turn to locking (it looks every 100 ms, then
        // finishes the change of names under way), then let it be.
        if !lock_range_within(&file, Range::Alone, false, JOIN_AT_MOST)? {
            return Err(io::Error::other(format!(
                "a mount of this store running alone did not turn to locking within {} s",
                JOIN_AT_MOST.as_secs()
            )));
        }
        set_lock(&file, 2 * INODES + 2, libc::F_UNLCK, false)?;
        *held = Some(file);
        Ok(())
    }

    /// Runs alone if no other process uses the store (registered first); says whether.
    fn try_run_alone(&self) -> io::Result<bool> {
        let p = &self.presence;
        let held = p.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = held.as_ref() else {
            return Ok(false);
        };
        if !p.shared.load(Ordering::Acquire) {
            return Ok(true);
        }
        if lock_range(file, Range::Alone, true, false).is_err() {
            return Ok(false);
        }
        if others_hold(file, Range::Present)? {
            set_lock(file, 2 * INODES + 2, libc::F_UNLCK, false)?;
            return Ok(false);
        }
        p.shared.store(false, Ordering::Release);
        Ok(true)
    }

    /// Whether this process runs alone (see [`Presence`]).
    pub fn runs_alone(&self) -> bool {
        !self.presence.shared.load(Ordering::Acquire)
    }

    /// Whether another process uses the store now.
    pub fn others_present(&self) -> bool {
        let held = self.presence.held.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref()
            .is_some_and(|f| others_hold(f, Range::Present).unwrap_or(true))
    }

    /// Turns a mount running alone to taking every lock, once no unlocked change is under
    /// way, and lets the others in. The caller holds its own namespace mutex, so that no
    /// change of names is under way without the namespace lock either.
    pub fn share(&self) {
        let p = &self.presence;
        let _drained = p.drain.write().unwrap_or_else(|e| e.into_inner());
        p.shared.store(true, Ordering::Release);
        if let Some(f) = p.held.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if let Err(e) = set_lock(f, 2 * INODES + 2, libc::F_UNLCK, false) {
                tracing::warn!("cannot release the store's alone lock: {e}");
            }
        }
    }
}

/// Whether another open file description holds (any lock that conflicts with an exclusive
/// one on) `range`.
fn others_hold(file: &File, range: Range) -> io::Result<bool> {
    let at = match range {
        Range::Present => 2 * INODES + 1,
        Range::Alone => 2 * INODES + 2,
        _ => unreachable!("only presence ranges are tested"),
    };
    let mut lock = flock_at(at, 1, libc::F_WRLCK);
    // SAFETY: an open descriptor and a valid `struct flock` for F_OFD_GETLK to fill in.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

impl DataLock {
    /// Takes the lock exclusively until [`DataLock::release`] (or a guard of this lock drops),
    /// even while running alone: a file created without its header yet holds it, so another
    /// process can tell that create from one a crash cut short (whose lock is free).
    /// Nobody else has a reason to hold a new file's lock: one held for long (only the
    /// store's owner can open the lock file) fails the create rather than stall every change of
    /// names behind it.
    pub fn hold(&self) -> io::Result<()> {
        if lock_range_within(self.file(), Range::Data(self.ino), true, HOLD_AT_MOST)? {
            Ok(())
        } else {
            Err(io::Error::other(
                "another process holds the new file's data lock",
            ))
        }
    }

    /// [`DataLock::take`], waiting at most `at_most` (zero: not at all): None if another
    /// still holds it then.
    pub fn take_within(
        &self,
        exclusive: bool,
        at_most: std::time::Duration,
    ) -> io::Result<Option<DataGuard<'_>>> {
        if let Some(alone) = self.presence.unlocked() {
            return Ok(Some(DataGuard {
                lock: self,
                alone: Some(alone),
            }));
        }
        let taken = lock_range_within(self.file(), Range::Data(self.ino), exclusive, at_most)?;
        Ok(taken.then_some(DataGuard {
            lock: self,
            alone: None,
        }))
    }

    pub fn release(&self) {
        if let Err(e) = unlock_range(self.file(), Range::Data(self.ino)) {
            tracing::warn!("cannot release a file's data lock: {e}");
        }
    }

    /// [`DataLock::take`], the guard owning the lock's descriptor (a lock taken once; none
    /// while running alone).
    pub fn take_owned(self, exclusive: bool) -> io::Result<SettledFile> {
        if self.presence.shared.load(Ordering::Acquire) {
            lock_range(self.file(), Range::Data(self.ino), exclusive, true)?;
        }
        Ok(SettledFile { _lock: self })
    }
}

/// A file's data lock taken with its own descriptor, released (closed) when dropped.
pub struct SettledFile {
    _lock: DataLock,
}

pub struct DataGuard<'a> {
    lock: &'a DataLock,
    /// Running alone: no lock was taken, and the mount stays alone until this drops.
    alone: Option<std::sync::RwLockReadGuard<'a, ()>>,
}

impl DataGuard<'_> {
    /// Whether other processes may change the file too (a lock was taken): what it holds
    /// may have changed since this process last looked.
    pub fn shared(&self) -> bool {
        self.alone.is_none()
    }
}

impl Drop for DataGuard<'_> {
    fn drop(&mut self) {
        if self.alone.is_some() {
            return;
        }
        if let Err(e) = unlock_range(self.lock.file(), Range::Data(self.lock.ino)) {
            tracing::warn!("cannot release a file's data lock: {e}");
        }
    }
}

/// A file being written that gets its name only when complete; see
/// [`Backing::new_temporary_file`].
pub struct TemporaryFile<'a> {
    backing: &'a Backing,
    file: File,
    /// Its temporary name, where the filesystem has no unnamed files.
    named: Option<CanonicalPath>,
}

impl TemporaryFile<'_> {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives the file the name `path`; an existing entry there is `EEXIST`, never replaced.
    pub fn persist_noclobber(mut self, path: &CanonicalPath) -> io::Result<()> {
        match self.named.take() {
            None => {
                // Its directory resolved again, beneath the root, not the descriptor it was
                // made in: a create may wait seconds for its key, long enough for the store
                // to move that directory out from under the root.
                let (dir, name) = self.backing.parent(path)?;
                let fd = CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .expect("no NUL");
                rustix::fs::linkat(
                    CWD,
                    fd.as_c_str(),
                    &dir,
                    name.as_c_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )?;
            }
            Some(tmp) => {
                let r = self.backing.rename(&tmp, path, RenameFlags::NOREPLACE);
                if r.is_err() {
                    self.named = Some(tmp);
                }
                r?;
            }
        }
        Ok(())
    }
}

impl Drop for TemporaryFile<'_> {
    fn drop(&mut self) {
        if let Some(tmp) = &self.named {
            let _ = self.backing.unlink(tmp, None);
        }
    }
}

/// Opens the object an `O_PATH` descriptor holds for I/O (through its `/proc/self/fd` link,
/// which reaches exactly that inode).
fn reopen(fd: &OwnedFd, writable: bool, atime: Atime) -> io::Result<File> {
    let p = proc_path(fd);
    let base = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    } | OFlags::CLOEXEC;
    let open = |flags| rustix::fs::open(p.as_c_str(), flags, Mode::empty());
    let opened = match atime {
        Atime::Keep => match open(base | OFlags::NOATIME) {
            Err(rustix::io::Errno::PERM) => open(base),
            r => r,
        },
        Atime::Update => open(base),
    }?;
    Ok(File::from(opened))
}

fn chmod_fd(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    rustix::fs::chmodat(
        CWD,
        proc_path(fd).as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
        AtFlags::empty(),
    )?;
    Ok(())
}

fn chown_fd(fd: &OwnedFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    // -1 is "leave as it is", which None already says.
    let u = uid
        .filter(|&u| u != u32::MAX)
        .map(rustix::fs::Uid::from_raw);
    let g = gid
        .filter(|&g| g != u32::MAX)
        .map(rustix::fs::Gid::from_raw);
    rustix::fs::chownat(fd, c"", u, g, AtFlags::EMPTY_PATH)?;
    Ok(())
}

fn timestamps(times: &[libc::timespec; 2]) -> rustix::fs::Timestamps {
    let ts = |t: &libc::timespec| rustix::fs::Timespec {
        tv_sec: t.tv_sec,
        tv_nsec: t.tv_nsec as _,
    };
    rustix::fs::Timestamps {
        last_access: ts(&times[0]),
        last_modification: ts(&times[1]),
    }
}

fn list_fd(fd: OwnedFd) -> io::Result<Vec<Entry>> {
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        use rustix::fs::FileType as T;
        let kind = match entry.file_type() {
            T::RegularFile => libc::DT_REG,
            T::Directory => libc::DT_DIR,
            T::Symlink => libc::DT_LNK,
            T::Fifo => libc::DT_FIFO,
            T::Socket => libc::DT_SOCK,
            T::CharacterDevice => libc::DT_CHR,
            T::BlockDevice => libc::DT_BLK,
            T::Unknown => libc::DT_UNKNOWN,
        };
        out.push(Entry {
            name: OsString::from_vec(name.to_vec()),
            ino: entry.ino(),
            kind,
        });
    }
    Ok(out)
}

/// Operations on an open backing file (its descriptor, not its name).
pub mod open {
    use super::*;

    /// Times, owner and mode of an open file, set through its descriptor.
    pub fn set_times(file: &File, times: &[libc::timespec; 2]) -> io::Result<()> {
        rustix::fs::futimens(file, &timestamps(times))?;
        Ok(())
    }

    /// Changes the owner of an open file (None: keep).
    pub fn chown(file: &File, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        rustix::fs::fchown(
            file,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
        )?;
        Ok(())
    }

    pub fn chmod(file: &File, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777))?;
        Ok(())
    }

    pub fn statvfs(file: &File) -> io::Result<rustix::fs::StatVfs> {
        Ok(rustix::fs::fstatvfs(file)?)
    }

    /// The attribute `name` of an open file; with `size` 0, a buffer of its length only (as
    /// [`Backing::get_xattr`]).
    pub fn get_xattr(file: &File, name: &CStr, size: usize) -> io::Result<Vec<u8>> {
        if size == 0 {
            return Ok(vec![0; rustix::fs::fgetxattr_query(file, name)?]);
        }
        let mut buf = vec![0u8; size];
        let n = rustix::fs::fgetxattr(file, name, &mut buf[..])?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Sets attribute `name` of an open file.
    pub fn set_xattr(file: &File, name: &CStr, value: &[u8]) -> io::Result<()> {
        rustix::fs::fsetxattr(file, name, value, rustix::fs::XattrFlags::empty())?;
        Ok(())
    }

    /// The attribute `name` of the entry `entry` in the open directory `dir`, not following
    /// it if it is a symlink, and at most `max` bytes long (longer: `ERANGE`). The entry is
    /// reached through the directory's descriptor (`/proc/self/fd/N/entry`), so no other
    /// directory is ever looked in; a symlink there is read as itself.
    pub fn entry_xattr(dir: &File, entry: &OsStr, name: &CStr, max: usize) -> io::Result<Vec<u8>> {
        let entry = entry.as_bytes();
        if entry.is_empty() || entry.contains(&b'/') || entry == b"." || entry == b".." {
            return Err(errno(libc::EINVAL));
        }
        let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        path.extend_from_slice(entry);
        let path = CString::new(path).map_err(|_| errno(libc::EINVAL))?;
        let mut buf = vec![0u8; max];
        let n = rustix::fs::lgetxattr(path.as_c_str(), name, &mut buf[..])?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Starts writing the dirty pages of `len` bytes at `offset` to the disk, and returns
    /// without waiting for them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no durability is
    /// promised, only that the disk gets the work early.
    pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (offset as libc::off64_t, len as libc::off64_t);
        let flags = libc::SYNC_FILE_RANGE_WRITE;
        // SAFETY: a plain syscall on a descriptor `file` keeps open; no memory is passed.
        // (Neither rustix nor nix wraps it.)
        if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Most bytes any record kmsfs reads from its own directory may have.
pub const MAX_RECORD: u64 = 1 << 20;

/// One of kmsfs's own directories in the store (`.kmsfs`, `.kmsfs/pending`): a real directory
/// owned by the daemon's uid, reached without following symlinks, and read, written and
/// unlinked only through its descriptor.
pub struct MetaDir {
    fd: OwnedFd,
    shown: PathBuf,
    /// The backing root's owner, who may own kmsfs's directories too.
    root_owner: u32,
}

impl std::fmt::Debug for MetaDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetaDir({})", self.shown.display())
    }
}

impl MetaDir {
    /// The directory must be owned by the user kmsfs runs as, by root, or by the backing
    /// root's owner (who controls everything beneath it anyway): so root can serve or export
    /// a user's volume, and nobody else who can write to the root can plant one.
    fn open_in(
        parent: &OwnedFd,
        parent_shown: &Path,
        name: &str,
        create: bool,
        root_owner: u32,
    ) -> io::Result<MetaDir> {
        let shown = parent_shown.join(name);
        if create {
            match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => io::Error::other(format!(
                "{} is not a directory (a symlink or file in its place); refusing to use it",
                shown.display()
            )),
            e => e.into(),
        })?;
        let meta = metadata_of(&fd)?;
        let me = rustix::process::geteuid().as_raw();
        if ![me, 0, root_owner].contains(&meta.uid()) {
            return Err(io::Error::other(format!(
                "{} is owned by uid {}, not by uid {me} who runs kmsfs, root, or the backing \
                 directory's owner; refusing to use it",
                shown.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(io::Error::other(format!(
                "{} is writable by group or others (mode {:o}); run 'chmod go-w' on it",
                shown.display(),
                meta.mode() & 0o7777
            )));
        }
        Ok(MetaDir {
            fd,
            shown,
            root_owner,
        })
    }

    /// Where this directory is, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// A directory of kmsfs's own inside this one.
    pub fn subdir(&self, name: &str, create: bool) -> io::Result<MetaDir> {
        MetaDir::open_in(&self.fd, &self.shown, name, create, self.root_owner)
    }

    /// A directory inside this one that only the user kmsfs runs as may enter: created mode
    /// 0700 if missing, refused unless it is exactly that (owned by this user, no group or
    /// other bits). Entries in it cannot be swapped by anyone else, wherever it is moved.
    fn private_subdir(&self, name: &str) -> io::Result<MetaDir> {
        let dir = self.subdir(name, true)?;
        let meta = metadata_of(&dir.fd)?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(io::Error::other(format!(
                "{} must be a directory of uid {me} with mode 0700 (it is uid {}, mode {:o}); \
                 refusing to use it",
                dir.shown.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        Ok(dir)
    }

    /// The metadata of the entry `name` itself (not followed).
    pub fn metadata(&self, name: &str) -> io::Result<Metadata> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        metadata_of(&fd)
    }

    /// The lock file `name`, read-only and not created (see [`Backing::register`]); nothing
    /// else there is accepted.
    fn open_lock_file_read_only(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let file = File::from(fd);
        check_kind(
            &file.metadata()?,
            Want::File,
            &self.shown.join(name).display(),
        )?;
        Ok(file)
    }

    /// Opens (creating, mode 0600) the regular file `name` for locking; nothing else there is
    /// accepted.
    fn open_lock_file(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        check_kind(&meta, Want::File, &self.shown.join(name).display())?;
        Ok(file)
    }

    /// Reads the regular file `name`, refusing anything else or more than `cap` bytes.
    pub fn read(&self, name: &str, cap: u64) -> io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let meta = metadata_of(&fd)?;
        let shown = self.shown.join(name);
        check_kind(&meta, Want::File, &shown.display())?;
        if meta.len() > cap {
            return Err(io::Error::other(format!(
                "{} is {} bytes, more than the {cap} a record may have",
                shown.display(),
                meta.len()
            )));
        }
        let mut file = reopen(&fd, false, Atime::Keep)?;
        let mut bytes = Vec::new();
        (&mut file).take(cap + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            return Err(io::Error::other(format!(
                "{} grew past {cap} bytes while being read",
                shown.display()
            )));
        }
        Ok(bytes)
    }

    /// Writes `bytes` as `name` atomically: a new temporary file (mode 0600), fsync, rename
    /// over `name`, fsync of the directory.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = format!(".{name}.tmp{}", rand::random::<u64>());
        let fd = rustix::fs::openat(
            &self.fd,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut file = File::from(fd);
        let written = file
            .write_all(bytes)
            .and_then(|_| file.sync_all())
            .and_then(|_| {
                rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)
                    .map_err(io::Error::from)
            });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        self.sync()
    }

    /// Writes `bytes` as a new file `name` (never replacing one), durably.
    /// Complete before it has its name: written and synced under a temporary name beginning
    /// with `.` (which readers of the directory skip), then renamed without replacing, so a
    /// crash (even `kill -9` part way) never leaves a torn `name`.
    pub fn write_new(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.write_new_locked(name, bytes).map(|_| ())
    }

    /// [`MetaDir::write_new`], the file write-locked (an `fcntl` lock on the whole file,
    /// taken before it has its name) for as long as the returned descriptor lives: so another
    /// process, on this host or another sharing the store, can tell it is in use
    /// ([`MetaDir::in_use`]).
    pub fn write_new_locked(&self, name: &str, bytes: &[u8]) -> io::Result<File> {
        let tmp = format!(".{name}.tmp{}", rand::random::<u64>());
        let fd = rustix::fs::openat(
            &self.fd,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut file = File::from(fd);
        let range = flock_at(0, 0, libc::F_WRLCK);
        // SAFETY: an open descriptor and a valid `struct flock` for F_OFD_SETLK.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &range) } != 0 {
            let e = io::Error::last_os_error();
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        let written = file
            .write_all(bytes)
            .and_then(|_| file.sync_all())
            .and_then(|_| rename_noreplace(&self.fd, tmp.as_str(), &self.fd, name));
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        self.sync()?;
        Ok(file)
    }

    /// Whether some process holds the lock [`MetaDir::write_new_locked`] takes on `name`.
    pub fn in_use(&self, name: &str) -> io::Result<bool> {
        let file = self.open_lock_file_read_only(name)?;
        let mut range = flock_at(0, 0, libc::F_WRLCK);
        // SAFETY: an open descriptor and a valid `struct flock` for F_OFD_GETLK to fill in.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut range) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(range.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Removes the entry `name` (a file, or whatever stands there: it is never followed).
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?;
        Ok(())
    }

    /// The names in this directory.
    pub fn list(&self) -> io::Result<Vec<OsString>> {
        let fd = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(list_fd(fd)?.into_iter().map(|e| e.name).collect())
    }

    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
