//! The filesystem core behind the mount: POSIX operations on a volume, in plain Rust values.
//!
//! The backing store mirrors the plaintext tree: one backing file per file, plain directories,
//! symlinks and fifos as themselves. Inode numbers are the backing store's own (the backing
//! root's is swapped with 1, which FUSE reserves for the root), so hard links share an inode
//! and `stat` is stable across remounts. The core keeps, per inode it has handed out, the
//! paths it is known by; operations on an inode use one of them.
//!
//! An open file is one [`EncryptedFile`] per inode, shared by every handle (so two handles
//! never disagree about the size), behind a read-write lock: reads run in parallel, writes
//! one at a time. Its content key lives only as long as some handle has the file open.
//!
//! Names and keys move together: a file's data key is bound to its path, so `rename` and
//! `link` first add an envelope for the new path (a `ReEncrypt`, the data key never leaves the
//! key service), then change the name on the backing store, then drop envelopes of names that
//! are gone. A crash between steps leaves the file readable at whichever path it ended at.
//! Renaming a directory does the same for every file beneath it, in parallel. Namespace
//! changes are serialized by one lock; data I/O is not.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{os, Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::Envelope;
use crate::format::header::Preamble;

use super::file::{read_header, EncryptedFile};
use super::instance::{KeyRequests, OpenNode};
use super::journal::Journal;
use super::volume::{is_reserved_name, BackingPath, Volume};

pub const ROOT_INO: u64 = 1;
/// Most names one file can have: each costs an envelope per trusted key in its header, whose
/// slots hold `NAME_ROOM` names (one kept free so a file with every name can still be renamed).
pub const MAX_LINKS: usize = crate::format::header::NAME_ROOM - 1;

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

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
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

/// Where a file's envelope set is changed: its open instance, which must see the change, or
/// else the backing file itself. Neither needs the file's data key (the header MAC key is the
/// volume's), so renaming, linking and tidying a file nobody has open costs no `Decrypt`.
enum HeaderHandle {
    Open(Arc<OpenNode>),
    Closed(File),
}

impl HeaderHandle {
    fn metadata(&self) -> std::io::Result<fs::Metadata> {
        match self {
            HeaderHandle::Open(node) => node.backing_metadata(),
            HeaderHandle::Closed(file) => file.metadata(),
        }
    }

    /// The envelope set in force.
    fn envelopes(&self, volume: &Volume, path: &CanonicalPath) -> Result<Vec<Envelope>> {
        match self {
            HeaderHandle::Open(node) => node.envelopes(),
            HeaderHandle::Closed(file) => {
                let (header, _) = read_header(file, path)?;
                let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
                Ok(authentic
                    .first()
                    .map(|(_, c)| c.envelopes.clone())
                    .unwrap_or_default())
            }
        }
    }

    /// See [`super::file::update_envelopes`]; says whether the header changed.
    fn update(
        &self,
        volume: &Volume,
        path: &CanonicalPath,
        both_slots: bool,
        change: impl FnOnce(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
    ) -> Result<bool> {
        match self {
            HeaderHandle::Open(node) => {
                node.with_mut(|file| file.update_envelopes(both_slots, change))
            }
            HeaderHandle::Closed(file) => Ok(super::file::update_envelopes(
                file,
                path,
                |id| volume.header_mac_key(id),
                both_slots,
                change,
            )?
            .is_some()),
        }
    }

    /// The open instance, if any, now answers to `path`.
    fn set_path(&self, path: &CanonicalPath) {
        if let HeaderHandle::Open(node) = self {
            node.set_path(path);
        }
    }
}

#[derive(Default)]
struct Node {
    paths: Vec<CanonicalPath>,
    lookups: u64,
}

pub struct KmsFs {
    volume: Arc<Volume>,
    read_only: bool,
    root_backing_ino: u64,
    nodes: Mutex<HashMap<u64, Node>>,
    open: Mutex<HashMap<u64, std::sync::Weak<OpenNode>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    namespace: Mutex<()>,
    journal: Journal,
    /// Opens, reads and writes that failed (authentication, key service, backing I/O).
    io_errors: Arc<AtomicU64>,
    prefetch: Prefetch,
    key_requests: KeyRequests,
    layouts: Layouts,
}

/// Block layouts (header size, block size) of files whose preamble a stat has read, by backing
/// file identity (device, inode, birth time): a preamble never changes for the life of a
/// backing file, so the next stat of it (`ls -l` then `rm -rf`, a second walk) reads nothing.
/// A file rewritten in place on the backing store keeps its identity and could be sized from
/// the old preamble; reading it still authenticates the real header. Bounded; where the
/// filesystem has no birth time nothing is remembered.
#[derive(Default)]
struct Layouts(Mutex<HashMap<(u64, u64, std::time::Duration), crate::format::block::Layout>>);

impl Layouts {
    const MAX: usize = 200_000;

    fn get(&self, id: &(u64, u64, std::time::Duration)) -> Option<crate::format::block::Layout> {
        self.0.lock().unwrap().get(id).copied()
    }

    fn put(&self, id: (u64, u64, std::time::Duration), layout: crate::format::block::Layout) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(id, layout);
    }
}

/// Key prefetch for a directory being read: when a file is opened cold, the data keys of the
/// other files in its directory are unwrapped in the background (in parallel, under the
/// keyring's concurrency limit) into the key cache, so a walk that reads every file waits for
/// one key-service round trip per directory rather than per file. Bounded: at most `limit`
/// files per directory, each directory once per `every`, at most `MAX_JOBS` directories at a
/// time; a walk that only lists (`ls -lR`) never triggers it.
struct Prefetch {
    limit: usize,
    every: std::time::Duration,
    recent: Mutex<HashMap<CanonicalPath, std::time::Instant>>,
    jobs: Arc<AtomicU64>,
}

impl Prefetch {
    const MAX_JOBS: u64 = 4;
    const THREADS: usize = 16;
}

/// A backing file's identity for [`Layouts`]: device, inode and birth time (None where the
/// filesystem keeps no birth time).
fn layout_identity(meta: &fs::Metadata) -> Option<(u64, u64, std::time::Duration)> {
    meta.created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|born| (meta.dev(), meta.ino(), born))
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

fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else if ft.is_block_device() {
        Kind::BlockDevice
    } else {
        Kind::File
    }
}

fn io_err(what: &str, path: &CanonicalPath, e: std::io::Error) -> Error {
    Error::io(format!("{what} {path}"), e)
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| os("path with NUL", libc::EINVAL))
}

/// Files per directory whose keys a cold open prefetches, by default.
pub const DEFAULT_PREFETCH: usize = 256;
/// Files created without waiting for their key that may be pending at once.
pub const DEFAULT_PENDING: usize = 256;

/// Unwraps into the key cache the data keys of up to `limit` regular files in `dir` (other
/// than `skip`), reading only their headers (without touching access times).
fn prefetch_dir(volume: &Volume, dir: &CanonicalPath, skip: &CanonicalPath, limit: usize) {
    let Ok(names) = list_dir(&volume.backing_path(dir), true) else {
        return;
    };
    let mut files: Vec<CanonicalPath> = names
        .into_iter()
        .filter(|(_, _, t)| *t == libc::DT_REG || *t == libc::DT_UNKNOWN)
        .map(|(n, _, _)| n)
        .filter(|n| !is_reserved_name(n.as_bytes(), dir.is_root()))
        .filter_map(|n| dir.join(n.as_bytes()).ok())
        .filter(|p| p != skip)
        .collect();
    files.sort();
    files.truncate(limit);
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..Prefetch::THREADS.min(files.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(p) = files.get(i) else { return };
                let _ = prefetch_key(volume, p);
            });
        }
    });
}

/// One file's key into the cache (nothing for anything but an authentic file here).
fn prefetch_key(volume: &Volume, path: &CanonicalPath) -> Result<()> {
    let backing = volume.backing_path(path);
    if !fs::symlink_metadata(&*backing).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let file =
        super::file::open_backing(&backing, false).map_err(|e| io_err("cannot open", path, e))?;
    let (header, _) = read_header(&file, path)?;
    let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
    let Some((_, slot)) = authentic.first() else {
        return Ok(());
    };
    let mine: Vec<_> = slot
        .envelopes
        .iter()
        .filter(|e| &e.path == path)
        .map(|e| &e.key)
        .collect();
    if !mine.is_empty() {
        volume
            .keyring()
            .unwrap(&mine, &volume.file_context(path))
            .map_err(|e| Error::key(path, e))?;
    }
    Ok(())
}

/// The names in a backing directory. With `noatime` (a read-only mount) the directory is
/// opened with `O_NOATIME`, so listing it writes nothing to the backing store.
/// Each with the inode number and type the directory itself records (`d_ino`, `d_type`), so a
/// listing needs no stat per entry.
fn list_dir(path: &Path, noatime: bool) -> std::io::Result<Vec<(OsString, u64, u8)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: a valid path; the descriptor is handed to fdopendir below, which owns it.
    let mut fd = unsafe {
        libc::open(
            c.as_ptr(),
            flags | if noatime { libc::O_NOATIME } else { 0 },
        )
    };
    if fd < 0 && noatime && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        // SAFETY: as above.
        fd = unsafe { libc::open(c.as_ptr(), flags) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is an open directory descriptor; on success the stream owns it.
    let dir = unsafe { libc::fdopendir(fd) };
    if dir.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so fd is still ours to close.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: dir is an open stream; the entry is valid until the next readdir.
        let entry = unsafe { libc::readdir64(dir) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            // SAFETY: the entry is valid until the next readdir.
            let (ino, kind) = unsafe { ((*entry).d_ino, (*entry).d_type) };
            names.push((OsString::from_vec(bytes.to_vec()), ino, kind));
        }
    }
    // SAFETY: closes the stream and its descriptor.
    unsafe { libc::closedir(dir) };
    Ok(names)
}

/// The distinct paths a set of envelopes is bound to (the names a file has, or had).
fn envelope_paths(envelopes: &[Envelope]) -> Vec<CanonicalPath> {
    let mut paths: Vec<CanonicalPath> = envelopes.iter().map(|e| e.path.clone()).collect();
    paths.sort();
    paths.dedup();
    paths
}

fn check_errno(r: libc::c_int, what: &str) -> Result<()> {
    if r < 0 {
        Err(Error::io(what, std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

impl KmsFs {
    pub fn new(volume: Volume, read_only: bool) -> Result<Self> {
        let root_meta = fs::metadata(volume.root())
            .map_err(|e| Error::io(format!("cannot stat {}", volume.root().display()), e))?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                paths: vec![CanonicalPath::root()],
                lookups: 1,
            },
        );
        let journal = Journal::new(volume.root());
        let volume = Arc::new(volume);
        let io_errors = Arc::new(AtomicU64::new(0));
        let core = KmsFs {
            key_requests: KeyRequests::new(volume.clone(), DEFAULT_PENDING, io_errors.clone()),
            volume,
            read_only,
            root_backing_ino: root_meta.ino(),
            nodes: Mutex::new(nodes),
            open: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            namespace: Mutex::new(()),
            journal,
            io_errors,
            layouts: Layouts::default(),
            prefetch: Prefetch {
                limit: DEFAULT_PREFETCH,
                every: std::time::Duration::from_secs(60),
                recent: Mutex::new(HashMap::new()),
                jobs: Arc::new(AtomicU64::new(0)),
            },
        };
        if !read_only {
            core.finish_interrupted_rebinds();
        }
        Ok(core)
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

    /// Files per directory whose keys a cold open prefetches (0: none).
    pub fn set_key_prefetch(&mut self, files: usize) {
        self.prefetch.limit = files;
    }

    /// Starts prefetching the keys of the files beside `path` (see [`Prefetch`]).
    fn prefetch_beside(&self, path: &CanonicalPath) {
        let p = &self.prefetch;
        let Some(dir) = path.parent() else { return };
        if p.limit == 0 || p.jobs.load(Ordering::Relaxed) >= Prefetch::MAX_JOBS {
            return;
        }
        {
            let now = std::time::Instant::now();
            let mut recent = p.recent.lock().unwrap();
            if recent
                .get(&dir)
                .is_some_and(|t| now.duration_since(*t) < p.every)
            {
                return;
            }
            if recent.len() > 4096 {
                recent.retain(|_, t| now.duration_since(*t) < p.every);
            }
            recent.insert(dir.clone(), now);
        }
        p.jobs.fetch_add(1, Ordering::Relaxed);
        let (volume, jobs, limit, skip) =
            (self.volume.clone(), p.jobs.clone(), p.limit, path.clone());
        let spawned = std::thread::Builder::new()
            .name("kmsfs-prefetch".into())
            .spawn(move || {
                prefetch_dir(&volume, &dir, &skip, limit);
                jobs.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            p.jobs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Inodes the kernel has looked up and not yet forgotten: what the daemon's table holds.
    pub fn known_inodes(&self) -> usize {
        self.nodes.lock().unwrap().len()
    }

    /// Opens, reads and writes that have failed since the mount (for `kmsfs status`).
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// The FUSE inode of a backing inode (the backing root and inode 1 trade places). Files
    /// are never replaced by new inodes while mounted, so the numbers stay meaningful.
    fn ino_of(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    fn path_of(&self, ino: u64) -> Result<CanonicalPath> {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .get(&ino)
            .and_then(|n| n.paths.first().cloned())
            .ok_or_else(|| os(format!("inode {ino}"), libc::ESTALE))
    }

    fn backing(&self, path: &CanonicalPath) -> BackingPath {
        self.volume.backing_path(path)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<CanonicalPath> {
        if is_reserved_name(name.as_bytes(), parent == ROOT_INO) {
            return Err(os(format!("{name:?} is reserved"), libc::EPERM));
        }
        self.path_of(parent)?
            .join(name.as_bytes())
            .map_err(|_| os(format!("bad name {name:?}"), libc::EINVAL))
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(os("read-only mount", libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Remembers that `ino` is reachable at `path` (now its preferred path) and counts one
    /// kernel lookup. Paths it is no longer found at (moved behind the mount) are dropped.
    fn remember(&self, ino: u64, path: &CanonicalPath) {
        let mut gone = Vec::new();
        {
            let mut nodes = self.nodes.lock().unwrap();
            let node = nodes.entry(ino).or_default();
            if node.paths.first() != Some(path) {
                node.paths.retain(|p| {
                    let here = p != path
                        && fs::symlink_metadata(self.backing(p))
                            .is_ok_and(|m| self.ino_of(m.ino()) == ino);
                    if !here && p != path {
                        gone.push(p.clone());
                    }
                    here
                });
                node.paths.insert(0, path.clone());
            }
            node.lookups += 1;
        }
        // A directory found under a new name carries what the kernel knows beneath it along.
        for old in gone {
            self.move_known_paths(&old, path, false);
        }
    }

    /// `path` no longer names inode `ino`. Looking at that one node, not all of them, is what
    /// keeps `rm -rf` of a big tree linear.
    fn forget_path(&self, ino: u64, path: &CanonicalPath) {
        if let Some(node) = self.nodes.lock().unwrap().get_mut(&ino) {
            node.paths.retain(|p| p != path);
        }
    }

    /// Every known path equal to `from` or beneath it moves beneath `to` (for a file, only
    /// its own node `ino` is looked at).
    fn move_paths(&self, ino: Option<u64>, from: &CanonicalPath, to: &CanonicalPath) {
        if let Some(ino) = ino {
            if let Some(node) = self.nodes.lock().unwrap().get_mut(&ino) {
                for p in node.paths.iter_mut().filter(|p| *p == from) {
                    *p = to.clone();
                }
            }
            return;
        }
        self.move_known_paths(from, to, true)
    }

    /// Known paths beneath `from` (and `from` itself if `exact`) move to `to`.
    fn move_known_paths(&self, from: &CanonicalPath, to: &CanonicalPath, exact: bool) {
        let prefix = format!("{}/", from.as_str());
        let mut nodes = self.nodes.lock().unwrap();
        for node in nodes.values_mut() {
            for p in node.paths.iter_mut() {
                if exact && p == from {
                    *p = to.clone();
                } else if let Some(rest) = p.as_str().strip_prefix(&prefix) {
                    let moved = format!("{}/{rest}", to.as_str());
                    *p = CanonicalPath::from_encoded(&moved)
                        .expect("joined canonical paths are canonical");
                }
            }
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(node) = nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                nodes.remove(&ino);
            }
        }
    }

    /// The plaintext size of a regular file: from its open instance, else from its preamble
    /// and length (one 64-byte read, no key; remembered, see [`Layouts`]).
    fn plaintext_size(&self, ino: u64, backing: &Path, meta: &fs::Metadata) -> Result<u64> {
        let len = meta.len();
        if let Some(node) = self.open_node(ino) {
            return Ok(node.size());
        }
        let identity = layout_identity(meta);
        if let Some(layout) = identity.and_then(|id| self.layouts.get(&id)) {
            return layout
                .plaintext_len(len)
                .map_err(|e| Error::format(backing.display(), e));
        }
        // A stat is not an access: the preamble read leaves the access time alone.
        let file = super::file::open_backing(backing, false)
            .map_err(|e| Error::io(format!("cannot open {}", backing.display()), e))?;
        let mut pre = [0u8; crate::format::header::PREAMBLE_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut pre, 0).map_err(|_| {
            os(
                format!("{}: shorter than a header", backing.display()),
                libc::EIO,
            )
        })?;
        let pre = Preamble::decode(&pre).map_err(|e| Error::format(backing.display(), e))?;
        let layout = crate::format::block::Layout {
            data_offset: pre.data_offset(),
            block_size: pre.block_size,
        };
        if let Some(id) = identity {
            self.layouts.put(id, layout);
        }
        layout
            .plaintext_len(len)
            .map_err(|e| Error::format(backing.display(), e))
    }

    fn attr_from(&self, path: &CanonicalPath, meta: &fs::Metadata) -> Result<Attr> {
        let ino = self.ino_of(meta.ino());
        let kind = kind_of(meta.file_type());
        let size = if kind == Kind::File {
            self.plaintext_size(ino, &self.backing(path), meta)?
        } else {
            meta.len()
        };
        let time = |s: i64, ns: i64| {
            if s >= 0 {
                SystemTime::UNIX_EPOCH + std::time::Duration::new(s as u64, ns as u32)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Attr {
            ino,
            size,
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: self.volume.config().block_size,
        })
    }

    fn stat_path(&self, path: &CanonicalPath) -> Result<Attr> {
        let meta =
            fs::symlink_metadata(self.backing(path)).map_err(|e| io_err("cannot stat", path, e))?;
        self.attr_from(path, &meta)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let path = self
            .child(parent, name)
            .map_err(|_| os("no such name", libc::ENOENT))?;
        let attr = self.stat_path(&path)?;
        self.remember(attr.ino, &path);
        Ok(attr)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        match self.path_of(ino) {
            Ok(path) => self.stat_path(&path),
            // An open file whose last name is gone (unlinked while open) is still there.
            Err(e) => {
                let node = self.open_node(ino).ok_or(e)?;
                let (path, meta) = (node.path(), node.backing_metadata());
                let meta = meta.map_err(|e| io_err("cannot stat", &path, e))?;
                let mut attr = self.attr_from(&path, &meta)?;
                attr.ino = ino;
                Ok(attr)
            }
        }
    }

    /// Gives a newly created entry its owner and exact permissions `perm` (None for symlinks)
    /// and hands out its attributes (counting the kernel's lookup). The permissions are set
    /// after the owner because chown clears set-id bits, and because the daemon's own umask
    /// must not apply. In a set-group-id directory the entry keeps the directory's group (and
    /// a new directory its set-group-id bit), as on any Linux filesystem.
    fn created(&self, path: &CanonicalPath, caller: Caller, perm: Option<u32>) -> Result<Attr> {
        let backing = self.backing(path);
        let parent_sgid = backing
            .parent()
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.mode() & libc::S_ISGID != 0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let c = cstr(&backing)?;
            let gid = if parent_sgid { u32::MAX } else { caller.gid };
            // SAFETY: c is a valid NUL-terminated path; gid -1 leaves the group as it is.
            check_errno(
                unsafe { libc::lchown(c.as_ptr(), caller.uid, gid) },
                "lchown",
            )?;
        }
        if let Some(mut perm) = perm {
            let meta =
                fs::symlink_metadata(&backing).map_err(|e| io_err("cannot stat", path, e))?;
            if parent_sgid && meta.is_dir() {
                perm |= libc::S_ISGID;
            }
            fs::set_permissions(&backing, fs::Permissions::from_mode(perm))
                .map_err(|e| io_err("cannot chmod", path, e))?;
        }
        let attr = self.stat_path(path)?;
        self.remember(attr.ino, path);
        Ok(attr)
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
        let path = self.path_of(ino)?;
        let backing = self.backing(&path);
        if kill_setid && mode.is_none() {
            let meta = fs::symlink_metadata(&backing).map_err(|e| Error::io("stat", e))?;
            drop_setid(&meta, &backing)?;
        }
        if let Some(size) = size {
            match fh.and_then(|fh| self.handles.lock().unwrap().get(&fh).cloned()) {
                Some(h) => h.node.set_len(size)?,
                None => self.with_file(ino, &path, |f| f.set_len(size))?,
            }
        }
        if let Some(mode) = mode {
            fs::set_permissions(&backing, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| io_err("cannot chmod", &path, e))?;
        }
        if uid.is_some() || gid.is_some() {
            let c = cstr(&backing)?;
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            // SAFETY: c is a valid path; -1 (u32::MAX) leaves an id unchanged.
            check_errno(unsafe { libc::lchown(c.as_ptr(), u, g) }, "chown")?;
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
            let c = cstr(&backing)?;
            let set = || super::set_times_at(&c, &times).map_err(|e| Error::io("utimensat", e));
            // Not while a pending file's key arrives (it keeps the times it had).
            let node = self.open_node(ino);
            match node {
                Some(node) => node.exclusive(set),
                None => set(),
            }?;
        }
        self.stat_path(&path)
    }

    /// The shared open instance of `ino`, if some handle (or a pending key request) holds one.
    fn open_node(&self, ino: u64) -> Option<Arc<OpenNode>> {
        self.open
            .lock()
            .unwrap()
            .get(&ino)
            .and_then(|w| w.upgrade())
    }

    /// The handle through which to change the header of the file `ino` at `path`.
    fn header_of(&self, ino: u64, path: &CanonicalPath) -> Result<HeaderHandle> {
        let node = self.open_node(ino);
        if let Some(node) = node {
            return Ok(HeaderHandle::Open(node));
        }
        super::file::open_backing(&self.backing(path), true)
            .map(HeaderHandle::Closed)
            .map_err(|e| io_err("cannot open", path, e))
    }

    /// Runs `f` on the file's shared open instance (so it sees header changes), or on a
    /// temporary one.
    fn with_file<T>(
        &self,
        ino: u64,
        path: &CanonicalPath,
        f: impl FnOnce(&mut EncryptedFile) -> Result<T>,
    ) -> Result<T> {
        let node = self.open_node(ino);
        if let Some(node) = node {
            return node.with_mut(f);
        }
        let mut file = EncryptedFile::open(&self.volume, path, !self.read_only)?;
        f(&mut file)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let path = self.path_of(ino)?;
        let target =
            fs::read_link(self.backing(&path)).map_err(|e| io_err("cannot readlink", &path, e))?;
        Ok(target.into_os_string().into_vec())
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
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        if mode & libc::S_IFMT == libc::S_IFREG {
            let (attr, fh) = self.create_file(&path, mode, caller)?;
            self.release(fh);
            return Ok(attr);
        }
        // Fifos, sockets and device nodes are made as themselves on the backing store (device
        // nodes need root there, and the mount is nodev, so they never open a device).
        let backing = self.backing(&path);
        let c = cstr(&backing)?;
        // SAFETY: valid path.
        check_errno(
            unsafe { libc::mknod(c.as_ptr(), mode & !caller.umask, rdev as libc::dev_t) },
            "mknod",
        )?;
        self.created(&path, caller, Some(mode & !caller.umask & 0o7777))
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        let backing = self.backing(&path);
        fs::create_dir(&backing).map_err(|e| io_err("cannot mkdir", &path, e))?;
        self.created(&path, caller, Some(mode & !caller.umask & 0o7777))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> Result<Attr> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        std::os::unix::fs::symlink(target, self.backing(&path))
            .map_err(|e| io_err("cannot symlink", &path, e))?;
        self.created(&path, caller, None)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        let backing = self.backing(&path);
        let meta = fs::symlink_metadata(&backing).map_err(|e| io_err("cannot stat", &path, e))?;
        if meta.is_file() && meta.nlink() > 1 {
            // Another name keeps the file: unlink, then drop this name's envelopes. The
            // journal names the file's other names, where a tidy would find it.
            let header = self.header_of(self.ino_of(meta.ino()), &path)?;
            let names = envelope_paths(&header.envelopes(&self.volume, &path)?);
            let pending = self.journal.begin(&names)?;
            fs::remove_file(&backing).map_err(|e| io_err("cannot unlink", &path, e))?;
            self.unbind_path(&header, &path, &path)?;
            pending.finish();
        } else {
            fs::remove_file(&backing).map_err(|e| io_err("cannot unlink", &path, e))?;
        }
        self.forget_path(self.ino_of(meta.ino()), &path);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        let backing = self.backing(&path);
        let meta = fs::symlink_metadata(&backing).map_err(|e| io_err("cannot rmdir", &path, e))?;
        fs::remove_dir(&backing).map_err(|e| io_err("cannot rmdir", &path, e))?;
        self.forget_path(self.ino_of(meta.ino()), &path);
        Ok(())
    }

    /// Those of `envelopes` whose path still names the file `me` (and any for `also`, a name
    /// being given to it).
    fn live_envelopes(
        &self,
        envelopes: &[Envelope],
        me: &fs::Metadata,
        also: &CanonicalPath,
    ) -> Vec<Envelope> {
        envelopes
            .iter()
            .filter(|e| {
                &e.path == also
                    || fs::symlink_metadata(self.backing(&e.path))
                        .is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev())
            })
            .cloned()
            .collect()
    }

    /// Adds to a file an envelope for `to` beside each of its envelopes for `from`.
    fn bind_extra_path(
        &self,
        header: &HeaderHandle,
        from: &CanonicalPath,
        to: &CanonicalPath,
    ) -> Result<()> {
        let (from_ctx, to_ctx) = (self.volume.file_context(from), self.volume.file_context(to));
        // Names this file no longer has (replaced by a rename over them, or a crash between
        // steps) only take header room: drop their envelopes first.
        let me = header
            .metadata()
            .map_err(|e| io_err("cannot stat", from, e))?;
        header.update(&self.volume, from, false, |slots| {
            let current = slots[0];
            let mut envelopes = self.live_envelopes(current, &me, from);
            let pruned = envelopes.len() != current.len();
            let mut added = Vec::new();
            for e in envelopes.iter().filter(|e| &e.path == from) {
                if envelopes
                    .iter()
                    .any(|o| &o.path == to && o.key.key_id == e.key.key_id)
                {
                    continue;
                }
                let key = self
                    .volume
                    .keyring()
                    .rewrap(&e.key, &from_ctx, &e.key.key_id, &to_ctx)
                    .map_err(|err| Error::key(from, err))?;
                added.push(Envelope {
                    path: to.clone(),
                    key,
                });
            }
            if added.is_empty() && !pruned {
                return Ok(None);
            }
            envelopes.extend(added);
            Ok(Some(envelopes))
        })?;
        Ok(())
    }

    /// Drops the envelopes of names the file at `path` no longer has, in both header slots.
    /// Changes nothing unless an envelope for `path` itself stays. Says whether it changed
    /// the file.
    fn tidy_file(&self, path: &CanonicalPath) -> Result<bool> {
        match fs::symlink_metadata(self.backing(path)) {
            Ok(m) if m.is_file() => {}
            _ => return Ok(false),
        }
        let header = self.header_of(self.ino_at(path), path)?;
        let me = header
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?;
        header.update(&self.volume, path, true, |slots| {
            // The older slot counts too: a crash between the two writes of an unbind leaves
            // the dropped name there.
            let stale_in_some_slot = slots
                .iter()
                .any(|set| self.live_envelopes(set, &me, path).len() != set.len());
            let live = self.live_envelopes(slots[0], &me, path);
            if !stale_in_some_slot || !live.iter().any(|e| &e.path == path) {
                return Ok(None);
            }
            Ok(Some(live))
        })
    }

    /// Tidies every file at or beneath each of `paths` that exists; returns how many changed.
    fn tidy_paths(&self, paths: &[CanonicalPath]) -> Result<usize> {
        let mut files = Vec::new();
        for p in paths {
            match fs::symlink_metadata(self.backing(p)) {
                Ok(m) if m.is_dir() => files.extend(self.volume.files_beneath(p)?),
                Ok(m) if m.is_file() => files.push(p.clone()),
                _ => {}
            }
        }
        files.sort();
        files.dedup();
        let changed = AtomicU64::new(0);
        self.parallel(&files, |p| {
            if self.tidy_file(p)? {
                changed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?;
        Ok(changed.into_inner() as usize)
    }

    /// Tidies the names recorded by rebinds a crash cut short (see [`super::journal`]). A
    /// record whose files cannot all be tidied now is kept for the next mount.
    fn finish_interrupted_rebinds(&self) {
        for (record, paths) in self.journal.pending() {
            let paths = match paths {
                Ok(paths) => paths,
                Err(e) => {
                    // Records are fsynced before a rebind's first step, so one that does not
                    // parse was torn by a crash before anything changed.
                    tracing::warn!("dropping a torn rebind record: {e}");
                    self.journal.remove(&record);
                    continue;
                }
            };
            match self.tidy_paths(&paths) {
                Ok(changed) => {
                    tracing::info!(
                        files = changed,
                        "tidied stale envelopes left by an interrupted rename, link or unlink"
                    );
                    self.journal.remove(&record);
                }
                Err(e) => tracing::warn!(
                    "cannot yet tidy after an interrupted rename ({}): {e}",
                    record.display()
                ),
            }
        }
    }

    /// Drops a file's envelopes for `gone`, in both header slots (so no slot still opens the
    /// file at a name it no longer has).
    fn unbind_path(
        &self,
        header: &HeaderHandle,
        path: &CanonicalPath,
        gone: &CanonicalPath,
    ) -> Result<()> {
        header.update(&self.volume, path, true, |slots| {
            let current = slots[0];
            let keep: Vec<Envelope> = current
                .iter()
                .filter(|e| &e.path != gone)
                .cloned()
                .collect();
            if keep.len() == current.len() || keep.is_empty() {
                return Ok(None);
            }
            Ok(Some(keep))
        })?;
        Ok(())
    }

    /// Runs `f` over `items` on up to 8 threads (KMS calls dominate; the keyring bounds them).
    fn parallel<T: Sync>(&self, items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
        let workers = items.len().clamp(1, 8);
        let next = AtomicU64::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= items.len() || first_err.lock().unwrap().is_some() {
                        return;
                    }
                    if let Err(e) = f(&items[i]) {
                        first_err.lock().unwrap().get_or_insert(e);
                    }
                });
            }
        });
        match first_err.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The new path of `p` when `from` becomes `to` (p is `from` or beneath it).
    fn moved(p: &CanonicalPath, from: &CanonicalPath, to: &CanonicalPath) -> CanonicalPath {
        if p == from {
            return to.clone();
        }
        let rest = &p.as_str()[from.as_str().len()..];
        CanonicalPath::from_encoded(&format!("{}{rest}", to.as_str())).expect("canonical")
    }

    /// The inode of the file at `path` if the core has it open (its instance must see header
    /// changes), for `with_file`.
    fn ino_at(&self, path: &CanonicalPath) -> u64 {
        fs::symlink_metadata(self.backing(path))
            .map(|m| self.ino_of(m.ino()))
            .unwrap_or(0)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        if from == to {
            return Ok(());
        }
        let (bfrom, bto) = (self.backing(&from), self.backing(&to));
        let meta = fs::symlink_metadata(&bfrom).map_err(|e| io_err("cannot stat", &from, e))?;
        // What the rename replaces, if anything (the namespace lock keeps it so).
        let target = fs::symlink_metadata(&bto).ok();
        if noreplace && target.is_some() {
            return Err(os("target exists", libc::EEXIST));
        }
        if meta.is_dir() && to.as_str().starts_with(&format!("{}/", from.as_str())) {
            return Err(os("cannot move a directory into itself", libc::EINVAL));
        }
        let files = if meta.is_dir() {
            self.volume.files_beneath(&from)?
        } else if meta.is_file() {
            vec![from.clone()]
        } else {
            vec![]
        };
        // A file replaced by the rename that keeps other names keeps an envelope for `to`
        // until tidied; its envelopes say where those names are.
        let replaced_names = match &target {
            Some(m) if m.is_file() && m.nlink() > 1 => File::open(&bto)
                .ok()
                .and_then(|f| read_header(&f, &to).ok())
                .map(|(h, _)| {
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
        // 1. Every file gains envelopes for its new path.
        let bound = self.parallel(&files, |p| {
            let new = Self::moved(p, &from, &to);
            self.header_of(self.ino_at(p), p)
                .and_then(|h| self.bind_extra_path(&h, p, &new))
                .map_err(|e| match e {
                    Error::Format {
                        source: crate::format::FormatError::TooLarge(why),
                        ..
                    } => {
                        let e = os(
                            format!(
                                "{p} has no header room for the name {new} ({why}; headers are \
                                 sized when a file is created, for names up to a little longer \
                                 than its first); copy the file there instead"
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
            if self.tidy_paths(std::slice::from_ref(&from)).is_ok() {
                if let Some(pending) = pending {
                    pending.finish();
                }
            }
            return Err(e);
        }
        // 2. The name changes.
        fs::rename(&bfrom, &bto).map_err(|e| io_err("cannot rename", &from, e))?;
        if let Some(m) = &target {
            self.forget_path(self.ino_of(m.ino()), &to);
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
        self.tidy_paths(&replaced_names)?;
        if let Some(pending) = pending {
            pending.finish();
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        self.check_writable()?;
        let _ns = self.namespace.lock().unwrap();
        let from = self.path_of(ino)?;
        let to = self.child(newparent, newname)?;
        let meta = fs::symlink_metadata(self.backing(&from))
            .map_err(|e| io_err("cannot stat", &from, e))?;
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
                .and_then(|h| self.bind_extra_path(&h, &from, &to))
                .and_then(|()| {
                    fs::hard_link(self.backing(&from), self.backing(&to))
                        .map_err(|e| io_err("cannot link", &from, e))
                });
            if let Err(e) = linked {
                // Drop the new envelope if it was added (else the record stays for the next
                // mount).
                if self.tidy_paths(std::slice::from_ref(&from)).is_ok() {
                    pending.finish();
                }
                return Err(e);
            }
            pending.finish();
        } else {
            fs::hard_link(self.backing(&from), self.backing(&to))
                .map_err(|e| io_err("cannot link", &from, e))?;
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

    /// A new file that appears on the backing store with its header already written: made
    /// unnamed (`O_TMPFILE`) in its directory, given its key and header, then linked to its
    /// name. A crash can then never leave a file without a header. None where the backing
    /// filesystem has no `O_TMPFILE` (or /proc is missing): create it in place instead.
    fn create_linked(
        &self,
        path: &CanonicalPath,
        backing: &BackingPath,
        perm: u32,
    ) -> Option<Result<(EncryptedFile, u64)>> {
        use std::os::fd::AsRawFd;
        let dir = backing.parent()?;
        let tmp = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(perm)
            .open(dir)
            .ok()?;
        let started = std::time::Instant::now();
        let enc = match EncryptedFile::create(&self.volume, path, tmp) {
            Ok(enc) => enc,
            Err(e) => return Some(Err(e)),
        };
        self.key_requests.answered(started.elapsed());
        let file = enc.backing_file();
        let ino = match file.metadata() {
            Ok(m) => m.ino(),
            Err(e) => return Some(Err(io_err("cannot stat", path, e))),
        };
        // Past this point the key exists: fail rather than fall back (a second key).
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("a /proc path has no NUL");
        let to = match cstr(backing) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        // SAFETY: two valid C strings; AT_SYMLINK_FOLLOW links the file the fd names.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Some(Err(io_err("cannot create", path, e)));
        }
        Some(Ok((enc, ino)))
    }

    fn create_file(&self, path: &CanonicalPath, mode: u32, caller: Caller) -> Result<(Attr, u64)> {
        let backing = self.backing(path);
        let perm = mode & !caller.umask & 0o7777;
        if !self.key_requests.would_take() {
            if let Some(made) = self.create_linked(path, &backing, perm) {
                let (enc, backing_ino) = made?;
                return self.open_created(path, caller, perm, OpenNode::ready(enc), backing_ino);
            }
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(perm)
            .open(&backing)
            .map_err(|e| io_err("cannot create", path, e))?;
        let remove = |e| {
            let _ = fs::remove_file(&backing);
            e
        };
        let backing_ino = file
            .metadata()
            .map_err(|e| remove(io_err("cannot stat", path, e)))?
            .ino();
        let pending = Arc::new(OpenNode::pending(
            path.clone(),
            file.try_clone()
                .map_err(|e| remove(io_err("cannot reopen", path, e)))?,
        ));
        if self.key_requests.submit(&pending) {
            return self.open_created(path, caller, perm, pending, backing_ino);
        }
        let started = std::time::Instant::now();
        let enc = EncryptedFile::create(&self.volume, path, file).map_err(remove)?;
        self.key_requests.answered(started.elapsed());
        self.open_created(path, caller, perm, OpenNode::ready(enc), backing_ino)
    }

    /// A created file's instance goes in the table (before the first stat: a pending file's
    /// size is the instance's), then its owner and permissions, then a writable handle.
    fn open_created(
        &self,
        path: &CanonicalPath,
        caller: Caller,
        perm: u32,
        node: impl Into<Arc<OpenNode>>,
        backing_ino: u64,
    ) -> Result<(Attr, u64)> {
        let node = node.into();
        let ino = self.ino_of(backing_ino);
        self.open.lock().unwrap().insert(ino, Arc::downgrade(&node));
        let attr = self.created(path, caller, Some(perm))?;
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
        let _ns = self.namespace.lock().unwrap();
        let path = self.child(parent, name)?;
        let (attr, fh) = self.create_file(&path, mode, caller)?;
        if flags & libc::O_APPEND != 0 {
            let h = self.handles.lock().unwrap().remove(&fh).expect("just made");
            let fh2 = self.new_handle(h.ino, h.node.clone(), true, true);
            return Ok((attr, fh2));
        }
        Ok((attr, fh))
    }

    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if writable || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        let path = self.path_of(ino)?;
        let node = {
            let mut open = self.open.lock().unwrap();
            match open.get(&ino).and_then(|w| w.upgrade()) {
                Some(n) => n,
                None => {
                    let file = EncryptedFile::open(&self.volume, &path, !self.read_only)
                        .inspect_err(|e| {
                            self.io_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::error!("open failed: {e}");
                        })?;
                    self.prefetch_beside(&path);
                    let n = Arc::new(OpenNode::ready(file));
                    open.insert(ino, Arc::downgrade(&n));
                    n
                }
            }
        };
        if flags & libc::O_TRUNC != 0 {
            node.set_len(0)?;
        }
        Ok(self.new_handle(ino, node, writable, flags & libc::O_APPEND != 0))
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
        let n = h.node.read_at(offset, &mut buf).inspect_err(|e| {
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
        // The open backing file answers without a path walk: this runs before every write
        // by someone other than root.
        let meta = h
            .node
            .backing_metadata()
            .map_err(|e| Error::io("stat", e))?;
        drop_setid(&meta, &self.backing(&h.node.path()))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(os("not open for writing", libc::EBADF));
        }
        let offset = if h.append { None } else { Some(offset) };
        h.node.write_at(offset, data).inspect_err(|e| {
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

    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let path = self.path_of(ino)?;
        let backing = self.backing(&path);
        let meta = fs::metadata(&backing).map_err(|e| io_err("cannot stat", &path, e))?;
        let parent_ino = match backing.parent().filter(|_| !path.is_root()) {
            Some(p) => fs::metadata(p)
                .map(|m| self.ino_of(m.ino()))
                .unwrap_or(ROOT_INO),
            None => ROOT_INO,
        };
        let mut out = vec![
            DirEntry {
                ino: self.ino_of(meta.ino()),
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: parent_ino,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        let mut entries =
            list_dir(&backing, self.read_only).map_err(|e| io_err("cannot read", &path, e))?;
        entries.retain(|(n, _, _)| !is_reserved_name(n.as_bytes(), path.is_root()));
        entries.sort();
        for (name, ino, d_type) in entries {
            let kind = match d_type {
                libc::DT_REG => Kind::File,
                libc::DT_DIR => Kind::Dir,
                libc::DT_LNK => Kind::Symlink,
                libc::DT_FIFO => Kind::Fifo,
                libc::DT_SOCK => Kind::Socket,
                libc::DT_CHR => Kind::CharDevice,
                libc::DT_BLK => Kind::BlockDevice,
                // The filesystem does not record types: ask.
                _ => match fs::symlink_metadata(backing.join(&name)) {
                    Ok(m) => kind_of(m.file_type()),
                    Err(_) => continue,
                },
            };
            out.push(DirEntry {
                ino: self.ino_of(ino),
                kind,
                name,
            });
        }
        Ok(out)
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
        let dir = self.path_of(ino)?;
        let entries = self.readdir(ino)?;
        if offset == 0 {
            self.warm_layouts(&dir, &entries);
        }
        for (at, e) in entries.iter().enumerate().skip(offset) {
            let found = match e.name.as_bytes() {
                b"." => self.stat_path(&dir).ok().map(|a| (None, a)),
                b".." => self
                    .stat_path(&dir.parent().unwrap_or(dir.clone()))
                    .ok()
                    .map(|a| (None, a)),
                name => dir
                    .join(name)
                    .ok()
                    .and_then(|p| self.stat_path(&p).ok().map(|a| (Some(p), a))),
            };
            let real = found.is_some();
            let (path, attr) = found.unwrap_or_else(|| {
                (
                    None,
                    Attr::unknown(e.ino, e.kind, self.volume.config().block_size),
                )
            });
            if add(e, &attr, real, at as u64 + 1) {
                return Ok(());
            }
            if let Some(path) = path {
                self.remember(attr.ino, &path);
            } else if let (false, Ok(p)) = (dotted(&e.name), dir.join(e.name.as_bytes())) {
                self.remember(e.ino, &p);
            }
        }
        Ok(())
    }

    /// Before a directory's first listing with attributes: if its files' layouts are not known
    /// (a fresh mount, a cold cache), read their preambles on a few threads at once, so the
    /// disk sees them in parallel rather than one per entry as the listing goes.
    fn warm_layouts(&self, dir: &CanonicalPath, entries: &[DirEntry]) {
        const THREADS: usize = 4;
        let files: Vec<CanonicalPath> = entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| dir.join(e.name.as_bytes()).ok())
            .collect();
        if files.len() < 2 * THREADS {
            return;
        }
        // One file tells whether this directory was seen already.
        let known = fs::symlink_metadata(self.backing(&files[0]))
            .ok()
            .and_then(|m| layout_identity(&m))
            .is_some_and(|id| self.layouts.get(&id).is_some());
        if known {
            return;
        }
        std::thread::scope(|s| {
            for part in files.chunks(files.len().div_ceil(THREADS)) {
                s.spawn(move || {
                    for p in part {
                        let _ = self.stat_path(p);
                    }
                });
            }
        });
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        let c = cstr(self.volume.root())?;
        // SAFETY: zeroed statvfs is a valid out-parameter; c is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        check_errno(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, "statvfs")?;
        Ok(st)
    }

    /// The backing path of `ino` as a C string, with the value that keeps it valid.
    fn xattr_path(&self, ino: u64) -> Result<(BackingPath, CString)> {
        let backing = self.backing(&self.path_of(ino)?);
        let c = cstr(&backing)?;
        Ok((backing, c))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.check_writable()?;
        let ((_backing, p), n) = (
            self.xattr_path(ino)?,
            CString::new(name.as_bytes()).map_err(|_| os("name", libc::EINVAL))?,
        );
        // SAFETY: valid C strings and a value buffer of the given length.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        };
        check_errno(r, "setxattr")
    }

    /// `size == 0` asks for the length only.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>> {
        let ((_backing, p), n) = (
            self.xattr_path(ino)?,
            CString::new(name.as_bytes()).map_err(|_| os("name", libc::EINVAL))?,
        );
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has `size` bytes (or is empty with size 0, a length query).
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(Error::io("getxattr", std::io::Error::last_os_error()));
        }
        if size == 0 {
            return Ok(vec![0; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<Vec<u8>> {
        let (_backing, p) = self.xattr_path(ino)?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: as for getxattr.
        let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(Error::io("listxattr", std::io::Error::last_os_error()));
        }
        if size == 0 {
            return Ok(vec![0; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let ((_backing, p), n) = (
            self.xattr_path(ino)?,
            CString::new(name.as_bytes()).map_err(|_| os("name", libc::EINVAL))?,
        );
        // SAFETY: valid C strings.
        check_errno(
            unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) },
            "removexattr",
        )
    }
}

/// Clears what a write or truncate by someone without `CAP_FSETID` clears (as the kernel does
/// for local filesystems): set-user-id always, set-group-id when group-executable (without
/// group execute it marks mandatory locking, which stays). `meta` is the file's, `backing` its
/// path, used only when there is something to clear. A `security.capability` attribute needs
/// nothing here: the backing filesystem drops it when the daemon writes the file.
fn drop_setid(meta: &fs::Metadata, backing: &BackingPath) -> Result<bool> {
    let mode = meta.mode() & 0o7777;
    let mut kept = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kept &= !libc::S_ISGID;
    }
    if kept == mode || !meta.file_type().is_file() {
        return Ok(false);
    }
    fs::set_permissions(backing, fs::Permissions::from_mode(kept))
        .map_err(|e| Error::io("chmod", e))?;
    Ok(true)
}
