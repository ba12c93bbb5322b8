//! export: decrypt a volume (or a subtree) straight from the backing store, without a mount,
//! into a plain directory or a tar stream.
//!
//! The walk is depth-first in name order (so a tar stream is reproducible). Files are
//! decrypted block by block as they are written out; directories, symlinks, fifos and device
//! nodes are recreated; modes, owners (when run as root) and times are kept, directories'
//! after their contents; a file with several names is written once and linked for the rest.
//! Files that fail authentication are listed and skipped in a directory export; in a tar
//! stream, where a half-written entry cannot be taken back, the first one ends the export.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

use super::file::EncryptedFile;
use super::volume::{is_reserved_name, Volume};

/// Where an export goes.
pub enum Destination {
    /// A directory that does not exist yet or is empty.
    Dir(PathBuf),
    /// A tar stream.
    Tar(Box<dyn Write>),
}

#[derive(Debug, Default)]
pub struct ExportSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub symlinks: u64,
    pub special: u64,
    pub bytes: u64,
    pub failures: Vec<(CanonicalPath, String)>,
}

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

/// The destination while exporting (one tar builder for the whole stream).
enum Sink {
    Dir(PathBuf),
    Tar(tar::Builder<Box<dyn Write>>),
}

struct Exporter<'a> {
    volume: &'a Volume,
    dest: Sink,
    root: CanonicalPath,
    /// First exported name of each multiply-linked backing inode.
    seen: HashMap<(u64, u64), PathBuf>,
    summary: ExportSummary,
    as_root: bool,
    progress: &'a dyn Fn(&ExportSummary),
}

/// Exports `subtree` of `volume` to `dest`, calling `progress` after each file.
pub fn export(
    volume: &Volume,
    subtree: &CanonicalPath,
    dest: Destination,
    progress: &dyn Fn(&ExportSummary),
) -> Result<ExportSummary> {
    if let Destination::Dir(dir) = &dest {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::Refused(format!(
                        "{} is not empty; export needs a new or empty directory",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(dir)
                    .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            }
            Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()), e)),
        }
    }
    let meta = volume
        .backing()
        .metadata(subtree)
        .map_err(|e| Error::io(format!("cannot stat {subtree}"), e))?;
    let mut ex = Exporter {
        volume,
        dest: match dest {
            Destination::Dir(d) => Sink::Dir(d),
            Destination::Tar(w) => Sink::Tar(tar::Builder::new(w)),
        },
        root: subtree.clone(),
        seen: HashMap::new(),
        summary: ExportSummary::default(),
        // SAFETY: geteuid has no preconditions.
        as_root: unsafe { libc::geteuid() } == 0,
        progress,
    };
    if meta.is_dir() {
        ex.dir(subtree, &meta)?;
    } else {
        ex.entry(subtree, &meta)?;
    }
    if let Sink::Tar(b) = ex.dest {
        // The end-of-archive blocks, then everything out.
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| Error::io("cannot write the tar stream", e))?;
    }
    Ok(ex.summary)
}

impl Exporter<'_> {
    /// The path of `p` inside the export (relative for tar, under the directory otherwise).
    fn rel(&self, p: &CanonicalPath) -> PathBuf {
        let root = self.root.to_relative_path();
        let rel = p.to_relative_path();
        let inside = rel.strip_prefix(&root).unwrap_or(&rel).to_path_buf();
        let base: PathBuf = if self.root.is_root() {
            PathBuf::new()
        } else {
            root.file_name().map(PathBuf::from).unwrap_or_default()
        };
        base.join(inside)
    }

    fn out(&self, p: &CanonicalPath) -> PathBuf {
        match &self.dest {
            Sink::Dir(d) => d.join(self.rel(p)),
            Sink::Tar(_) => self.rel(p),
        }
    }

    fn dir(&mut self, p: &CanonicalPath, meta: &fs::Metadata) -> Result<()> {
        let mut names: Vec<OsString> = self
            .volume
            .backing()
            .list_dir(p, crate::backing::Atime::Keep)
            .map_err(|e| Error::io(format!("cannot read {p}"), e))?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| !is_reserved_name(n.as_bytes(), p.is_root()))
            .collect();
        names.sort();
        let out = self.out(p);
        match &mut self.dest {
            Sink::Dir(_) => {
                if !out.as_os_str().is_empty() && !out.is_dir() {
                    fs::create_dir(&out)
                        .map_err(|e| Error::io(format!("cannot create {}", out.display()), e))?;
                }
            }
            Sink::Tar(w) => {
                if !out.as_os_str().is_empty() {
                    let mut h = header(meta, tar::EntryType::Directory);
                    w.append_data(&mut h, &out, std::io::empty())
                        .map_err(|e| Error::io("cannot write the tar stream", e))?;
                }
            }
        }
        for name in names {
            let child = p.join(name.as_bytes()).map_err(|e| Error::format(p, e))?;
            let m = self
                .volume
                .backing()
                .metadata(&child)
                .map_err(|e| Error::io(format!("cannot stat {child}"), e))?;
            if m.is_dir() {
                self.dir(&child, &m)?;
            } else {
                self.entry(&child, &m)?;
            }
        }
        self.summary.dirs += 1;
        if let Sink::Dir(_) = self.dest {
            self.finish(&out, meta)?;
        }
        Ok(())
    }

    /// Mode, owner and times of an exported directory entry (directory exports only).
    fn finish(&self, out: &Path, meta: &fs::Metadata) -> Result<()> {
        let c = std::ffi::CString::new(out.as_os_str().as_bytes())
            .map_err(|_| Error::Usage("path with NUL".into()))?;
        if self.as_root {
            // SAFETY: valid path.
            unsafe { libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) };
        }
        if !meta.file_type().is_symlink() {
            fs::set_permissions(out, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| Error::io(format!("cannot chmod {}", out.display()), e))?;
        }
        // Times are best effort, as before: an export is not refused over them.
        let _ = super::set_times_at(&c, &super::times_of(meta));
        Ok(())
    }

    fn entry(&mut self, p: &CanonicalPath, meta: &fs::Metadata) -> Result<()> {
        let out = self.out(p);
        let ft = meta.file_type();
        if ft.is_file() && meta.nlink() > 1 {
            if let Some(first) = self.seen.get(&(meta.dev(), meta.ino())).cloned() {
                match &mut self.dest {
                    Sink::Dir(_) => fs::hard_link(&first, &out)
                        .map_err(|e| Error::io(format!("cannot link {}", out.display()), e))?,
                    Sink::Tar(w) => {
                        let mut h = header(meta, tar::EntryType::Link);
                        h.set_size(0);
                        w.append_link(&mut h, &out, &first)
                            .map_err(|e| Error::io("cannot write the tar stream", e))?;
                    }
                }
                self.summary.links += 1;
                return Ok(());
            }
        }
        if ft.is_file() {
            let file = match EncryptedFile::open(self.volume, p, false) {
                Ok(f) => f,
                Err(e) => {
                    return self.failed(p, e);
                }
            };
            match &mut self.dest {
                Sink::Dir(_) => {
                    let copied = fs::File::create(&out)
                        .map_err(|e| Error::io(format!("cannot create {}", out.display()), e))
                        .and_then(|mut w| {
                            let mut r = PlainReader::new(&file);
                            std::io::copy(&mut r, &mut w).map_err(|e| r.failure(p, e))
                        });
                    if let Err(e) = copied {
                        let _ = fs::remove_file(&out);
                        return self.failed(p, e);
                    }
                    self.finish(&out, meta)?;
                }
                Sink::Tar(w) => {
                    let mut h = header(meta, tar::EntryType::Regular);
                    h.set_size(file.size());
                    let mut r = PlainReader::new(&file);
                    if let Err(e) = w.append_data(&mut h, &out, &mut r) {
                        let e = r.failure(p, e);
                        return Err(Error::Integrity(format!(
                            "{e}; the tar stream is incomplete"
                        )));
                    }
                }
            }
            self.summary.files += 1;
            self.summary.bytes += file.size();
            if ft.is_file() && meta.nlink() > 1 {
                self.seen.insert((meta.dev(), meta.ino()), out);
            }
            (self.progress)(&self.summary);
            return Ok(());
        }
        if ft.is_symlink() {
            let target = self
                .volume
                .backing()
                .read_link(p)
                .map(|t| PathBuf::from(std::ffi::OsStr::from_bytes(&t)))
                .map_err(|e| Error::io(format!("cannot read {p}"), e))?;
            match &mut self.dest {
                Sink::Dir(_) => {
                    std::os::unix::fs::symlink(&target, &out)
                        .map_err(|e| Error::io(format!("cannot create {}", out.display()), e))?;
                    self.finish(&out, meta)?;
                }
                Sink::Tar(w) => {
                    let mut h = header(meta, tar::EntryType::Symlink);
                    h.set_size(0);
                    w.append_link(&mut h, &out, &target)
                        .map_err(|e| Error::io("cannot write the tar stream", e))?;
                }
            }
            self.summary.symlinks += 1;
            return Ok(());
        }
        // Fifos and device nodes are recreated; sockets belong to a running program.
        if ft.is_socket() {
            return Ok(());
        }
        match &mut self.dest {
            Sink::Dir(_) => {
                let c = std::ffi::CString::new(out.as_os_str().as_bytes())
                    .map_err(|_| Error::Usage("path with NUL".into()))?;
                // SAFETY: valid path.
                if unsafe { libc::mknod(c.as_ptr(), meta.mode(), meta.rdev() as libc::dev_t) } != 0
                {
                    return self.failed(
                        p,
                        Error::io("cannot recreate", std::io::Error::last_os_error()),
                    );
                }
                self.finish(&out, meta)?;
            }
            Sink::Tar(w) => {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h = header(meta, kind);
                h.set_size(0);
                let rdev = meta.rdev();
                let _ = h.set_device_major(libc::major(rdev));
                let _ = h.set_device_minor(libc::minor(rdev));
                w.append_data(&mut h, &out, std::io::empty())
                    .map_err(|e| Error::io("cannot write the tar stream", e))?;
            }
        }
        self.summary.special += 1;
        Ok(())
    }

    /// Records a file that could not be exported; in a tar stream it ends the export.
    fn failed(&mut self, p: &CanonicalPath, e: Error) -> Result<()> {
        if let Sink::Tar(_) = self.dest {
            return Err(e);
        }
        self.summary.failures.push((p.clone(), e.to_string()));
        Ok(())
    }
}

/// A tar header with an entry's mode, owner and mtime.
fn header(meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    h.set_mtime(meta.mtime().max(0) as u64);
    h
}
