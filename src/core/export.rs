//! export: decrypt a volume (or a subtree) straight from the backing store, without a mount,
//! into a plain directory or a tar stream.
//!
//! The walk is depth-first in name order (so a tar stream is reproducible). Files are
//! decrypted block by block as they are written out; directories, symlinks and fifos are
//! recreated; modes (without the set-user-id and set-group-id bits) and times are kept,
//! directories' after their contents; a file with several names is written once and linked
//! for the rest. Files that fail authentication are listed and skipped in a directory export;
//! in a tar stream, where a half-written entry cannot be taken back, the first one ends the
//! export.
//!
//! Everything on the backing store but file contents is unauthenticated: an attacker who can
//! write to it chooses every name's type, mode, owner, device number and symlink target, and
//! can swap a directory for a symlink at any moment. Export is often run as root, so it must
//! not lend root's privileges to that attacker:
//!
//! - the store is read only through [`Backing`] (an `O_PATH` root, every path resolved beneath
//!   it with no symlink followed), so a symlink planted in a directory's place is exported as
//!   a symlink and never read through;
//! - the destination directory is written only through its own [`Backing`]: every entry is
//!   created relative to a directory descriptor resolved beneath `DEST` with no symlink
//!   followed, files with `O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing is written through a
//!   symlink, whether export created it or it was there before;
//! - set-user-id and set-group-id bits are never set (the sticky bit is kept: it only limits
//!   who may delete entries of a directory); device nodes are skipped unless
//!   [`ExportOptions::devices`]; owners are the exporter's unless
//!   [`ExportOptions::same_owner`] (in a tar stream too: its headers carry the exporting user's
//!   uid and gid and no user or group names);
//! - every name of a hard-linked file is authenticated at its own path before the output is
//!   linked, so a hard link planted on the store cannot give a file's plaintext another name;
//! - entries are created mode 0600 (directories 0700) and get their stored mode only once
//!   complete; a `DEST` export creates is itself mode 0700 and never takes the store's mode.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::backing::{Atime, Backing};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

use super::file::{dir_record, EncryptedFile};
use super::names::Listed;
use super::volume::Volume;
use crate::format::header::{Attrs, ObjectKind};

/// `e` with the stored paths it names put as the user knows them: each `(stored, plain)` of
/// `pairs` replaced (the longest first, so a directory's never replaces part of its child's),
/// and the paths a moved file is bound to decrypted where they do (else left as stored). The
/// kind of error, and so the exit code, stays. With plaintext names, `e` as it is. Export and
/// the commands that take a user's path (`cat`, `info`, `import`, `adopt`) report through it.
pub fn with_user_paths(volume: &Volume, e: Error, pairs: &[(String, String)]) -> Error {
    if !volume.encrypted_names() {
        return e;
    }
    let mut pairs: Vec<&(String, String)> = pairs.iter().filter(|(s, p)| s != p).collect();
    pairs.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    let fix = |s: String| {
        pairs
            .iter()
            .fold(s, |s, (stored, plain)| s.replace(stored.as_str(), plain))
    };
    match e {
        Error::Usage(s) => Error::Usage(fix(s)),
        Error::Refused(s) => Error::Refused(fix(s)),
        Error::Io { what, source } => {
            // The store's refusals name the path too (an OS error's text never does).
            let said = source.to_string();
            let shown = fix(said.clone());
            Error::Io {
                what: fix(what),
                source: match shown == said {
                    true => source,
                    false => std::io::Error::new(source.kind(), shown),
                },
            }
        }
        Error::Format { path, source } => Error::Format {
            path: fix(path),
            source,
        },
        Error::Key { path, source } => Error::Key {
            path: fix(path),
            source,
        },
        Error::Moved { path, bound } => Error::Moved {
            path: fix(path),
            bound: bound
                .split(", ")
                .map(|b| match CanonicalPath::from_encoded(b) {
                    Ok(b) => volume.shown_path(&b),
                    Err(_) => b.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", "),
        },
        Error::Integrity(s) => Error::Integrity(fix(s)),
        e => e,
    }
}

/// Where an export goes.
pub enum Destination {
    /// A directory that does not exist yet or is empty.
    Dir(PathBuf),
    /// A tar stream.
    Tar(Box<dyn Write>),
}

/// What export may take from the store's (unauthenticated) metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Give entries the owners recorded on the store (directory export), or write those in the
    /// tar headers; otherwise entries belong to the user running export.
    pub same_owner: bool,
    /// Recreate character and block device nodes; otherwise each is skipped and reported.
    pub devices: bool,
}

#[derive(Debug, Default)]
pub struct ExportSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub symlinks: u64,
    pub special: u64,
    pub bytes: u64,
    /// Entries not exported (by the user's path), each with why.
    pub failures: Vec<(CanonicalPath, String)>,
    /// Device nodes not recreated (no `--devices`, by the user's path), each with what it is.
    pub skipped: Vec<(CanonicalPath, String)>,
}

/// The permission bits export ever sets: no set-user-id, no set-group-id.
pub const MODE_MASK: u32 = 0o1777;

/// Plaintext of an encrypted file as a `Read`, for copying out.
struct PlainReader<'a> {
    file: &'a EncryptedFile,
    offset: u64,
    /// The error behind a failed read, kept whole for the report.
    error: Option<Error>,
}

impl<'a> PlainReader<'a> {
    fn new(file: &'a EncryptedFile) -> Self {
        PlainReader {
            file,
            offset: 0,
            error: None,
        }
    }

    /// The error to report for a failed copy: the read's own, else the write's.
    fn failure(&mut self, p: &CanonicalPath, e: std::io::Error) -> Error {
        self.error
            .take()
            .unwrap_or_else(|| Error::io(format!("cannot export {p}"), e))
    }
}

impl Read for PlainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.file.read_at(self.offset, buf) {
            Ok(n) => {
                self.offset += n as u64;
                Ok(n)
            }
            Err(e) => {
                let io = std::io::Error::other(e.to_string());
                self.error = Some(e);
                Err(io)
            }
        }
    }
}

/// The destination while exporting: the output directory (every change beneath it made
/// relative to its descriptor, never through a symlink), or one tar builder for the stream.
enum Sink {
    Dir(Backing),
    Tar(tar::Builder<Box<dyn Write>>),
}

struct Exporter<'a> {
    volume: &'a Volume,
    /// The backing store, read without following any symlink beneath its root.
    store: &'a Backing,
    dest: Sink,
    /// Where `DEST` is, for messages.
    shown: PathBuf,
    /// The user's path of the directory holding the subtree exported (the root for a whole
    /// volume): what an output path is beneath, in messages.
    base: CanonicalPath,
    /// First exported name (in the output) of each multiply-linked backing inode.
    seen: HashMap<(u64, u64), CanonicalPath>,
    summary: ExportSummary,
    options: ExportOptions,
    /// The exporting user's uid and gid, for tar headers without `same_owner`.
    me: (u32, u32),
    progress: &'a dyn Fn(&ExportSummary),
}

/// Exports `subtree` of `volume` to `dest`, calling `progress` after each file.
pub fn export(
    volume: &Volume,
    subtree: &CanonicalPath,
    dest: Destination,
    options: ExportOptions,
    progress: &dyn Fn(&ExportSummary),
) -> Result<ExportSummary> {
    let store = volume.backing();
    let meta = store_metadata(store, subtree)?;
    let (sink, shown) = match dest {
        Destination::Dir(dir) => (Sink::Dir(open_dest(&dir, store)?), dir),
        Destination::Tar(w) => (Sink::Tar(tar::Builder::new(w)), PathBuf::from("-")),
    };
    let (out, base) = if subtree.is_root() {
        (CanonicalPath::root(), CanonicalPath::root())
    } else {
        let plain = volume.plain_path(subtree)?;
        let rel = plain.to_relative_path();
        let name = rel
            .file_name()
            .expect("a path other than the root has a name");
        let out = CanonicalPath::root()
            .join(name.as_bytes())
            .map_err(|e| Error::format(subtree, e))?;
        (out, plain.parent().unwrap_or_else(CanonicalPath::root))
    };
    let mut ex = Exporter {
        volume,
        store,
        dest: sink,
        shown,
        base,
        seen: HashMap::new(),
        summary: ExportSummary::default(),
        options,
        me: (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
        progress,
    };
    ex.walk(subtree, &out, &meta)?;
    if let Sink::Tar(b) = ex.dest {
        // The end-of-archive blocks, then everything out.
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| Error::io("cannot write the tar stream", e))?;
    }
    Ok(ex.summary)
}

/// `lstat` of `p` on the store, resolved beneath its root with no symlink followed.
fn store_metadata(store: &Backing, p: &CanonicalPath) -> Result<fs::Metadata> {
    if p.is_root() {
        store.root_metadata()
    } else {
        store.metadata(p)
    }
    .map_err(|e| Error::io(format!("cannot stat {p}"), e))
}

fn stat_fd(fd: &impl rustix::fd::AsFd) -> std::io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether the directory `fd` holds is `target` or lies beneath it.
#[allow(clippy::disallowed_methods)] // the destination's ancestors: the operator's paths
fn is_within(fd: rustix::fd::OwnedFd, target: (u64, u64)) -> std::io::Result<bool> {
    let mut cur = fd;
    let mut id = stat_fd(&cur)?;
    loop {
        if id == target {
            return Ok(true);
        }
        let up = rustix::fs::openat(
            &cur,
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let up_id = stat_fd(&up)?;
        if up_id == id {
            return Ok(false);
        }
        (cur, id) = (up, up_id);
    }
}

/// Opens (creating it, mode 0700, if missing) the directory `dir` to export into, refusing one
/// that is not empty or lies inside the backing store. `dir` is the operator's: symlinks in it
/// are followed; nothing beneath it ever is.
#[allow(clippy::disallowed_methods)] // the destination itself: the operator's path
fn open_dest(dir: &Path, store: &Backing) -> Result<Backing> {
    let shown = dir.display();
    let store_id = store
        .root_metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| Error::io("cannot stat the backing store", e))?;
    let inside = |fd| {
        is_within(fd, store_id)
            .map_err(|e| Error::io(format!("cannot check where {shown} is"), e))
            .and_then(|inside| match inside {
                true => Err(Error::Refused(format!(
                    "{shown} is inside the backing store; export to a directory outside it"
                ))),
                false => Ok(()),
            })
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::open(dir, flags, Mode::empty()) {
        Ok(fd) => inside(fd)?,
        Err(rustix::io::Errno::NOENT) => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let pfd = rustix::fs::open(parent, flags, Mode::empty()).map_err(|e| {
                Error::io(format!("cannot create {shown}"), std::io::Error::from(e))
            })?;
            inside(pfd)?;
            match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(Error::io(format!("cannot create {shown}"), e.into())),
            }
        }
        Err(rustix::io::Errno::NOTDIR) => {
            return Err(Error::Refused(format!(
                "{shown} is not a directory; export needs a new or empty directory"
            )))
        }
        Err(e) => return Err(Error::io(format!("cannot open {shown}"), e.into())),
    }
    let dest = Backing::open(dir).map_err(|e| Error::io(format!("cannot open {shown}"), e))?;
    // Checked through the descriptor every entry will be created under.
    let root = CanonicalPath::root();
    let entries = dest
        .list_dir(&root, Atime::Update)
        .map_err(|e| Error::io(format!("cannot read {shown}"), e))?;
    if !entries.is_empty() {
        return Err(Error::Refused(format!(
            "{shown} is not empty; export needs a new or empty directory"
        )));
    }
    // And checked again on the directory itself, now that it is open.
    inside(
        dest.open_dir(&root, Atime::Update)
            .map_err(|e| Error::io(format!("cannot open {shown}"), e))?
            .into(),
    )?;
    Ok(dest)
}

impl Exporter<'_> {
    /// The user's path of the entry exported as `out`.
    fn plain(&self, out: &CanonicalPath) -> CanonicalPath {
        match (self.base.is_root(), out.is_root()) {
            (true, _) => out.clone(),
            (false, true) => self.base.clone(),
            (false, false) => CanonicalPath::from_encoded(&format!("{}{out}", self.base))
                .unwrap_or_else(|_| out.clone()),
        }
    }

    /// `e`, about the store's `p` (exported as `out`), naming `p` as the user knows it.
    fn user_error(&self, p: &CanonicalPath, out: &CanonicalPath, e: Error) -> Error {
        let pairs = [(p.to_string(), self.plain(out).to_string())];
        with_user_paths(self.volume, e, &pairs)
    }

    /// How `out` is named in messages: under `DEST`, or as the tar member.
    fn shown(&self, out: &CanonicalPath) -> String {
        match self.dest {
            Sink::Dir(_) => self
                .shown
                .join(out.to_relative_path())
                .display()
                .to_string(),
            Sink::Tar(_) => out.to_relative_path().display().to_string(),
        }
    }

    /// The error for a change to `out` in `DEST`. [`Backing`] words what it refuses (a
    /// symlink, or an entry of another type, on the way) for the backing store; here it is
    /// the destination.
    fn dest_err(&self, what: &str, out: &CanonicalPath, e: std::io::Error) -> Error {
        let shown = self.shown(out);
        if e.raw_os_error().is_none() {
            return Error::Refused(format!(
                "cannot {what} {shown}: a symlink (or an entry export did not create) stands in \
                 the way in the destination; export never writes through one"
            ));
        }
        Error::io(format!("cannot {what} {shown}"), e)
    }

    /// Exports the store's `p` (whose metadata is `meta`) as `out`: a directory with the
    /// attributes its record gives, an object as its header says, anything else (a symlink,
    /// fifo or device node kmsfs did not make) not at all.
    fn walk(&mut self, p: &CanonicalPath, out: &CanonicalPath, meta: &fs::Metadata) -> Result<()> {
        self.walk_at(p, out, meta)
            .map_err(|e| self.user_error(p, out, e))
    }

    fn walk_at(
        &mut self,
        p: &CanonicalPath,
        out: &CanonicalPath,
        meta: &fs::Metadata,
    ) -> Result<()> {
        if meta.is_dir() {
            let record = dir_record(p);
            let attrs =
                EncryptedFile::open(self.volume, &record, false).and_then(|r| match r.attrs() {
                    a if a.kind == ObjectKind::Dir => Ok(a),
                    _ => Err(Error::Integrity(format!(
                        "{record}: not a directory record"
                    ))),
                });
            match attrs {
                Ok(attrs) => self.dir(p, out, meta, &attrs),
                Err(e) if p.is_root() || out.is_root() => Err(e),
                Err(e) => self.failed(p, out, e),
            }
        } else if meta.is_file() {
            self.entry(p, out)
        } else {
            let e = Error::Integrity(format!(
                "{p}: an entry on the backing store that kmsfs did not make; not exported"
            ));
            self.failed(p, out, e)
        }
    }

    fn dir(
        &mut self,
        p: &CanonicalPath,
        out: &CanonicalPath,
        meta: &fs::Metadata,
        attrs: &Attrs,
    ) -> Result<()> {
        let listed = self
            .store
            .list_dir(p, Atime::Keep)
            .map_err(|e| Error::io(format!("cannot read {p}"), e))?;
        let dir_id = match self.volume.encrypted_names() {
            true => Some(self.volume.dir_id(p)?),
            false => None,
        };
        // (stored name, plaintext name), in plaintext order.
        let mut names: Vec<(OsString, Vec<u8>)> = Vec::new();
        for e in listed {
            match self
                .volume
                .listed_name(p, dir_id.as_ref(), e.name.as_bytes())?
            {
                Listed::Name(n) => names.push((e.name, n)),
                Listed::Own => {}
                Listed::Foreign(why) => {
                    let child = p.join(e.name.as_bytes()).map_err(|e| Error::format(p, e))?;
                    // Named as it is stored, in the directory as the user knows it.
                    let child_out = out
                        .join(e.name.as_bytes())
                        .map_err(|e| Error::format(p, e))?;
                    let e = Error::Integrity(format!(
                        "{child}: an entry on the backing store whose name kmsfs did not write \
                         there ({why}); not exported"
                    ));
                    self.failed(&child, &child_out, e)?;
                }
            }
        }
        names.sort_by(|a, b| a.1.cmp(&b.1));
        if !out.is_root() {
            if let Sink::Dir(d) = &self.dest {
                // Only the exporter can enter it until it is complete.
                d.mkdir(out, 0o700)
                    .map_err(|e| self.dest_err("create", out, e))?;
            } else {
                let mut h = self.header(meta, attrs, tar::EntryType::Directory);
                self.append(&mut h, out, std::io::empty())?;
            }
        }
        for (name, plain) in names {
            let child = p.join(name.as_bytes()).map_err(|e| Error::format(p, e))?;
            let child_out = out.join(&plain).map_err(|e| Error::format(&child, e))?;
            let m = store_metadata(self.store, &child)?;
            self.walk(&child, &child_out, &m)?;
        }
        self.summary.dirs += 1;
        // DEST itself is the operator's: it keeps its own mode and owner.
        if !out.is_root() {
            if let Sink::Dir(_) = self.dest {
                self.finish(out, meta, attrs)?;
            }
        }
        Ok(())
    }

    /// Appends one tar member (never for a directory export).
    fn append(&mut self, h: &mut tar::Header, out: &CanonicalPath, data: impl Read) -> Result<()> {
        if let Sink::Tar(w) = &mut self.dest {
            w.append_data(h, out.to_relative_path(), data)
                .map_err(|e| Error::io("cannot write the tar stream", e))?;
        }
        Ok(())
    }

    /// Appends a tar member that names another: a symlink or a hard link.
    fn append_link(
        &mut self,
        h: &mut tar::Header,
        out: &CanonicalPath,
        target: &Path,
    ) -> Result<()> {
        if let Sink::Tar(w) = &mut self.dest {
            h.set_size(0);
            w.append_link(h, out.to_relative_path(), target)
                .map_err(|e| Error::io("cannot write the tar stream", e))?;
        }
        Ok(())
    }

    /// Owner (with `same_owner`), mode (masked) and times of a finished entry of a directory
    /// export, set on the entry itself, resolved beneath `DEST` with no symlink followed.
    fn finish(&self, out: &CanonicalPath, meta: &fs::Metadata, attrs: &Attrs) -> Result<()> {
        let Sink::Dir(d) = &self.dest else {
            return Ok(());
        };
        if self.options.same_owner {
            d.chown(out, Some(attrs.uid), Some(attrs.gid), None)
                .map_err(|e| {
                    let what = format!("chown to {}:{}", attrs.uid, attrs.gid);
                    self.dest_err(&what, out, e)
                })?;
        }
        if attrs.kind == ObjectKind::Symlink {
            // A symlink has no mode of its own; its times are set on the link itself.
            let _ = d.set_link_times(out, &super::times_of(meta));
            return Ok(());
        }
        d.chmod(out, attrs.mode & MODE_MASK, None)
            .map_err(|e| self.dest_err("chmod", out, e))?;
        // Times are best effort, as before: an export is not refused over them.
        let _ = d.set_times(out, &super::times_of(meta), None);
        Ok(())
    }

    /// As [`Exporter::finish`], on a file export just wrote (through its descriptor).
    fn finish_file(
        &self,
        file: &fs::File,
        out: &CanonicalPath,
        meta: &fs::Metadata,
        attrs: &Attrs,
    ) -> Result<()> {
        let shown = self.shown(out);
        if self.options.same_owner {
            let id = |v: u32| (v != u32::MAX).then_some(v);
            rustix::fs::fchown(
                file,
                id(attrs.uid).map(rustix::fs::Uid::from_raw),
                id(attrs.gid).map(rustix::fs::Gid::from_raw),
            )
            .map_err(|e| {
                Error::io(
                    format!("cannot chown {shown} to {}:{}", attrs.uid, attrs.gid),
                    e.into(),
                )
            })?;
        }
        crate::backing::open::chmod(file, attrs.mode & MODE_MASK)
            .map_err(|e| Error::io(format!("cannot chmod {shown}"), e))?;
        let _ = crate::backing::open::set_times(file, &super::times_of(meta));
        Ok(())
    }

    /// An object: opened beneath the store root with no symlink followed, and only if it is
    /// a regular backing file; authenticated at its own path (every name of a hard-linked one
    /// too: one planted on the store has no envelope for its path and is refused like a moved
    /// file); then exported as what its header says it is.
    fn entry(&mut self, p: &CanonicalPath, out: &CanonicalPath) -> Result<()> {
        let opened = self
            .store
            .open_file(p, false, Atime::Keep)
            .map_err(|e| Error::io(format!("cannot open {p}"), e))
            .and_then(|f| {
                let m = f
                    .metadata()
                    .map_err(|e| Error::io(format!("cannot stat {p}"), e))?;
                Ok((f, m))
            })
            .and_then(|(f, m)| Ok((EncryptedFile::from_file(self.volume, p, f)?, m)));
        let (object, meta) = match opened {
            Ok(x) => x,
            Err(e) => return self.failed(p, out, e),
        };
        let attrs = object.attrs();
        match attrs.kind {
            ObjectKind::File => return self.file(p, out, object, &meta),
            ObjectKind::Dir => {
                let e = Error::Integrity(format!("{p}: a directory record where a name is"));
                return self.failed(p, out, e);
            }
            ObjectKind::Symlink => {
                // The authenticated target, created as a symlink, never followed.
                let target = match object.read_all() {
                    Ok(t) => PathBuf::from(OsString::from_vec(t)),
                    Err(e) => return self.failed(p, out, e),
                };
                if let Sink::Dir(d) = &self.dest {
                    d.symlink(target.as_os_str().as_bytes(), out)
                        .map_err(|e| self.dest_err("create", out, e))?;
                    self.finish(out, &meta, &attrs)?;
                } else {
                    let mut h = self.header(&meta, &attrs, tar::EntryType::Symlink);
                    self.append_link(&mut h, out, &target)?;
                }
                self.summary.symlinks += 1;
                return Ok(());
            }
            // Sockets belong to a running program.
            ObjectKind::Socket => return Ok(()),
            ObjectKind::Fifo | ObjectKind::CharDevice | ObjectKind::BlockDevice => {}
        }
        let (kind, ifmt) = match attrs.kind {
            ObjectKind::Fifo => (tar::EntryType::Fifo, libc::S_IFIFO),
            ObjectKind::CharDevice => (tar::EntryType::Char, libc::S_IFCHR),
            _ => (tar::EntryType::Block, libc::S_IFBLK),
        };
        let rdev = attrs.rdev;
        if kind != tar::EntryType::Fifo && !self.options.devices {
            let what = format!(
                "{} device {}:{}",
                if attrs.kind == ObjectKind::CharDevice {
                    "character"
                } else {
                    "block"
                },
                libc::major(rdev),
                libc::minor(rdev)
            );
            self.summary.skipped.push((self.plain(out), what));
            return Ok(());
        }
        if let Sink::Dir(d) = &self.dest {
            if let Err(e) = d.mknod(out, ifmt | 0o600, rdev) {
                let e = self.dest_err("create", out, e);
                return self.failed(p, out, e);
            }
            self.finish(out, &meta, &attrs)?;
        } else {
            let mut h = self.header(&meta, &attrs, kind);
            h.set_size(0);
            if kind != tar::EntryType::Fifo {
                let _ = h.set_device_major(libc::major(rdev));
                let _ = h.set_device_minor(libc::minor(rdev));
            }
            self.append(&mut h, out, std::io::empty())?;
        }
        self.summary.special += 1;
        Ok(())
    }

    /// A regular file: decrypted at its own path, or, for a further name of a multiply-linked
    /// file already exported, authenticated at its own path and linked to the first.
    fn file(
        &mut self,
        p: &CanonicalPath,
        out: &CanonicalPath,
        file: EncryptedFile,
        meta: &fs::Metadata,
    ) -> Result<()> {
        let inode = (meta.dev(), meta.ino());
        let attrs = file.attrs();
        if meta.nlink() > 1 {
            if let Some(first) = self.seen.get(&inode).cloned() {
                if let Sink::Dir(d) = &self.dest {
                    // Both names resolved beneath DEST, neither followed if a symlink.
                    d.link(&first, out)
                        .map_err(|e| self.dest_err("link", out, e))?;
                } else {
                    let mut h = self.header(meta, &attrs, tar::EntryType::Link);
                    self.append_link(&mut h, out, &first.to_relative_path())?;
                }
                self.summary.links += 1;
                return Ok(());
            }
        }
        if let Sink::Dir(d) = &self.dest {
            // New (O_EXCL), never through a symlink (O_NOFOLLOW, parents resolved beneath
            // DEST), readable by the exporter alone until complete.
            let created = d
                .create_file(out, 0o600)
                .map_err(|e| self.dest_err("create", out, e))?;
            let copied = {
                let mut w = &created;
                let mut r = PlainReader::new(&file);
                std::io::copy(&mut r, &mut w).map_err(|e| r.failure(p, e))
            };
            if let Err(e) = copied {
                drop(created);
                let _ = d.unlink(out, None);
                return self.failed(p, out, e);
            }
            self.finish_file(&created, out, meta, &attrs)?;
        } else {
            let mut h = self.header(meta, &attrs, tar::EntryType::Regular);
            h.set_size(file.size());
            let mut r = PlainReader::new(&file);
            if let Err(e) = self.append(&mut h, out, &mut r) {
                let e = r.error.take().unwrap_or(e);
                return Err(Error::Integrity(format!(
                    "{e}; the tar stream is incomplete"
                )));
            }
        }
        self.summary.files += 1;
        self.summary.bytes += file.size();
        if meta.nlink() > 1 {
            self.seen.insert(inode, out.clone());
        }
        (self.progress)(&self.summary);
        Ok(())
    }

    /// Records a file that could not be exported; in a tar stream it ends the export.
    /// Both name the user's path of `p` (exported as `out`), not its stored one.
    fn failed(&mut self, p: &CanonicalPath, out: &CanonicalPath, e: Error) -> Result<()> {
        let e = self.user_error(p, out, e);
        if let Sink::Tar(_) = self.dest {
            return Err(e);
        }
        self.summary.failures.push((self.plain(out), e.to_string()));
        Ok(())
    }

    /// A tar header with an entry's mode (no set-id bits), owner and mtime. The owner is the
    /// stored one only with `same_owner`, else the exporting user's; user and group names are
    /// left empty, so an extracting tar goes by these numbers and no name it would look up.
    fn header(&self, meta: &fs::Metadata, attrs: &Attrs, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        // Set for every member: the field is octal digits, not empty, for strict readers.
        h.set_size(0);
        h.set_mode(attrs.mode & MODE_MASK);
        let (uid, gid) = if self.options.same_owner {
            (attrs.uid, attrs.gid)
        } else {
            self.me
        };
        h.set_uid(uid as u64);
        h.set_gid(gid as u64);
        h.set_mtime(meta.mtime().max(0) as u64);
        h
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests play the attacker on the store, by path
mod tests {
    use super::*;
    use crate::core::volume::InitOptions;
    use crate::keys::spec::KeySpec;

    fn path(p: &str) -> CanonicalPath {
        CanonicalPath::from_user(Path::new(p)).unwrap()
    }

    /// A volume with `/docs/a.txt` and `/top.txt`, in a fresh temporary directory.
    fn volume() -> (tempfile::TempDir, Volume) {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let report = Volume::init(
            &backing,
            InitOptions {
                keys: vec![KeySpec::Local(dir.path().join("keys/master.key"))],
                block_size: 4096,
                // These play the attacker on the store by name.
                plaintext_names: true,
                ..Default::default()
            },
        )
        .unwrap();
        let v = report.volume;
        let mut attrs = crate::core::file::own_file_attrs(0o755);
        attrs.kind = ObjectKind::Dir;
        crate::core::file::make_dir(&v, &path("docs"), attrs).unwrap();
        crate::core::file::write_new_file(&v, &path("docs/a.txt"), &mut &b"alpha"[..]).unwrap();
        crate::core::file::write_new_file(&v, &path("top.txt"), &mut &b"top"[..]).unwrap();
        (dir, v)
    }

    /// Exports into `dest` as it stands, past the check that it is empty (as if someone else
    /// planted entries in it after that check).
    fn export_into(v: &Volume, dest: &Path) -> Result<ExportSummary> {
        export_watching(v, dest, &|_| {})
    }

    /// As [`export_into`], calling `progress` after each file.
    fn export_watching(
        v: &Volume,
        dest: &Path,
        progress: &dyn Fn(&ExportSummary),
    ) -> Result<ExportSummary> {
        let store = v.backing();
        let meta = store.root_metadata().unwrap();
        let mut ex = Exporter {
            volume: v,
            store,
            dest: Sink::Dir(Backing::open(dest).unwrap()),
            shown: dest.to_path_buf(),
            base: CanonicalPath::root(),
            seen: HashMap::new(),
            summary: ExportSummary::default(),
            options: ExportOptions::default(),
            me: (0, 0),
            progress,
        };
        ex.walk(&CanonicalPath::root(), &CanonicalPath::root(), &meta)?;
        Ok(ex.summary)
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = fs::read(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn export_never_writes_through_a_symlink_planted_in_dest() {
        let (dir, v) = volume();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("top.txt"), b"precious").unwrap();

        // Positive control: into an empty directory, both files arrive.
        let clean = dir.path().join("clean");
        fs::create_dir(&clean).unwrap();
        let s = export_into(&v, &clean).unwrap();
        assert_eq!((s.files, s.failures.len()), (2, 0));
        assert_eq!(fs::read(clean.join("docs/a.txt")).unwrap(), b"alpha");
        assert_eq!(fs::read(clean.join("top.txt")).unwrap(), b"top");

        // DEST holds `docs -> outside` (a directory's name) and `top.txt -> outside/top.txt`
        // (a file's): neither is written through, and nothing outside changes.
        let before = listing(&outside);
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("docs")).unwrap();
        let e = export_into(&v, &dest).map(|s| s.files).unwrap_err();
        assert!(e.to_string().contains("dest/docs: File exists"), "{e}");
        assert_eq!(listing(&outside), before);
        let dest2 = dir.path().join("dest2");
        fs::create_dir(&dest2).unwrap();
        std::os::unix::fs::symlink(outside.join("top.txt"), dest2.join("top.txt")).unwrap();
        let e = export_into(&v, &dest2).map(|s| s.files).unwrap_err();
        assert!(e.to_string().contains("dest2/top.txt: File exists"), "{e}");
        assert_eq!(listing(&outside), before);
        assert_eq!(fs::read(outside.join("top.txt")).unwrap(), b"precious");
    }

    #[test]
    fn export_never_writes_through_a_directory_swapped_for_a_symlink_while_it_runs() {
        let (dir, v) = volume();
        crate::core::file::write_new_file(&v, &path("docs/0first"), &mut &b"first"[..]).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).unwrap();
        // After the first file (docs/0first), DEST/docs becomes a symlink to `outside`, as if
        // someone who can write to DEST swapped it: docs/a.txt must not land in `outside`.
        let swapped = std::cell::Cell::new(false);
        let swap = |_: &ExportSummary| {
            if !swapped.replace(true) {
                fs::rename(dest.join("docs"), dir.path().join("docs-was")).unwrap();
                std::os::unix::fs::symlink(&outside, dest.join("docs")).unwrap();
            }
        };
        let e = export_watching(&v, &dest, &swap)
            .map(|s| s.files)
            .unwrap_err();
        assert!(swapped.get());
        assert!(
            e.to_string().contains(
                "dest/docs/a.txt: a symlink (or an entry export did not create) stands in the way"
            ),
            "{e}"
        );
        assert!(listing(&outside).is_empty());
        // Positive control: what was written before the swap is where it should be.
        assert_eq!(
            fs::read(dir.path().join("docs-was/0first")).unwrap(),
            b"first"
        );
    }
}
