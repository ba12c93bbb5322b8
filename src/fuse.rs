//! The FUSE adapter: translates fuser's calls into [`KmsFs`] calls and their results into
//! replies. It makes no decisions and holds no state but the session's notifier (to tell the
//! kernel of attributes that changed behind a reply that carries none); every errno comes
//! from [`crate::error::Error::errno`].

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::core::fs::{Attr, Caller, Kind, KmsFs};
use crate::error::Error;

/// How long the kernel may cache attributes and names, unless the mount says otherwise
/// (`--cache-timeout`). Short: the backing store can change behind the mount (another mount,
/// a restore), and sizes come from the backing files.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);

pub struct FuseFs {
    core: Arc<KmsFs>,
    /// How long the kernel may cache what a reply says (attributes, names).
    ttl: Duration,
    /// Set once the session exists: tells the kernel when attributes it caches changed
    /// behind a request that does not return them.
    notifier: Arc<OnceLock<Notifier>>,
}

impl FuseFs {
    /// The adapter, and the slot its session's notifier goes in.
    pub fn new(core: Arc<KmsFs>, ttl: Duration) -> (Self, Arc<OnceLock<Notifier>>) {
        let notifier = Arc::new(OnceLock::new());
        (
            FuseFs {
                core,
                ttl,
                notifier: notifier.clone(),
            },
            notifier,
        )
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// How the kernel is to treat a new handle. An `O_APPEND` one bypasses the page cache: the
/// end of file it appends at is the one on the store when the write runs (another mount may
/// have moved it), not the kernel's, so pages the kernel filled at its own idea of the end
/// would be wrong.
fn open_flags(flags: i32) -> FopenFlags {
    if flags & libc::O_APPEND != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn caller(req: &Request, umask: u32) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        umask,
    }
}

fn time(t: Option<TimeOrNow>) -> (Option<SystemTime>, bool) {
    match t {
        Some(TimeOrNow::SpecificTime(t)) => (Some(t), false),
        Some(TimeOrNow::Now) => (None, true),
        None => (None, false),
    }
}

/// Logs a failure to show an entry that is about what the store holds (not authentic where it
/// is, or not made by kmsfs), once per failed request; the others (ENOENT, ...) are routine.
/// Opens, reads and writes log their own failures.
fn noted(e: Error) -> Error {
    if e.is_integrity() {
        tracing::error!("{e}");
    }
    e
}

fn entry(reply: ReplyEntry, ttl: &Duration, result: Result<Attr, Error>) {
    match result.map_err(noted) {
        Ok(a) => reply.entry(ttl, &attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn attributes(reply: ReplyAttr, ttl: &Duration, result: Result<Attr, Error>) {
    match result.map_err(noted) {
        Ok(a) => reply.attr(ttl, &attr(&a)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn data(reply: ReplyData, result: Result<Vec<u8>, Error>) {
    match result {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Error>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn xattr(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, Error>) {
    match result {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes: fewer round trips and whole blocks per request.
        let _ = config.set_max_write(1 << 20);
        // Listings carry attributes: a walk needs no LOOKUP per entry.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // Set-id bits are ours to clear on write and truncate (`KmsFs::drop_setid`): without this
        // the kernel asks for `security.capability` before every write(2), a second round
        // trip per write. It also lets the kernel mark inodes it has checked (S_NOSEC).
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, &self.ttl, self.core.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        attributes(reply, &self.ttl, self.core.getattr(ino.0));
    }

    // Asked only where the mount has no `default_permissions` (see the mount command).
    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        empty(
            reply,
            self.core
                .access(req.uid(), ino.0, mask.bits())
                .map_err(noted),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ((at, at_now), (mt, mt_now)) = (time(atime), time(mtime));
        let result = self.core.setattr(
            ino.0,
            mode,
            uid,
            gid,
            size,
            at,
            mt,
            at_now,
            mt_now,
            fh.map(|f| f.0),
            // The kernel marks a truncate by a caller without CAP_FSETID (FATTR_KILL_SUIDGID),
            // but fuser 0.18 does not pass that flag on; a caller other than root stands in.
            size.is_some() && req.uid() != 0,
        );
        attributes(reply, &self.ttl, result);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        data(reply, self.core.readlink(ino.0).map_err(noted));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            &self.ttl,
            self.core
                .mknod(parent.0, name, mode, rdev, caller(req, umask)),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            &self.ttl,
            self.core.mkdir(parent.0, name, mode, caller(req, umask)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            &self.ttl,
            self.core
                .symlink(parent.0, link_name, target, caller(req, 0)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        empty(
            reply,
            self.core
                .rename(parent.0, name, newparent.0, newname, noreplace),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            &self.ttl,
            self.core.link(ino.0, newparent.0, newname),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.core.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), open_flags(flags.0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        data(reply, self.core.read(fh.0, offset, size));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // A writer without CAP_FSETID: its set-id bits go first, and since a write's reply
        // carries no attributes, the kernel is told its cached mode is stale (attributes
        // only: a negative offset leaves the page cache, whose pages this write may hold).
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            match self.core.drop_setid(fh.0) {
                Ok(true) => {
                    if let Some(n) = self.notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                }
                Ok(false) => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fsync(fh.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.core.readdir_from(ino.0, offset as usize, |e, next| {
            reply.add(INodeNo(e.ino), next, kind(e.kind), &e.name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let result = self
            .core
            .readdirplus(ino.0, offset as usize, |e, a, real, next| {
                let ttl = if real { self.ttl } else { Duration::ZERO };
                reply.add(INodeNo(e.ino), next, &e.name, &ttl, &attr(a), Generation(0))
            });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.core.getxattr(ino.0, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.core.listxattr(ino.0, size));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.removexattr(ino.0, name));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .core
            .create(parent.0, name, mode, flags, caller(req, umask))
        {
            Ok((a, fh)) => reply.created(
                &self.ttl,
                &attr(&a),
                Generation(0),
                FileHandle(fh),
                open_flags(flags),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fallocate(fh.0, offset, length, mode));
    }
}
