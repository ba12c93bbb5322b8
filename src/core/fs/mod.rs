//! The filesystem core behind the mount: POSIX operations on a volume, in plain Rust values.
//!
//! The backing store mirrors the plaintext tree: one backing directory per directory (holding
//! its record), and one object, a regular backing file with an authenticated header, per file,
//! symlink, fifo, socket or device node. What a `stat` reports as kind, mode and owner comes
//! from that header (see [`warm::Facts`]), never from the backing entry; an entry kmsfs did not
//! make is not shown. Every syscall on the store goes through [`crate::backing`],
//! which resolves each path beneath the backing root without following symlinks; this module
//! names what it expects there (a regular file, the inode the kernel named), so an entry
//! swapped on the store since the kernel looked it up fails the call (`EIO`, `ESTALE`) and
//! nothing is done through it. Inode numbers are the backing store's own (see [`inodes`]),
//! so hard links share an inode and `stat` is stable across remounts.
//!
//! An open file is one [`EncryptedFile`] per inode, shared by every handle (so two handles
//! never disagree about the size), behind a read-write lock: reads run in parallel, writes
//! one at a time. Its content key lives only as long as some handle has the file open.
//! Names and keys move together ([`rebind`]); the warm caches ([`warm`]) only save work.
//!
//! Lock order: `namespace` first (held across every namespace change: create, link, unlink,
//! rename, mkdir, rmdir, so they are serialized; data I/O never takes it), then at most one of
//! the short-held tables `nodes`, `open`, `handles`, or a cache's own lock. None of these
//! tables is held across a key-service call: an open makes the file's instance (its `Decrypt`)
//! without `open` held, then puts it in the table unless another open of the inode did so
//! meanwhile (then that one is the inode's). An instance's own lock (see
//! [`super::instance`]) comes last. A rename or link makes the new envelopes of every file it
//! moves (their `ReEncrypt`s) before it takes `namespace` (see [`KmsFs::premake`]), so neither
//! that lock nor an instance's nor a header's is held across them; only a file created or
//! rewrapped between then and the lock gets its envelope made under it. A create's
//! `GenerateDataKey` comes before `namespace` is taken when the create waits for its key (see
//! [`KmsFs::key_ahead`]), else after it is released (the pending file holds only its own data
//! lock meanwhile); only a create that finds the pending queue filled in between makes it under
//! the lock. A truncation to zero makes its `GenerateDataKey` under that one file's locks. A
//! directory rename that finds another mount creating a file beneath it (that file's data
//! lock held until its key comes) waits for it with `namespace` released, then starts again.
//!
//! Other mounts of the store (on this host or others sharing it), `rewrap` and `fsck` are
//! ordered by `fcntl` locks on the store (see [`crate::backing`]), in this order: the volume's
//! namespace lock (taken right after `namespace`, and with it: every change of names is one at
//! a time across mounts), then, after the in-process locks above, a rebind's journal record
//! (held from before a
//! rename's, link's or unlink's first step to after its last, so no tidy takes its half-done
//! names for stale), then a file's data lock (across each write, truncation or renewal, so
//! every mount extends from the length on disk), then its header lock (across a header
//! update). An instance re-reads what another mount may have changed under it (its length,
//! its header) once it holds the lock that orders the change.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{os, Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::Envelope;
use crate::format::header::{Attrs, ObjectKind};
use crate::format::names;
use crate::format::object::DIR_RECORD;

use super::file::{attrs_change, dir_record, encode_object, read_header_only, EncryptedFile};
use super::instance::{KeyRequests, OpenNode};
use super::journal::Journal;
use super::names::{Listed, StoredChild};
use super::volume::{is_reserved_name, Volume};
use crate::backing::{Atime, Backing, Identity, SettledFile};

mod inodes;
mod rebind;
mod warm;

use inodes::Node;
use rebind::{envelope_paths, Premade};
use warm::{Facts, Prefetch};

pub const ROOT_INO: u64 = 1;
/// Most names one file can have. Each costs an envelope per trusted key in its header (grown
/// in place when it needs room, `super::renew::grow`), a truncation to zero of the file one
/// `ReEncrypt` per name and key, and a header holds at most 256 envelopes.
pub const MAX_LINKS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// What `stat` reports for an inode.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    /// Plaintext size for files.
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// A directory's entries as a reply shows them, and how far `readdirplus` has read their
/// headers ahead (see [`KmsFs::readdirplus`]).
struct Listing {
    /// Where the directory was when it was listed: its entries' stored paths are under it.
    dir: CanonicalPath,
    entries: Vec<ListingEntry>,
    warmed: std::sync::atomic::AtomicUsize,
}

/// One entry of a [`Listing`]: each (but `.` and `..`) with its stored path. The kind of an
/// object in a regular backing file is told (by its kind tag, else its header) only when a
/// plain `readdir` reply reaches it, a window at a time: a `readdirplus` reply reads every
/// entry's header anyway, and needs none.
struct ListingEntry {
    entry: DirEntry,
    stored: Option<CanonicalPath>,
    /// A regular backing file's inode number.
    regular: Option<u64>,
    /// Its kind once asked: None where neither its tag nor its header could tell.
    told: std::sync::OnceLock<Option<Kind>>,
}

/// Test hook, never for production: `KMSFS_INJECT_REBIND_PAUSE_MS` holds each rename that
/// long once its rebind record is written (the namespace lock held), so a test can act while
/// a rename is part way (its key calls are made before, see [`KmsFs::premake`]).
fn pause_for_tests() {
    if let Some(ms) = std::env::var("KMSFS_INJECT_REBIND_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// A new file's data key, generated before its create took the namespace lock.
struct KeyAhead {
    path: CanonicalPath,
    dek: crate::secret::DataKey,
    wrapped: Vec<crate::format::envelope::WrappedKey>,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

/// The namespace held (see [`KmsFs::namespace`]), until dropped.
struct NamespaceHeld<'a> {
    guard: std::sync::MutexGuard<'a, Option<crate::backing::NamespaceLock>>,
}

impl Drop for NamespaceHeld<'_> {
    fn drop(&mut self) {
        if let Some(lock) = self.guard.as_ref() {
            lock.release();
        }
    }
}

/// What a create or a directory rename found (see [`KmsFs::unfinished`]).
enum Unfinished {
    /// Something else: the name is taken.
    No,
    /// Another mount's create, its key not there yet: this lock comes free once it is.
    UnderWay(crate::backing::DataLock),
    /// An empty file a create cut short left (removed by a create, which takes its name).
    LeftByACrash,
}

/// The files beneath a directory a rename moves (see [`KmsFs::without_unfinished_creates`]).
enum Beneath {
    Files(Vec<CanonicalPath>),
    /// One of them another mount is creating: the rename waits for this lock.
    BeingCreated {
        path: CanonicalPath,
        lock: crate::backing::DataLock,
    },
}

/// Who asks (for ownership of what they create).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
}

struct Handle {
    node: Arc<OpenNode>,
    ino: u64,
    writable: bool,
    append: bool,
}

pub struct KmsFs {
    volume: Arc<Volume>,
    read_only: bool,
    root_backing_ino: u64,
    /// The backing filesystem (entries on another one, mounted inside the store, are refused
    /// wherever an inode is checked).
    root_dev: u64,
    nodes: Mutex<HashMap<u64, Node>>,
    open: Mutex<HashMap<u64, std::sync::Weak<OpenNode>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    namespace: Mutex<Option<crate::backing::NamespaceLock>>,
    journal: Journal,
    /// Opens, reads and writes that failed (authentication, key service, backing I/O).
    io_errors: Arc<AtomicU64>,
    /// Rebind records that did not parse or authenticate (see [`super::journal`]).
    unusable_records: AtomicU64,
    prefetch: Prefetch,
    key_requests: KeyRequests,
    facts: Facts,
    /// Whether a backing entry's own mode or owner was found changed (logged once).
    noted_backing_metadata: std::sync::atomic::AtomicBool,
    /// Whether an entry whose name kmsfs did not write was found (logged once).
    noted_foreign_name: std::sync::atomic::AtomicBool,
    /// An empty backing file (no header) was logged.
    noted_headerless: std::sync::atomic::AtomicBool,
    /// The listing each directory's current pass of replies is cut from (see
    /// [`KmsFs::listing_from`]), until the pass reaches the end. Bounded.
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    /// The daemon's effective uid (asked once: a stat checks it).
    euid: u32,
    /// Extended attributes served (see [`KmsFs::set_xattrs`]).
    xattrs: bool,
}

fn dotted(name: &OsStr) -> bool {
    name == "." || name == ".."
}

impl Attr {
    /// Attributes for an entry whose own could not be read: only what its directory says.
    fn unknown(ino: u64, kind: Kind, blksize: u32) -> Attr {
        Attr {
            ino,
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            kind,
            perm: 0,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize,
        }
    }
}

/// Something on the backing store that kmsfs did not make, or that is not where kmsfs put
/// it: never shown (EIO), and logged once by the adapter.
fn not_shown(path: &CanonicalPath, what: &str) -> Error {
    Error::Integrity(format!(
        "{path}: {what} on the backing store, which kmsfs did not make there; not shown"
    ))
}

fn kind_name(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device node"
    } else {
        "an entry of unknown type"
    }
}

impl Kind {
    fn of(kind: ObjectKind) -> Kind {
        match kind {
            ObjectKind::File => Kind::File,
            ObjectKind::Dir => Kind::Dir,
            ObjectKind::Symlink => Kind::Symlink,
            ObjectKind::Fifo => Kind::Fifo,
            ObjectKind::Socket => Kind::Socket,
            ObjectKind::CharDevice => Kind::CharDevice,
            ObjectKind::BlockDevice => Kind::BlockDevice,
        }
    }

    fn object(self) -> ObjectKind {
        match self {
            Kind::File => ObjectKind::File,
            Kind::Dir => ObjectKind::Dir,
            Kind::Symlink => ObjectKind::Symlink,
            Kind::Fifo => ObjectKind::Fifo,
            Kind::Socket => ObjectKind::Socket,
            Kind::CharDevice => ObjectKind::CharDevice,
            Kind::BlockDevice => ObjectKind::BlockDevice,
        }
    }
}

fn io_err(what: &str, path: &CanonicalPath, e: std::io::Error) -> Error {
    Error::io(format!("{what} {path}"), e)
}

/// Files whose keys a prefetch walk fetches ahead of the files opened, by default.
pub const DEFAULT_PREFETCH: usize = 512;
/// Files created without waiting for their key that may be pending at once.
pub const DEFAULT_PENDING: usize = 256;

impl KmsFs {
    pub fn new(volume: Volume, read_only: bool) -> Result<Self> {
        let root_meta = volume
            .backing()
            .root_metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", volume.root().display()), e))?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                paths: vec![CanonicalPath::root()],
                lookups: 1,
                dir_id: None,
            },
        );
        let journal = Journal::new(&volume, read_only)?;
        let namespace = if read_only {
            None
        } else {
            Some(
                crate::backing::NamespaceLock::new(volume.backing())
                    .map_err(|e| Error::Refused(format!("cannot open the volume's locks: {e}")))?,
            )
        };
        let volume = Arc::new(volume);
        let io_errors = Arc::new(AtomicU64::new(0));
        let core = KmsFs {
            key_requests: KeyRequests::new(volume.clone(), DEFAULT_PENDING, io_errors.clone()),
            volume,
            read_only,
            root_backing_ino: root_meta.ino(),
            root_dev: root_meta.dev(),
            nodes: Mutex::new(nodes),
            open: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            namespace: Mutex::new(namespace),
            journal,
            io_errors,
            unusable_records: AtomicU64::new(0),
            facts: Facts::default(),
            noted_backing_metadata: std::sync::atomic::AtomicBool::new(false),
            noted_foreign_name: std::sync::atomic::AtomicBool::new(false),
            noted_headerless: std::sync::atomic::AtomicBool::new(false),
            listings: Mutex::new(HashMap::new()),
            euid: rustix::process::geteuid().as_raw(),
            xattrs: true,
            prefetch: Prefetch {
                limit: DEFAULT_PREFETCH,
                every: std::time::Duration::from_secs(60),
                recent: Default::default(),
                jobs: Arc::new(AtomicU64::new(0)),
                ahead: Default::default(),
                reached: Arc::new(AtomicU64::new(0)),
            },
        };
        if !read_only {
            // Registered before anything changes: a mount running alone elsewhere turns to
            // locking first, so the recovery below is ordered with its changes.
            core.store().register().map_err(|e| {
                Error::Refused(format!("cannot register with the store's locks: {e}"))
            })?;
            super::renew::finish_interrupted(&core.volume);
            core.finish_interrupted_rebinds();
        }
        Ok(core)
    }

    /// Turns extended attributes off: every xattr call answers `ENOSYS`, which the kernel takes
    /// as "not implemented" and stops asking (callers get `EOPNOTSUPP`). Saves the two round
    /// trips `ls -l` makes per entry (the SELinux label and ACL probes) and the one before each
    /// write (the file-capability check).
    pub fn set_xattrs(&mut self, on: bool) {
        self.xattrs = on;
    }

    fn check_xattrs(&self) -> Result<()> {
        if self.xattrs {
            Ok(())
        } else {
            Err(os(
                "extended attributes are off on this mount (--no-xattrs)",
                libc::ENOSYS,
            ))
        }
    }

    /// Most files created without waiting for their key that may be pending at once (0: every
    /// create waits; see [`super::instance`]).
    pub fn set_pending_creates(&mut self, files: usize) {
        self.key_requests = KeyRequests::new(self.volume.clone(), files, self.io_errors.clone());
    }

    /// Whether a create now would wait for its data key (the key service answers fast, is
    /// failing, or pending creates are off) rather than return before it.
    pub fn creates_wait_for_keys(&self) -> bool {
        !self.key_requests.would_take()
    }

    /// Waits until every file created without waiting has its key and data written.
    pub fn settle(&self) {
        self.key_requests.settle();
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Opens, reads and writes that have failed since the mount (for `kmsfs status`).
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Registers the mount with the store's locks (see [`crate::backing::Presence`]): a
    /// writable mount that is the only process using the store runs without the locks that
    /// order its changes with others'. Then, every 100 ms, it looks for another process using
    /// the store (a mount on this host or another, `rewrap`, `fsck`...), and when one comes,
    /// turns to locking every change (between two changes of names) and lets it in. A mount
    /// that does not join (the core in tests) locks every change.
    pub fn join_store(self: &Arc<Self>) -> Result<()> {
        let alone = match self.store().join(!self.read_only) {
            Ok(alone) => alone,
            // A read-only mount of a store it cannot write (no lock file to take) changes
            // nothing; it only reads as any reader does.
            Err(e) if self.read_only => {
                tracing::info!("not registered with the store's locks (read-only): {e}");
                return Ok(());
            }
            Err(e) => {
                return Err(Error::Refused(format!(
                    "cannot register with the store's locks: {e}"
                )))
            }
        };
        if !alone {
            tracing::info!("other processes use this store: every change is locked");
            return Ok(());
        }
        tracing::info!("the only mount of this store: locking when another comes");
        let core = Arc::downgrade(self);
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let Some(core) = core.upgrade() else { return };
            if core.store().others_present() {
                let _ns = core.namespace.lock().unwrap_or_else(|e| e.into_inner());
                core.store().share();
                tracing::info!("another process uses this store now: every change is locked");
                return;
            }
        });
        Ok(())
    }

    /// Holds the namespace: this mount's mutex, then the volume's lock that every mount of
    /// the store takes across a change of names (see [`crate::backing::NamespaceLock`]).
    fn namespace(&self) -> Result<NamespaceHeld<'_>> {
        let held = NamespaceHeld {
            guard: self.namespace.lock().unwrap(),
        };
        if let Some(lock) = held.guard.as_ref() {
            lock.take().map_err(|e| {
                tracing::error!("cannot take the volume's namespace lock: {e}");
                Error::io("cannot take the volume's namespace lock", e)
            })?;
        }
        Ok(held)
    }

    /// The backing store: every syscall on it goes through this.
    fn store(&self) -> &Backing {
        self.volume.backing()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(os("read-only mount", libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn attr_from(&self, path: &CanonicalPath, meta: &fs::Metadata) -> Result<Attr> {
        self.attr_of(path, meta, None)
    }

    /// What the mount reports for the backing entry `meta` at `path`: kind, mode and owner
    /// from the object's authenticated header (a directory's from its record), never from the
    /// backing store; sizes and times from the store. Reads through `found` (the entry just
    /// looked up) when there is one. Anything kmsfs did not make (a symlink, fifo or device
    /// node on the store, a directory without its record) is refused.
    fn attr_of(
        &self,
        path: &CanonicalPath,
        meta: &fs::Metadata,
        found: Option<&crate::backing::Found>,
    ) -> Result<Attr> {
        let ino = self.ino_of(meta.ino());
        let ft = meta.file_type();
        self.note_backing_metadata(path, meta);
        // No header yet: a create on another mount of the store whose key has not arrived
        // (or one a crash cut short, which fsck reports). Nothing authenticates it, so it is
        // not there yet; this mount's own such creates answer from their open instance.
        if ft.is_file() && meta.len() == 0 && self.open_node(ino).is_none() {
            if !self.noted_headerless.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{path}: an empty backing file, with no header (a create on another mount \
                     waiting for its key, one a crash cut short, or a file emptied on the \
                     store): not shown; kmsfs fsck lists such files (logged once)"
                );
            }
            return Err(os(
                format!("{path}: no header yet (a create waiting for its key elsewhere)"),
                libc::ENOENT,
            ));
        }
        let (attrs, size) = if ft.is_file() {
            let (attrs, size) = self.object_facts(ino, path, meta, found)?;
            if attrs.kind == ObjectKind::Dir {
                return Err(not_shown(path, "a directory record"));
            }
            (attrs, size)
        } else if ft.is_dir() {
            (self.dir_attrs(path, found)?, meta.len())
        } else {
            return Err(not_shown(path, kind_name(ft)));
        };
        Ok(self.attr_with(ino, meta, attrs, size))
    }

    /// What `stat` reports of `ino` with backing metadata `meta`, authenticated attributes
    /// `attrs` and plaintext size `size`.
    fn attr_with(&self, ino: u64, meta: &fs::Metadata, attrs: Attrs, size: u64) -> Attr {
        let time = |s: i64, ns: i64| {
            if s >= 0 {
                SystemTime::UNIX_EPOCH + std::time::Duration::new(s as u64, ns as u32)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Attr {
            ino,
            size,
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            kind: Kind::of(attrs.kind),
            perm: attrs.mode as u16,
            nlink: meta.nlink() as u32,
            uid: attrs.uid,
            gid: attrs.gid,
            rdev: attrs.rdev as u32,
            blksize: self.volume.config().block_size,
        }
    }

    /// Logs, once per mount, a backing entry whose own mode or owner is not what kmsfs gives
    /// every entry it makes (0600 files, 0700 directories, the daemon's user): changed on the
    /// store, or made there. It is ignored either way; the mount shows the authenticated one.
    fn note_backing_metadata(&self, path: &CanonicalPath, meta: &fs::Metadata) {
        // The root is the operator's own directory.
        if path.is_root() {
            return;
        }
        let expected = if meta.is_dir() { 0o700 } else { 0o600 };
        let mine = meta.uid() == self.euid;
        if (meta.mode() & 0o7777 == expected && mine)
            || self.noted_backing_metadata.swap(true, Ordering::Relaxed)
        {
            return;
        }
        tracing::warn!(
            "{path}: its backing entry has mode {:o} and owner {}:{} on the store (kmsfs makes \
             them {expected:o} and its own); ignored, the mount shows the authenticated mode and \
             owner (logged once)",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
    }

    /// A directory's authenticated attributes, from its record (see
    /// [`crate::format::object::DIR_RECORD`]): one that is missing, or is not bound to this
    /// directory, refuses the directory.
    fn dir_attrs(
        &self,
        dir: &CanonicalPath,
        found: Option<&crate::backing::Found>,
    ) -> Result<Attrs> {
        self.dir_record_facts(dir, found).map(|(attrs, _)| attrs)
    }

    /// [`KmsFs::dir_attrs`], and the directory's id: its record's file id, which the names
    /// of its entries are encrypted under. With the directory `found` (a stat of it), its
    /// record is looked up in that very directory, not resolved from the root again: one
    /// syscall where the header cache knows the record (the kernel asks a directory's
    /// attributes again after every create and unlink in it).
    fn dir_record_facts(
        &self,
        dir: &CanonicalPath,
        found: Option<&crate::backing::Found>,
    ) -> Result<(Attrs, [u8; 16])> {
        let record = dir_record(dir);
        let missing = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => not_shown(dir, "a directory without its record"),
            _ => io_err("cannot stat", &record, e),
        };
        let (meta, record_found) = match found {
            Some(dir_found) => (
                dir_found
                    .child_metadata(crate::format::object::DIR_RECORD)
                    .map_err(missing)?,
                None,
            ),
            None => {
                let f = self.store().lookup(&record).map_err(missing)?;
                (f.meta.clone(), Some(f))
            }
        };
        if !meta.is_file() {
            return Err(not_shown(dir, "a directory whose record is not a file"));
        }
        let (attrs, _, id) = self.header_facts_of(&record, &meta, record_found.as_ref())?;
        if attrs.kind != ObjectKind::Dir {
            return Err(not_shown(dir, "a directory whose record is another object"));
        }
        Ok((attrs, id))
    }

    fn stat_path(&self, path: &CanonicalPath) -> Result<Attr> {
        let found = self
            .store()
            .lookup(path)
            .map_err(|e| io_err("cannot stat", path, e))?;
        // Another mount may be renewing the file, or this one or another growing its header
        // (or a directory's record's): once that is done, look again. Not an empty file: no
        // rewrite leaves it so, and another mount's create holds its lock until its key comes.
        let (object, at) = match self.attr_of(path, &found.meta, Some(&found)) {
            Err(Error::Format { .. } | Error::Io { .. })
                if found.meta.is_file() && found.meta.len() > 0 =>
            {
                (path.clone(), Some(found))
            }
            Err(Error::Format { .. } | Error::Io { .. }) if found.meta.is_dir() => {
                let record = dir_record(path);
                let rec = self.store().lookup(&record).ok();
                (record, rec)
            }
            other => return other,
        };
        if let Some(at) = at {
            let file = at
                .open_read()
                .map_err(|e| io_err("cannot open", &object, e))?;
            // Waited for, then let go before looking again: the look may wait for this
            // mount's instance of the file, whose writer may be waiting for this lock.
            drop(self.settled(&file, &object)?);
            drop(crate::core::renew::staying(at.meta.ino()));
            self.facts.forget(at.meta.ino());
        }
        let found = self
            .store()
            .lookup(path)
            .map_err(|e| io_err("cannot stat", path, e))?;
        self.attr_of(path, &found.meta, Some(&found))
    }

    /// Waits until no mount of the store is changing the backing `file`'s blocks or header
    /// (a write, a renewal), and keeps it so while the guard lives (a shared data lock).
    fn settled(&self, file: &File, path: &CanonicalPath) -> Result<SettledFile> {
        let lock = crate::backing::DataLock::new(self.store(), file)
            .map_err(|e| io_err("cannot lock", path, e))?;
        lock.take_owned(false)
            .map_err(|e| io_err("cannot lock", path, e))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let path = self
            .child(parent, name)
            .map_err(|e| match e.errno() {
                libc::ENAMETOOLONG => e,
                _ => os("no such name", libc::ENOENT),
            })?
            .path;
        let attr = self.stat_path(&path)?;
        self.remember(attr.ino, &path);
        Ok(attr)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let by_name = self.path_of(ino).and_then(|path| self.stat_path(&path));
        match by_name {
            Ok(attr) if attr.ino == ino => Ok(attr),
            // An open file whose name is gone (unlinked while open here, or renamed or
            // unlinked by another mount) or names another file now is still there: what its
            // descriptor and instance say.
            other => match self.open_node(ino) {
                Some(node) => self.attr_of_open(ino, &node),
                None => other,
            },
        }
    }

    /// `access(2)` on a mount made without `default_permissions` (root's own, see the mount
    /// command), where only root's processes reach the daemon: what the kernel would answer
    /// root with it, i.e. everything but execute permission on a non-directory that has no
    /// execute bit (`mask` holds `X_OK` and the like). Anyone else (a root process acting
    /// with another filesystem uid) is refused.
    pub fn access(&self, caller_uid: u32, ino: u64, mask: i32) -> Result<()> {
        if caller_uid != 0 {
            return Err(os("only root uses this mount", libc::EACCES));
        }
        let attr = self.getattr(ino)?;
        if attr.ino != ino {
            return Err(os("the inode is no longer at its name", libc::ESTALE));
        }
        if mask & libc::X_OK != 0 && attr.kind != Kind::Dir && attr.perm & 0o111 == 0 {
            return Err(os("no execute permission", libc::EACCES));
        }
        Ok(())
    }

    /// `stat` of an open file from its instance and backing descriptor, by no name.
    fn attr_of_open(&self, ino: u64, node: &OpenNode) -> Result<Attr> {
        node.catch_up();
        let path = node.path();
        let meta = node
            .backing_metadata()
            .map_err(|e| io_err("cannot stat", &path, e))?;
        let attrs = node
            .attrs()
            .ok_or_else(|| os(format!("{path}: its key never came"), libc::EIO))?;
        Ok(self.attr_with(ino, &meta, attrs, node.size_for(meta.len())))
    }

    /// The authenticated attributes of a new object of `kind` at `path` made by `caller` with
    /// permission bits `perm`: owned by the caller when the daemon is root (else by the
    /// daemon's user, as a filesystem it mounted would make it); in a set-group-id directory
    /// it takes the directory's group, and a new directory the set-group-id bit, as the
    /// kernel would give them. The parent's attributes are its record's.
    fn new_attrs(
        &self,
        parent: Attrs,
        kind: ObjectKind,
        perm: u32,
        caller: Caller,
        rdev: u64,
    ) -> Result<Attrs> {
        let (uid, gid) = if self.euid == 0 {
            (caller.uid, caller.gid)
        } else {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        };
        let sgid = parent.mode & libc::S_ISGID != 0;
        let mode = if kind == ObjectKind::Dir && sgid {
            perm | libc::S_ISGID
        } else {
            perm
        };
        Ok(Attrs {
            kind,
            mode: mode & 0o7777,
            uid,
            gid: if sgid { parent.gid } else { gid },
            rdev,
        })
    }

    /// Makes the object (symlink, fifo, socket, device node) `attrs` with content `data` at
    /// `path`: a regular backing file, complete before it has its name. No key call. Hands out
    /// its attributes (counting the kernel's lookup).
    fn make_object(&self, child: &StoredChild, attrs: Attrs, data: &[u8]) -> Result<Attr> {
        let path = &child.path;
        let bytes = encode_object(&self.volume, path, attrs, data)?;
        self.put_side(child)?;
        let meta = self
            .store()
            .write_new_with(path, &bytes, |f| {
                self.volume.tag_kind(f, path, attrs.kind);
                Ok(())
            })
            .map_err(|e| io_err("cannot create", path, e))?;
        let attr = self.attr_from(path, &meta)?;
        self.remember(attr.ino, path);
        Ok(attr)
    }

    /// Names a directory being removed may still hold besides its record: with encrypted
    /// names, side records (one whose entry is there comes with that entry, which keeps the
    /// directory). Only ever judged inside the staging directory (see
    /// [`Backing::remove_dir`]), where no other writer adds entries.
    fn leftover(&self) -> impl Fn(&[u8]) -> bool {
        let encrypted = self.volume.encrypted_names();
        move |name: &[u8]| {
            encrypted
                && crate::format::names::classify(name)
                    == crate::format::names::EntryName::SideRecord
        }
    }

    /// Writes the side record a long encrypted name needs, before its entry is made.
    fn put_side(&self, child: &StoredChild) -> Result<()> {
        match &child.side {
            Some(side) => self.volume.put_side_record(side),
            None => Ok(()),
        }
    }

    /// Changes the authenticated attributes of `ino` at `path` (a header slot rewrite, no key
    /// call): through its open instance if it has one, else its backing file or, for a
    /// directory, its record. Returns the open instance the change went through, if any.
    fn change_attrs(
        &self,
        ino: u64,
        path: &CanonicalPath,
        change: impl Fn(Attrs) -> Option<Attrs>,
    ) -> Result<Option<Arc<OpenNode>>> {
        if let Some(node) = self.open_node(ino) {
            // A renewal by another mount shows in the header read under the lock (ESTALE):
            // the instance then becomes the file that is there now, and changes that.
            match node.update_attrs(&change) {
                Err(e) if e.errno() == libc::ESTALE => {
                    node.reopen_if_renewed(&self.volume)?;
                    node.update_attrs(change)?;
                }
                other => {
                    other?;
                }
            }
            return Ok(Some(node));
        }
        let meta = self
            .store()
            .metadata(path)
            .map_err(|e| io_err("cannot stat", path, e))?;
        if Identity::of(&meta) != self.expected(ino) {
            return Err(os(format!("{path}: another inode there now"), libc::ESTALE));
        }
        let (at, file) = if meta.is_dir() {
            let record = dir_record(path);
            let file = self.store().open_file(&record, true, Atime::Update);
            (record, file)
        } else {
            let file =
                self.store()
                    .open_file_expecting(path, true, Atime::Update, self.expected(ino));
            (path.clone(), file)
        };
        let file = file.map_err(|e| io_err("cannot open", &at, e))?;
        let record_ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
        let changed =
            crate::core::file::update_slot(&self.volume, &file, &at, true, attrs_change(change));
        self.facts.forget(record_ino);
        changed.map(|_| None)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
        atime_now: bool,
        mtime_now: bool,
        fh: Option<u64>,
        kill_setid: bool,
    ) -> Result<Attr> {
        self.check_writable()?;
        // A file open here whose names are all gone (unlinked, or replaced by a rename)
        // changes through its handle.
        let path = match self.path_of(ino) {
            Ok(path) => path,
            Err(e) => match self.open_node(ino) {
                Some(node) => node.path(),
                None => return Err(e),
            },
        };
        let expect = self.expected(ino);
        if kill_setid && mode.is_none() {
            // An instance that holds no set-id bit changes nothing without reading its header
            // (see `EncryptedFile::update_attrs`): first catch up with a renewal elsewhere,
            // whose header may hold some.
            if let Some(node) = self.open_node(ino) {
                node.reopen_if_renewed(&self.volume)?;
            }
            self.change_attrs(ino, &path, |a| {
                setid_cleared(a).map(|mode| Attrs { mode, ..a })
            })?;
        }
        if let Some(size) = size {
            // Through the open instance if there is one (it counts seals, and its handles
            // must see a renewal), else on the file alone.
            let node = fh
                .and_then(|fh| {
                    self.handles
                        .lock()
                        .unwrap()
                        .get(&fh)
                        .map(|h| h.node.clone())
                })
                .or_else(|| self.open_node(ino));
            match node {
                Some(node) => node.set_len(&self.volume, size)?,
                None => {
                    self.with_file(ino, &path, |f| super::renew::set_len(&self.volume, f, size))?
                }
            }
        }
        let mut changed_through = None;
        if mode.is_some() || uid.is_some() || gid.is_some() {
            changed_through = self.change_attrs(ino, &path, |a| {
                let mut new = Attrs {
                    mode: mode.map_or(a.mode, |m| m & 0o7777),
                    uid: uid.unwrap_or(a.uid),
                    gid: gid.unwrap_or(a.gid),
                    ..a
                };
                // A change of owner clears set-id bits, as chown(2) does (the kernel leaves
                // that to the filesystem here); a chmod in the same call says what it wants.
                let owner_changed =
                    uid.is_some_and(|u| u != a.uid) || gid.is_some_and(|g| g != a.gid);
                if mode.is_none() && owner_changed && a.kind != ObjectKind::Dir {
                    new.mode &= !(libc::S_ISUID | libc::S_ISGID);
                    if a.mode & libc::S_IXGRP == 0 {
                        new.mode |= a.mode & libc::S_ISGID;
                    }
                }
                Some(new)
            })?;
        }
        if atime.is_some() || mtime.is_some() || atime_now || mtime_now {
            let spec = |t: Option<SystemTime>, now: bool| {
                if now {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else if let Some(t) = t {
                    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos() as i64,
                    }
                } else {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                }
            };
            let times = [spec(atime, atime_now), spec(mtime, mtime_now)];
            let set = || {
                self.store()
                    .set_times(&path, &times, Some(expect))
                    .map_err(|e| io_err("cannot set the times of", &path, e))
            };
            // Not while a pending file's key arrives (it keeps the times it had). An open file
            // another mount renamed or unlinked has its times set through its descriptor.
            let node = self.open_node(ino);
            let mut through_descriptor = false;
            let by_descriptor = |f: &std::fs::File| {
                crate::backing::open::set_times(f, &times)
                    .map_err(|e| io_err("cannot set the times of", &path, e))
            };
            match node {
                // Through the descriptor if it holds the inode the kernel means (no name to
                // resolve); else by name, and through the descriptor if the name is gone.
                Some(ref node) => node.exclusive(|backing| match backing {
                    Ok(f) if f.metadata().is_ok_and(|m| Identity::of(&m) == expect) => {
                        through_descriptor = true;
                        by_descriptor(f)
                    }
                    _ => match set() {
                        Err(e) if matches!(e.errno(), libc::ENOENT | libc::ESTALE) => backing
                            .map_err(|e| io_err("cannot set the times of", &path, e))
                            .and_then(by_descriptor),
                        other => other,
                    },
                }),
                None => set(),
            }?;
            // A mount running alone is the only one that changes the file: an instance that
            // holds it has its attributes as they are (tar sets the times of every file it
            // writes, through the handle it wrote it with).
            if through_descriptor && changed_through.is_none() && self.store().runs_alone() {
                changed_through = node.filter(|n| !n.is_pending());
            }
        }
        // A change of mode or owner through an open instance read its header under the lock
        // just now (or, running alone, times were set through one): the reply is that
        // instance's attributes and its descriptor's `stat`, no name to resolve. (Not another
        // instance opened meanwhile: it may have read the header before the change.)
        if let Some(node) = changed_through {
            if let (Ok(meta), Some(attrs)) = (node.backing_metadata(), node.attrs()) {
                if Identity::of(&meta) == expect {
                    return Ok(self.attr_with(ino, &meta, attrs, node.size_for(meta.len())));
                }
            }
        }
        // By its name, or (renamed or unlinked by another mount) by its open instance.
        self.getattr(ino)
    }

    /// The shared open instance of `ino`, if some handle (or a pending key request) holds one.
    fn open_node(&self, ino: u64) -> Option<Arc<OpenNode>> {
        self.open
            .lock()
            .unwrap()
            .get(&ino)
            .and_then(|w| w.upgrade())
    }

    /// Runs `f` on the file's shared open instance (so it sees header changes), or on a
    /// temporary one.
    fn with_file<T>(
        &self,
        ino: u64,
        path: &CanonicalPath,
        f: impl FnOnce(&mut EncryptedFile) -> Result<T>,
    ) -> Result<T> {
        // The open instance, caught up with what other mounts did (and answering to `path`,
        // where another mount renamed it), unless one of them renewed the file since.
        let node = self.open_node(ino).filter(|n| n.catch_up());
        if let Some(node) = node {
            return node.with_mut(|file| {
                let _ = file.follow(path);
                f(file)
            });
        }
        f(&mut self.open_expected(ino, path)?)
    }

    /// A symlink's target: the content of its object, authenticated for this path.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let path = self.path_of(ino)?;
        let backing = self
            .store()
            .open_file_expecting(&path, false, Atime::Keep, self.expected(ino))
            .map_err(|e| io_err("cannot open", &path, e))?;
        let link = EncryptedFile::from_file(&self.volume, &path, backing)?;
        if link.attrs().kind != ObjectKind::Symlink {
            return Err(os(format!("{path} is not a symlink"), libc::EINVAL));
        }
        link.read_all()
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        self.check_writable()?;
        let mut ahead = if mode & libc::S_IFMT == libc::S_IFREG {
            self.key_ahead(parent, name)?
        } else {
            None
        };
        let _ns = self.namespace()?;
        let (child, dir) = self.new_child(parent, name)?;
        if mode & libc::S_IFMT == libc::S_IFREG {
            let (attr, fh) = self.create_file(&child, dir, mode, caller, &mut ahead)?;
            self.release(fh);
            return Ok(attr);
        }
        // Fifos, sockets and device nodes are objects like symlinks: regular backing files
        // whose header says what they are (the mount is nodev: a device never opens).
        let (kind, rdev) = match mode & libc::S_IFMT {
            libc::S_IFIFO => (ObjectKind::Fifo, 0),
            libc::S_IFSOCK => (ObjectKind::Socket, 0),
            libc::S_IFCHR => (ObjectKind::CharDevice, rdev as u64),
            libc::S_IFBLK => (ObjectKind::BlockDevice, rdev as u64),
            _ => return Err(os("unknown file type", libc::EINVAL)),
        };
        let attrs = self.new_attrs(dir, kind, mode & !caller.umask & 0o7777, caller, rdev)?;
        self.make_object(&child, attrs, &[])
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        self.check_writable()?;
        let _ns = self.namespace()?;
        let (child, dir) = self.new_child(parent, name)?;
        let path = child.path.clone();
        let attrs = self.new_attrs(
            dir,
            ObjectKind::Dir,
            mode & !caller.umask & 0o7777,
            caller,
            0,
        )?;
        let record = encode_object(&self.volume, &dir_record(&path), attrs, &[])?;
        self.put_side(&child)?;
        let meta = self
            .store()
            .make_dir(&path, DIR_RECORD, &record)
            .map_err(|e| io_err("cannot create", &path, e))?;
        let attr = self.attr_from(&path, &meta)?;
        self.remember(attr.ino, &path);
        // Its entries' names go under the id of the record just made (never one remembered
        // of a directory that had this inode number before).
        let id = crate::format::header::Preamble::decode(&record)
            .map_err(|e| Error::format(&path, e))?
            .file_id;
        if let Some(node) = self.nodes.lock().unwrap().get_mut(&attr.ino) {
            node.dir_id = Some(id);
        }
        Ok(attr)
    }

    /// A symlink is an object whose content is its target: encrypted, and bound to its path
    /// like a file's data. No key call.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> Result<Attr> {
        self.check_writable()?;
        let _ns = self.namespace()?;
        let (child, dir) = self.new_child(parent, name)?;
        let target = target.as_os_str().as_bytes();
        if target.is_empty() || target.len() >= libc::PATH_MAX as usize {
            return Err(os("bad symlink target length", libc::ENAMETOOLONG));
        }
        let attrs = self.new_attrs(dir, ObjectKind::Symlink, 0o777, caller, 0)?;
        self.make_object(&child, attrs, target)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let _ns = self.namespace()?;
        let child = self.child(parent, name)?;
        let path = child.path.clone();
        let store = self.store();
        let (me, removed) = store
            .unlink_unless_linked(&path)
            .map_err(|e| io_err("cannot unlink", &path, e))?;
        if !removed {
            // Another name keeps the file: unlink, then drop this name's envelopes. The
            // journal names the file's other names, where a tidy would find it.
            let header = self.header_of(self.ino_of(me.ino), &path)?;
            let names = envelope_paths(&header.envelopes(&self.volume, &path)?);
            let pending = self.journal.begin(&names)?;
            store
                .unlink(&path, Some(me))
                .map_err(|e| io_err("cannot unlink", &path, e))?;
            self.unbind_path(&header, &path, &path)?;
            pending.finish();
        }
        self.volume.drop_side_record(&child.side);
        self.forget_path(self.ino_of(me.ino), &path);
        // What its header said no longer describes whatever reuses the inode number.
        self.facts.forget(me.ino);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let _ns = self.namespace()?;
        let child = self.child(parent, name)?;
        let path = child.path.clone();
        let meta = self
            .store()
            .metadata(&path)
            .map_err(|e| io_err("cannot rmdir", &path, e))?;
        if !meta.is_dir() {
            return Err(os(format!("{path} is not a directory"), libc::ENOTDIR));
        }
        let record = self.store().metadata(&dir_record(&path)).ok();
        self.store()
            .remove_dir(&path, DIR_RECORD, &self.leftover(), Identity::of(&meta))
            .map_err(|e| io_err("cannot rmdir", &path, e))?;
        // What their headers said describes nothing that may reuse the inode numbers.
        if let Some(record) = record {
            self.facts.forget(record.ino());
        }
        self.facts.forget(meta.ino());
        self.volume.drop_side_record(&child.side);
        let ino = self.ino_of(meta.ino());
        self.forget_path(ino, &path);
        if let Some(node) = self.nodes.lock().unwrap().get_mut(&ino) {
            node.dir_id = None;
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        self.rename_or_wait(parent, name, newparent, newname, noreplace, true)
    }

    /// `rename`; with `may_wait`, a directory rename that finds another mount creating a
    /// file beneath it waits for that create (at most 15 s, the volume's names unlocked
    /// meanwhile), then starts again, without waiting a second time.
    fn rename_or_wait(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
        may_wait: bool,
    ) -> Result<()> {
        self.check_writable()?;
        // The new envelopes are made first, the volume's names unlocked (see `premake`).
        let premade = match (self.child(parent, name), self.new_child(newparent, newname)) {
            // Not for a rename bound to fail (over a name taken with noreplace, or over a
            // directory, which must be empty: checked under the lock, which then makes the
            // calls itself): no key calls for nothing.
            (Ok(from), Ok((to, _)))
                if from.path != to.path
                    && !self
                        .store()
                        .metadata(&to.path)
                        .is_ok_and(|m| noreplace || m.is_dir()) =>
            {
                self.premake(&from.path, &to.path)
            }
            _ => Premade::default(),
        };
        let ns = self.namespace()?;
        let from_child = self.child(parent, name)?;
        let (to_child, _) = self.new_child(newparent, newname)?;
        let (from, to) = (from_child.path.clone(), to_child.path.clone());
        if from == to {
            return Ok(());
        }
        let store = self.store();
        let meta = store
            .metadata(&from)
            .map_err(|e| io_err("cannot stat", &from, e))?;
        // What the rename replaces, if anything (the namespace lock keeps it so).
        let target = store.metadata(&to).ok();
        if noreplace && target.is_some() {
            return Err(os("target exists", libc::EEXIST));
        }
        if meta.is_dir() && to.as_str().starts_with(&format!("{}/", from.as_str())) {
            return Err(os("cannot move a directory into itself", libc::EINVAL));
        }
        // A directory replaced must be empty: on the store it still holds its record.
        let replaced_dir = match &target {
            Some(m) if m.is_dir() => {
                let entries = store
                    .list_dir(&to, Atime::Keep)
                    .map_err(|e| io_err("cannot read", &to, e))?;
                let leftover = self.leftover();
                if entries
                    .iter()
                    .any(|e| e.name != DIR_RECORD && !leftover(e.name.as_bytes()))
                {
                    return Err(os(format!("{to} is not empty"), libc::ENOTEMPTY));
                }
                Some(Identity::of(m))
            }
            _ => None,
        };
        let files = if meta.is_dir() {
            match self.without_unfinished_creates(self.volume.files_beneath(&from)?)? {
                Beneath::Files(files) => files,
                Beneath::BeingCreated { path, lock } => {
                    drop(ns);
                    let wait = std::time::Duration::from_secs(if may_wait { 15 } else { 0 });
                    let io = |e| io_err("cannot lock", &path, e);
                    if lock.take_within(false, wait).map_err(io)?.is_none() {
                        return Err(os(
                            format!(
                                "{path}: being created by another mount, whose key has not come"
                            ),
                            libc::EAGAIN,
                        ));
                    }
                    return self.rename_or_wait(parent, name, newparent, newname, noreplace, false);
                }
            }
        } else if meta.is_file() {
            vec![from.clone()]
        } else {
            vec![]
        };
        // A file replaced by the rename that keeps other names keeps an envelope for `to`
        // until tidied; its envelopes say where those names are.
        let replaced_names = match &target {
            Some(m) if m.is_file() && m.nlink() > 1 => store
                .open_file(&to, false, Atime::Keep)
                .ok()
                .and_then(|f| read_header_only(&f, &to).ok())
                .map(|h| {
                    let mut names: Vec<CanonicalPath> = h
                        .candidates()
                        .iter()
                        .flat_map(|(_, c)| envelope_paths(&c.envelopes))
                        .filter(|p| p != &to)
                        .collect();
                    names.sort();
                    names.dedup();
                    names
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let pending = if files.is_empty() && replaced_names.is_empty() {
            None
        } else {
            let mut paths = vec![from.clone(), to.clone()];
            paths.extend(replaced_names.iter().cloned());
            Some(self.journal.begin(&paths)?)
        };
        pause_for_tests();
        // 1. Every file gains envelopes for its new path.
        let bound = self.parallel(&files, |p| {
            let new = Self::moved(p, &from, &to);
            self.header_of(self.ino_at(p), p)
                .and_then(|h| self.bind_extra_path(&h, p, &new, &premade))
                .map_err(|e| match e {
                    Error::Format {
                        source:
                            crate::format::FormatError::TooLarge(why)
                            | crate::format::FormatError::NoRoom { why, .. },
                        ..
                    } => {
                        let e = os(
                            format!(
                                "{p} has no header room for the name {new} ({why}); copy the \
                                 file there instead"
                            ),
                            libc::ENAMETOOLONG,
                        );
                        tracing::warn!("cannot rename: {e}");
                        e
                    }
                    e => e,
                })
        });
        if let Err(e) = bound {
            // Nothing was renamed: drop the envelopes already added (no key call; should
            // that fail too, the record stays for the next mount).
            if self
                .tidy_paths(std::slice::from_ref(&from), pending.as_ref())
                .is_ok()
            {
                if let Some(pending) = pending {
                    pending.finish();
                }
            }
            return Err(e);
        }
        // 2. The name changes (over an empty directory: that goes first, record and all).
        if let Err(e) = self.put_side(&to_child) {
            if self
                .tidy_paths(std::slice::from_ref(&from), pending.as_ref())
                .is_ok()
            {
                if let Some(pending) = pending {
                    pending.finish();
                }
            }
            return Err(e);
        }
        if let Some(id) = replaced_dir {
            store
                .remove_dir(&to, DIR_RECORD, &self.leftover(), id)
                .map_err(|e| io_err("cannot replace", &to, e))?;
        }
        let flags = if noreplace {
            rustix::fs::RenameFlags::NOREPLACE
        } else {
            rustix::fs::RenameFlags::empty()
        };
        if let Err(e) = store.rename(&from, &to, flags) {
            // Nothing was renamed: the envelopes added go again, and the new name's side
            // record unless it is that of an entry already there.
            if target.is_none() {
                self.volume.drop_side_record(&to_child.side);
            }
            if self
                .tidy_paths(std::slice::from_ref(&from), pending.as_ref())
                .is_ok()
            {
                if let Some(pending) = pending {
                    pending.finish();
                }
            }
            return Err(io_err("cannot rename", &from, e));
        }
        self.volume.drop_side_record(&from_child.side);
        if let Some(m) = &target {
            self.forget_path(self.ino_of(m.ino()), &to);
            self.facts.forget(m.ino());
        }
        let moved = (!meta.is_dir()).then(|| self.ino_of(meta.ino()));
        self.move_paths(moved, &from, &to);
        // 3. Envelopes of the old paths go.
        self.parallel(&files, |p| {
            let new = Self::moved(p, &from, &to);
            let header = self.header_of(self.ino_at(&new), &new)?;
            header.set_path(&new);
            self.unbind_path(&header, &new, p)
        })?;
        self.tidy_paths(&replaced_names, pending.as_ref())?;
        if let Some(pending) = pending {
            pending.finish();
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        self.check_writable()?;
        // (Not for a link bound to fail: a file with all its names, or a name taken.)
        let bound_to_fail = |from: &CanonicalPath, to: &CanonicalPath| {
            self.store().metadata(to).is_ok()
                || self
                    .store()
                    .metadata(from)
                    .is_ok_and(|m| m.nlink() as usize >= MAX_LINKS)
        };
        let premade = match (self.path_of(ino), self.new_child(newparent, newname)) {
            (Ok(from), Ok((to, _))) if !bound_to_fail(&from, &to.path) => {
                self.premake(&from, &to.path)
            }
            _ => Premade::default(),
        };
        let _ns = self.namespace()?;
        let from = self.path_of(ino)?;
        let (to_child, _) = self.new_child(newparent, newname)?;
        let to = to_child.path.clone();
        let meta = self
            .store()
            .metadata(&from)
            .map_err(|e| io_err("cannot stat", &from, e))?;
        if Identity::of(&meta) != self.expected(ino) {
            return Err(os(format!("{from}: another inode there now"), libc::ESTALE));
        }
        if meta.is_file() {
            if meta.nlink() as usize >= MAX_LINKS {
                return Err(os(
                    format!("{from} has {MAX_LINKS} names already"),
                    libc::EMLINK,
                ));
            }
            let pending = self.journal.begin(&[from.clone(), to.clone()])?;
            let linked = self
                .header_of(ino, &from)
                .and_then(|h| self.bind_extra_path(&h, &from, &to, &premade))
                .and_then(|()| self.put_side(&to_child))
                .and_then(|()| {
                    self.store()
                        .link(&from, &to)
                        .map_err(|e| io_err("cannot link", &from, e))
                });
            if let Err(e) = linked {
                // Drop the new envelope if it was added (else the record stays for the next
                // mount).
                if self
                    .tidy_paths(std::slice::from_ref(&from), Some(&pending))
                    .is_ok()
                {
                    pending.finish();
                }
                return Err(e);
            }
            pending.finish();
        } else {
            return Err(os(format!("{from} cannot be linked"), libc::EPERM));
        }
        let attr = self.stat_path(&to)?;
        self.remember(attr.ino, &to);
        Ok(attr)
    }

    fn new_handle(&self, ino: u64, node: Arc<OpenNode>, writable: bool, append: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(
            fh,
            Arc::new(Handle {
                node,
                ino,
                writable,
                append,
            }),
        );
        fh
    }

    /// The data key of a file about to be created as `parent`/`name`, when the create will
    /// wait for its key (see [`crate::core::instance::KeyRequests::would_queue`]): generated
    /// now, before the create takes the volume's namespace lock, so that no change of names
    /// waits for the key service meanwhile. A key service that fails fails the create here,
    /// the lock never taken.
    fn key_ahead(&self, parent: u64, name: &OsStr) -> Result<Option<KeyAhead>> {
        // (Also when too many creates are pending already: this one would wait.)
        if self.key_requests.would_queue() {
            return Ok(None);
        }
        // Where the name goes by the directory id remembered (no record read): the create
        // checks the record under the namespace lock, and drops a key made for another path.
        let Ok(child) = self.child(parent, name) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let (dek, wrapped) = self
            .volume
            .keyring()
            .generate(&self.volume.file_context(&child.path))
            .map_err(|e| Error::key(&child.path, e))?;
        self.key_requests.answered(started.elapsed());
        Ok(Some(KeyAhead {
            path: child.path,
            dek,
            wrapped,
        }))
    }

    /// A new file that appears on the backing store with its header already written: made
    /// unnamed (`O_TMPFILE`, or a hidden temporary name where the backing filesystem has
    /// none) in its directory, given its key and header, then linked to its name. A crash can
    /// then never leave a file without a header.
    fn create_linked(
        &self,
        path: &CanonicalPath,
        attrs: Attrs,
        ahead: Option<&KeyAhead>,
    ) -> Result<EncryptedFile> {
        let dir = path.parent().unwrap_or_else(CanonicalPath::root);
        let tmp = self
            .store()
            .new_temporary_file(&dir, 0o600)
            .map_err(|e| io_err("cannot create", path, e))?;
        let file = tmp
            .file()
            .try_clone()
            .map_err(|e| io_err("cannot reopen", path, e))?;
        let enc = match ahead {
            Some(k) => EncryptedFile::create_with_key(
                &self.volume,
                path,
                file,
                &k.dek,
                k.wrapped.clone(),
                attrs,
            )?,
            None => {
                let started = std::time::Instant::now();
                let enc = EncryptedFile::create(&self.volume, path, file, attrs)?;
                self.key_requests.answered(started.elapsed());
                enc
            }
        };
        self.volume.tag_kind(tmp.file(), path, ObjectKind::File);
        tmp.persist_noclobber(path)
            .map_err(|e| io_err("cannot create", path, e))?;
        Ok(enc)
    }

    fn create_file(
        &self,
        child: &StoredChild,
        dir: Attrs,
        mode: u32,
        caller: Caller,
        ahead: &mut Option<KeyAhead>,
    ) -> Result<(Attr, u64)> {
        let path = &child.path;
        let perm = mode & !caller.umask & 0o7777;
        let attrs = self.new_attrs(dir, ObjectKind::File, perm, caller, 0)?;
        self.put_side(child)?;
        // Kept until the create succeeds: one that finds an empty file a crash left there
        // removes it and tries again with the same key, not one made under the lock.
        let key = ahead.as_ref().filter(|k| &k.path == path);
        if key.is_some() || !self.key_requests.would_take() {
            let enc = self.create_linked(path, attrs, key)?;
            *ahead = None;
            return self.open_created(path, OpenNode::ready(enc));
        }
        let store = self.store();
        let file = store
            .create_file(path, 0o600)
            .map_err(|e| io_err("cannot create", path, e))?;
        let made = file
            .metadata()
            .map(|m| Identity::of(&m))
            .map_err(|e| io_err("cannot stat", path, e));
        let remove = |e| {
            if let Ok(made) = made {
                let _ = store.unlink(path, Some(made));
            }
            e
        };
        if made.is_err() {
            return Err(os(format!("cannot stat the new {path}"), libc::EIO));
        }
        self.volume.tag_kind(&file, path, ObjectKind::File);
        // Held until its header is written: other mounts can tell this create, under way,
        // from one a crash cut short (see `create`). Made under the namespace lock, which
        // they take to look.
        let lock = crate::backing::DataLock::new(store, &file)
            .and_then(|lock| lock.hold().map(|()| Arc::new(lock)))
            .map_err(|e| remove(io_err("cannot lock", path, e)))?;
        let pending = Arc::new(OpenNode::pending(
            path.clone(),
            attrs,
            file.try_clone()
                .map_err(|e| remove(io_err("cannot reopen", path, e)))?,
            Some(lock),
        ));
        if self.key_requests.submit(&pending) {
            return self.open_created(path, pending);
        }
        let started = std::time::Instant::now();
        let enc = EncryptedFile::create(&self.volume, path, file, attrs).map_err(remove)?;
        self.key_requests.answered(started.elapsed());
        self.open_created(path, OpenNode::ready(enc))
    }

    /// A created file's instance goes in the table (before the kernel's first stat: a
    /// pending file's size is the instance's), then a writable handle.
    fn open_created(
        &self,
        path: &CanonicalPath,
        node: impl Into<Arc<OpenNode>>,
    ) -> Result<(Attr, u64)> {
        let node = node.into();
        // The attributes of the file made, from its descriptor (not of whatever its name
        // holds by now).
        let meta = node
            .backing_metadata()
            .map_err(|e| io_err("cannot stat", path, e))?;
        let ino = self.ino_of(meta.ino());
        self.open.lock().unwrap().insert(ino, Arc::downgrade(&node));
        // It was just made here: its instance says what its header says.
        let attrs = node
            .attrs()
            .ok_or_else(|| os(format!("{path}: its key never came"), libc::EIO))?;
        let attr = self.attr_with(ino, &meta, attrs, node.size_for(meta.len()));
        self.remember(attr.ino, path);
        let fh = self.new_handle(attr.ino, node, true, false);
        Ok((attr, fh))
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        self.check_writable()?;
        let mut ahead = self.key_ahead(parent, name)?;
        let ns = self.namespace()?;
        let (child, dir) = self.new_child(parent, name)?;
        let made = match self.create_file(&child, dir, mode, caller, &mut ahead) {
            Err(e) if e.errno() == libc::EEXIST => match self.unfinished_create(&child.path)? {
                Unfinished::LeftByACrash => self.create_file(&child, dir, mode, caller, &mut ahead),
                Unfinished::UnderWay(lock) => {
                    drop(ns);
                    // Up to 15 s (the key service may be down) for its key and header.
                    let wait = std::time::Duration::from_secs(15);
                    let io = |e| io_err("cannot lock", &child.path, e);
                    if lock.take_within(false, wait).map_err(io)?.is_none() {
                        return Err(os(
                            format!(
                                "{}: being created by another mount, whose key has not come",
                                child.path
                            ),
                            libc::EAGAIN,
                        ));
                    }
                    Err(e)
                }
                Unfinished::No => Err(e),
            },
            other => other,
        };
        let (attr, fh) = match made {
            // Another mount of the store made the name since the kernel looked it up: without
            // O_EXCL the caller opens what is there, but only through the kernel's own open,
            // which checks its permissions: ESTALE makes the kernel look the name up again
            // and open what it finds (what `open(2)` does for a stale name).
            Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                return Err(os(
                    format!(
                        "{}: made by another mount meanwhile; the kernel looks again",
                        child.path
                    ),
                    libc::ESTALE,
                ));
            }
            other => other?,
        };
        if flags & libc::O_APPEND != 0 {
            let h = self.handles.lock().unwrap().remove(&fh).expect("just made");
            let fh2 = self.new_handle(h.ino, h.node.clone(), true, true);
            return Ok((attr, fh2));
        }
        Ok((attr, fh))
    }

    /// Whether `path` (where a create found something) holds an empty backing file with no
    /// header, which the mount does not show: a create under way on another mount, its key
    /// not there yet (its data lock held: the caller waits for it, without the namespace
    /// lock), or one a stopped mount left (lock free: nothing in it was ever acknowledged,
    /// and it would keep the name taken for good: removed). Called under the namespace lock,
    /// which creates hold until their lock is.
    fn unfinished_create(&self, path: &CanonicalPath) -> Result<Unfinished> {
        let found = self.unfinished(path, |id| {
            self.store()
                .unlink(path, Some(id))
                .map_err(|e| io_err("cannot remove", path, e))
        })?;
        if matches!(found, Unfinished::LeftByACrash) {
            tracing::warn!(
                "{path}: removed an empty backing file with no header, which a create cut \
                 short had left, to create the name anew"
            );
        }
        Ok(found)
    }

    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if writable || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        let path = self.path_of(ino)?;
        let node = loop {
            // The open instance is this inode's; it must also be bound to this name (a hard
            // link made on the store to an open file is not). A name another mount gave it
            // since (a rename) is followed when the header on disk now binds it. It catches
            // up with other mounts' writes; one they renewed is left to its handles and
            // opened anew.
            let seen = self.open_node(ino);
            if let Some(n) = &seen {
                if n.attrs_for(&path).is_none() && !n.follow(&path) {
                    return Err(Error::Moved {
                        path: path.to_string(),
                        bound: n.path().to_string(),
                    });
                }
                if n.catch_up() {
                    break n.clone();
                }
            }
            // Opened (a key call) without the table of open files held: stat, lookup,
            // listings, other opens and closes go on meanwhile.
            let file = self.open_expected(ino, &path).inspect_err(|e| {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("open failed: {e}");
            })?;
            let fresh = Arc::new(OpenNode::ready(file));
            let mut open = self.open.lock().unwrap();
            let now = open.get(&ino).and_then(|w| w.upgrade());
            let unchanged = match (&now, &seen) {
                (None, _) => true,
                (Some(now), Some(seen)) => Arc::ptr_eq(now, seen),
                (Some(_), None) => false,
            };
            if unchanged {
                open.insert(ino, Arc::downgrade(&fresh));
                drop(open);
                if seen.is_none() {
                    self.prefetch_beside(&path);
                }
                break fresh;
            }
            // Another open of the inode made its instance meanwhile: that one is the
            // inode's (this one, never used, is dropped); look at it as above.
        };
        if flags & libc::O_TRUNC != 0 {
            node.set_len(&self.volume, 0)?;
        }
        Ok(self.new_handle(ino, node, writable, flags & libc::O_APPEND != 0))
    }

    /// Opens and authenticates the file the kernel named as `ino`, at `path`: another inode
    /// standing there now (moved or swapped on the store) is refused.
    fn open_expected(&self, ino: u64, path: &CanonicalPath) -> Result<EncryptedFile> {
        let writable = !self.read_only;
        let atime = if writable { Atime::Update } else { Atime::Keep };
        let backing = self
            .store()
            .open_file_expecting(path, writable, atime, self.expected(ino))
            .map_err(|e| io_err("cannot open", path, e))?;
        let again = backing
            .try_clone()
            .map_err(|e| io_err("cannot open", path, e))?;
        let file = match EncryptedFile::from_file(&self.volume, path, backing) {
            // Another mount may be renewing it (its header half rewritten, its length
            // changing): once its data lock is free, look again.
            // (Waited for, not held: the open makes a key call.)
            Err(Error::Format { .. } | Error::Io { .. })
                if again.metadata().is_ok_and(|m| m.len() > 0) =>
            {
                drop(self.settled(&again, path)?);
                if let Ok(m) = again.metadata() {
                    drop(crate::core::renew::staying(m.ino()));
                }
                EncryptedFile::from_file(&self.volume, path, again)?
            }
            other => other?,
        };
        if file.attrs().kind != ObjectKind::File {
            return Err(os(format!("{path} is not a regular file"), libc::EINVAL));
        }
        Ok(file)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or_else(|| os("bad file handle", libc::EBADF))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = h
            .node
            .read_at(&self.volume, offset, &mut buf)
            .inspect_err(|e| {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %h.node.path(), "read failed: {e}");
            })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Before a write by someone who may not keep set-id bits (the kernel leaves clearing
    /// them to us, see `fuse.rs`): clears them and says whether there were any.
    pub fn drop_setid(&self, fh: u64) -> Result<bool> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(os("not open for writing", libc::EBADF));
        }
        // The instance's attributes answer with no syscall: this runs before every write by
        // someone other than root.
        h.node.reopen_if_renewed(&self.volume)?;
        h.node
            .update_attrs(|a| setid_cleared(a).map(|mode| Attrs { mode, ..a }))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(os("not open for writing", libc::EBADF));
        }
        // The kernel drops a file capability before a write through its page cache; an
        // `O_APPEND` handle bypasses that cache (see `fuse.rs`), so its writes drop it here,
        // as Linux does for any write.
        if h.append {
            match self.removexattr(h.ino, OsStr::new("security.capability")) {
                Ok(()) => {}
                Err(e) if matches!(e.errno(), libc::ENODATA | libc::ENOENT | libc::ESTALE) => {}
                Err(e) => return Err(e),
            }
        }
        let offset = if h.append { None } else { Some(offset) };
        h.node
            .write_at(&self.volume, offset, data)
            .inspect_err(|e| {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %h.node.path(), "write failed: {e}");
            })?;
        Ok(data.len())
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        h.node.with(|file| file.sync())
    }

    /// `close`: reports a key request for a file created without waiting that has failed.
    pub fn flush(&self, fh: u64) -> Result<()> {
        match self.handle(fh)?.node.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn release(&self, fh: u64) {
        let h = self.handles.lock().unwrap().remove(&fh);
        if let Some(h) = h {
            let ino = h.ino;
            drop(h);
            let mut open = self.open.lock().unwrap();
            if open.get(&ino).is_some_and(|w| w.strong_count() == 0) {
                open.remove(&ino);
            }
        }
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        if mode != 0 {
            return Err(os("only plain fallocate is supported", libc::EOPNOTSUPP));
        }
        let h = self.handle(fh)?;
        h.node.grow_to(offset.saturating_add(length))
    }

    /// The whole listing of directory `ino` (for callers outside a mount: tests, tools).
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.readdir_from(ino, 0, |e, _| {
            out.push(e.clone());
            false
        })?;
        Ok(out)
    }

    /// `readdir` for a reply from entry `offset` on: `add` takes an entry and the next
    /// entry's offset, and says when the reply is full (that entry not taken). The listing is
    /// not copied: a reply costs what it returns, so a pass over a big directory is linear.
    pub fn readdir_from(
        &self,
        ino: u64,
        offset: usize,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> Result<()> {
        let listing = self.listing_from(ino, offset)?;
        for (at, l) in listing.entries.iter().enumerate().skip(offset) {
            if l.regular.is_some() && l.told.get().is_none() {
                self.tell_kinds(&listing, at);
            }
            let full = match l.told.get() {
                // Shown as a file when neither could tell: the lookup that follows fails, and
                // says why.
                Some(Some(kind)) if *kind != l.entry.kind => {
                    let told = DirEntry {
                        kind: *kind,
                        ..l.entry.clone()
                    };
                    add(&told, at as u64 + 1)
                }
                _ => add(&l.entry, at as u64 + 1),
            };
            if full {
                return Ok(());
            }
        }
        self.listing_done(ino);
        Ok(())
    }

    /// The listing a reply from entry `offset` on is cut from: made afresh for the first
    /// reply (offset 0, as after `opendir` or `rewinddir`), and kept for the replies that go
    /// on from there, so a big directory is listed, sorted and its names decrypted once per
    /// pass rather than once per reply. (What changes during a pass may or may not show in
    /// it, as POSIX allows.) Not once the directory (or one above it) was renamed: the kept
    /// stored paths name where it was, which may hold another directory by now, whose
    /// objects a reply would show, or stat, as this one's.
    fn listing_from(&self, ino: u64, offset: usize) -> Result<Arc<Listing>> {
        let dir = self.path_of(ino)?;
        if offset > 0 {
            if let Some(kept) = self.listings.lock().unwrap().get(&ino) {
                if kept.dir == dir {
                    return Ok(kept.clone());
                }
            }
        }
        let fresh = Arc::new(self.listing(ino, dir)?);
        let mut kept = self.listings.lock().unwrap();
        if kept.len() >= 16 {
            kept.clear();
        }
        kept.insert(ino, fresh.clone());
        Ok(fresh)
    }

    /// The entries of directory `ino`, now at `path`, with their plaintext names, each (but
    /// `.` and `..`) with its stored path.
    fn listing(&self, ino: u64, path: CanonicalPath) -> Result<Listing> {
        let store = self.store();
        let meta = store
            .metadata(&path)
            .map_err(|e| io_err("cannot stat", &path, e))?;
        let parent_ino = match path.parent() {
            Some(p) => store
                .metadata(&p)
                .map(|m| self.ino_of(m.ino()))
                .unwrap_or(ROOT_INO),
            None => ROOT_INO,
        };
        let dot = |ino, name: &str| ListingEntry {
            entry: DirEntry {
                ino,
                kind: Kind::Dir,
                name: name.into(),
            },
            stored: None,
            regular: None,
            told: Default::default(),
        };
        let mut out = vec![dot(self.ino_of(meta.ino()), "."), dot(parent_ino, "..")];
        let atime = if self.read_only {
            Atime::Keep
        } else {
            Atime::Update
        };
        let mut entries = store
            .list_dir(&path, atime)
            .map_err(|e| io_err("cannot read", &path, e))?;
        entries.retain(|e| !self.volume.is_own_name(e.name.as_bytes(), path.is_root()));
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let dir_id = if self.volume.encrypted_names() {
            Some(self.dir_id_of(ino, &path)?)
        } else {
            None
        };
        for crate::backing::Entry {
            name: stored_name,
            ino,
            kind: d_type,
        } in entries
        {
            let Ok(stored) = path.join(stored_name.as_bytes()) else {
                continue;
            };
            let name =
                match self
                    .volume
                    .listed_name(&path, dir_id.as_ref(), stored_name.as_bytes())?
                {
                    Listed::Name(n) => OsString::from_vec(n),
                    Listed::Own => continue,
                    Listed::Foreign(why) => {
                        self.note_foreign(&stored, &why);
                        continue;
                    }
                };
            let kind = match d_type {
                libc::DT_DIR => Kind::Dir,
                // Any kind of object: its kind tag or its header says which, when a reply
                // needs it (see `ListingEntry`).
                libc::DT_REG => Kind::File,
                // The filesystem does not record types: ask.
                libc::DT_UNKNOWN => match self.stat_path(&stored).ok() {
                    Some(attr) => attr.kind,
                    None => continue,
                },
                // Not made by kmsfs (a symlink, fifo or device node planted on the store):
                // listed, so that its lookup fails where it is seen (EIO, logged), never shown.
                _ => Kind::File,
            };
            out.push(ListingEntry {
                entry: DirEntry {
                    ino: self.ino_of(ino),
                    kind,
                    name,
                },
                stored: Some(stored),
                regular: (d_type == libc::DT_REG).then_some(ino),
                told: Default::default(),
            });
        }
        Ok(Listing {
            dir: path,
            entries: out,
            warmed: Default::default(),
        })
    }

    /// Logs, once per mount, a backing entry whose name kmsfs did not write in that directory
    /// (with encrypted names it cannot be listed: it has no plaintext name).
    fn note_foreign(&self, stored: &CanonicalPath, why: &str) {
        if !self.noted_foreign_name.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{stored}: an entry on the backing store whose name kmsfs did not write in its \
                 directory ({why}); not shown (logged once)"
            );
        }
    }

    /// `readdir` with every entry's attributes (FUSE `READDIRPLUS`), from entry `offset` on,
    /// so a walk (`ls -l`, `find`, `rm -rf`) needs no lookup per entry. `add` takes an entry,
    /// its attributes, whether they are real (false: they could not be read, e.g. a damaged
    /// preamble; the kernel should ask again and get the error) and the next entry's offset,
    /// and says when the reply is full (that entry not taken). Entries taken count as looked up,
    /// except `.` and `..`.
    pub fn readdirplus(
        &self,
        ino: u64,
        offset: usize,
        mut add: impl FnMut(&DirEntry, &Attr, bool, u64) -> bool,
    ) -> Result<()> {
        let listing = self.listing_from(ino, offset)?;
        let dir = &listing.dir;
        self.warm_ahead(&listing, offset);
        for (
            at,
            ListingEntry {
                entry: e, stored, ..
            },
        ) in listing.entries.iter().enumerate().skip(offset)
        {
            let found = match (e.name.as_bytes(), stored) {
                (b".", None) => self.stat_path(dir).ok().map(|a| (None, a)),
                (b"..", None) => self
                    .stat_path(&dir.parent().unwrap_or(dir.clone()))
                    .ok()
                    .map(|a| (None, a)),
                (_, Some(p)) => match self.stat_path(p) {
                    Ok(a) => Some((Some(p.clone()), a)),
                    // Removed since this pass's listing was made (an `rm -rf` going on
                    // through it): not shown.
                    Err(e) if offset > 0 && e.errno() == libc::ENOENT => continue,
                    Err(_) => None,
                },
                _ => None,
            };
            let real = found.is_some();
            // An entry whose attributes could not be read goes to the kernel as a plain file
            // (or directory), never as a kind only its tag told: a node of another type than
            // one the kernel holds would be marked bad for every open descriptor.
            let (path, attr) = found.unwrap_or_else(|| {
                let kind = if e.kind == Kind::Dir {
                    Kind::Dir
                } else {
                    Kind::File
                };
                (
                    None,
                    Attr::unknown(e.ino, kind, self.volume.config().block_size),
                )
            });
            if add(e, &attr, real, at as u64 + 1) {
                return Ok(());
            }
            if let Some(path) = path {
                self.remember(attr.ino, &path);
            } else if let (false, Some(p)) = (dotted(&e.name), stored) {
                self.remember(e.ino, p);
            }
        }
        self.listing_done(ino);
        Ok(())
    }

    /// A pass of `readdir` replies reached the end of directory `ino`: its listing goes.
    fn listing_done(&self, ino: u64) {
        self.listings.lock().unwrap().remove(&ino);
    }

    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        self.store()
            .statvfs()
            .map_err(|e| Error::io("cannot statfs the backing store", e))
    }

    /// `system.*` attributes (POSIX ACLs above all) are the backing filesystem's access
    /// control of the backing entry itself, not data kept for the user: set through the mount,
    /// an ACL would open the store's entry to them (the mount's own permissions are the
    /// authenticated mode and owner; it does not do ACLs).
    fn refuse_system_xattr(name: &OsStr) -> Result<()> {
        if name.as_bytes().starts_with(b"system.") {
            return Err(os(
                "system.* extended attributes (ACLs) are not supported",
                libc::EOPNOTSUPP,
            ));
        }
        Ok(())
    }

    fn xattr_name(name: &OsStr) -> Result<CString> {
        // kmsfs's own attribute is not the user's to read or change (with encrypted names,
        // the user's attributes are stored under other names).
        if is_kind_tag(name.as_bytes()) {
            return Err(os(
                "an extended attribute name kmsfs keeps for itself",
                libc::EPERM,
            ));
        }
        // (kept as a C string: the backing module passes it to the kernel as is)
        CString::new(name.as_bytes()).map_err(|_| os("xattr name with NUL", libc::EINVAL))
    }

    /// The backing attribute a user's attribute `name` is kept in: with encrypted names an
    /// encrypted name in the `user` namespace (see [`crate::format::names::XATTR_PREFIX`]),
    /// else the name itself.
    fn stored_xattr(&self, name: &OsStr) -> Result<CString> {
        match self.volume.name_key() {
            Some(key) => {
                let stored = names::encrypt_xattr_name(key, name.as_bytes())
                    .map_err(|e| os(e.to_string(), libc::ERANGE))?;
                Ok(CString::new(stored).expect("base64url has no NUL"))
            }
            None => Self::xattr_name(name),
        }
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.check_xattrs()?;
        self.check_writable()?;
        Self::refuse_system_xattr(name)?;
        let path = self.path_of(ino)?;
        let stored = self.stored_xattr(name)?;
        let sealed;
        let value = match self.volume.name_key() {
            Some(key) => {
                let at = stored.to_str().expect("base64url is UTF-8");
                sealed = names::seal_xattr_value(key, at, rand::random(), value);
                &sealed[..]
            }
            None => value,
        };
        self.store()
            .set_xattr(&path, &stored, value, flags, Some(self.expected(ino)))
            .map_err(|e| io_err("setxattr", &path, e))
    }

    /// `size == 0` asks for the length only. Reads name no inode: they stay in the store
    /// either way, and `ls -l` asks two per file. `system.*` (ACLs) is never kept for the
    /// user: none is there to read (the backing entry's own are not the user's).
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>> {
        self.check_xattrs()?;
        // (With plaintext names, kmsfs's own attribute is not the user's either.)
        if name.as_bytes().starts_with(b"system.")
            || (self.volume.name_key().is_none() && is_kind_tag(name.as_bytes()))
        {
            return Err(os("no such attribute", libc::ENODATA));
        }
        let path = self.path_of(ino)?;
        let stored = self.stored_xattr(name)?;
        // An open file's through its descriptor, no name to resolve: the kernel asks for
        // `security.capability` before the first write to each file.
        // (Not one whose key never came: it has no descriptor to ask.)
        let node = self.open_node(ino).filter(|n| n.failure().is_none());
        let get = |size| {
            match &node {
                Some(node) => {
                    node.with_backing_file(|f| crate::backing::open::get_xattr(f, &stored, size))
                }
                None => self.store().get_xattr(&path, &stored, size, None),
            }
            .map_err(|e| io_err("getxattr", &path, e))
        };
        let Some(key) = self.volume.name_key() else {
            return get(size as usize);
        };
        let at = stored.to_str().expect("base64url is UTF-8");
        // Its length first: most asks are for attributes that are not there (`ls -l` asks two
        // per file), and a buffer for the largest value would cost a 64 KiB fill each.
        let len = get(0)?.len();
        let sealed = get(len.clamp(1, XATTR_BUFFER))?;
        let value =
            names::open_xattr_value(key, at, &sealed).map_err(|e| Error::format(&path, e))?;
        if size != 0 && value.len() > size as usize {
            return Err(os("attribute value larger than the buffer", libc::ERANGE));
        }
        Ok(value)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<Vec<u8>> {
        self.check_xattrs()?;
        let path = self.path_of(ino)?;
        let key = self.volume.name_key();
        let list = |size| {
            self.store()
                .list_xattr(&path, size, None)
                .map_err(|e| io_err("listxattr", &path, e))
        };
        // (Asked again if the list grew in between: a listing may tag the file meanwhile.)
        let mut tries = 0;
        let listed = loop {
            let len = list(0)?.len();
            if len == 0 {
                break Vec::new();
            }
            match list((len + 64).min(XATTR_BUFFER)) {
                Err(e) if e.errno() == libc::ERANGE && tries < 3 => tries += 1,
                other => break other?,
            }
        };
        // Only the attributes kmsfs encrypted: what else the backing entry carries (a
        // security label) is the backing filesystem's, not the user's.
        // (With plaintext names: all but kmsfs's own.)
        let mut out = Vec::new();
        for stored in listed.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = match key {
                Some(key) => names::decrypt_xattr_name(key, stored),
                None => (!is_kind_tag(stored)).then(|| stored.to_vec()),
            };
            if let Some(name) = name {
                out.extend_from_slice(&name);
                out.push(0);
            }
        }
        if size != 0 && out.len() > size as usize {
            return Err(os("attribute list larger than the buffer", libc::ERANGE));
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.check_xattrs()?;
        self.check_writable()?;
        Self::refuse_system_xattr(name)?;
        let path = self.path_of(ino)?;
        self.store()
            .remove_xattr(&path, &self.stored_xattr(name)?, Some(self.expected(ino)))
            .map_err(|e| io_err("removexattr", &path, e))
    }
}

/// Room for any backing attribute value or name list (Linux caps both at 64 KiB), with an
/// encrypted value's overhead.
const XATTR_BUFFER: usize = 64 * 1024 + names::XATTR_VALUE_OVERHEAD;

/// Whether a backing attribute name is kmsfs's kind tag (docs/FORMAT.md "Kind tags").
fn is_kind_tag(name: &[u8]) -> bool {
    name == crate::format::kind_tag::XATTR.to_bytes()
}

/// What a write or truncate by someone without `CAP_FSETID` clears (as the kernel does for
/// local filesystems): set-user-id always, set-group-id when group-executable (without group
/// execute it marks mandatory locking, which stays). The mode to set, or None when there is
/// nothing to clear. A `security.capability` attribute needs nothing here: the backing
/// filesystem drops it when the daemon writes the file.
fn setid_cleared(attrs: Attrs) -> Option<u32> {
    let mode = attrs.mode;
    let mut kept = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kept &= !libc::S_ISGID;
    }
    (kept != mode && attrs.kind == ObjectKind::File).then_some(kept)
}
