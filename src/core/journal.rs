//! The rebind journal: which names to tidy if a rename, link or unlink is cut short.
//!
//! Rebinding a file to a new name takes three steps (add an envelope for the new path, change
//! the name, drop the old envelope), and a crash between them leaves a file with an envelope
//! for a name it does not have. That envelope is harmless (the key service would refuse it for
//! any other file, and the path is no secret the header did not already hold) but it takes
//! header room, which caps the names a file can gain. So before the first step the core writes
//! the paths involved to `.kmsfs/pending/<n>`, durably, and removes the record after the last.
//! The next writable mount tidies every file at or beneath a recorded path (see
//! `KmsFs::finish_interrupted_rebinds`), so a crash costs one scan of those paths, never a scan
//! of the volume.
//!
//! A record says only where to look. Tidying decides what is stale from the backing store
//! itself (an envelope whose path does not name the same inode), so a lost, repeated or forged
//! record can leave a stale envelope for later but cannot drop a live one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

use super::volume::META_DIR;

const DIR_NAME: &str = "pending";
const MAGIC: &[u8] = b"kmsfs-rebind-1\0";

/// Where a volume keeps its pending records.
pub struct Journal {
    dir: PathBuf,
    next: AtomicU64,
}

/// A written record; removing it marks the rebind finished.
pub struct Pending<'a> {
    journal: &'a Journal,
    file: PathBuf,
}

impl Journal {
    pub fn new(root: &Path) -> Self {
        Journal {
            dir: root.join(META_DIR).join(DIR_NAME),
            next: AtomicU64::new(0),
        }
    }

    /// Records `paths` durably (file and directory fsynced) before a rebind starts.
    pub fn begin(&self, paths: &[CanonicalPath]) -> Result<Pending<'_>> {
        let io = |e| {
            Error::io(
                format!("cannot write the rebind journal in {}", self.dir.display()),
                e,
            )
        };
        match fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let mut bytes = MAGIC.to_vec();
        for p in paths {
            bytes.extend_from_slice(p.as_str().as_bytes());
            bytes.push(0);
        }
        // Unique across restarts too: a record left by a crash is never overwritten.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let file = self
            .dir
            .join(format!("{stamp:032x}-{}-{n}", std::process::id()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(io)?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_data())
            .map_err(io)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(Pending {
            journal: self,
            file,
        })
    }

    /// Records left by rebinds that did not finish, oldest first, with the paths they name.
    /// A record that cannot be read is reported as an error beside the others.
    pub fn pending(&self) -> Vec<(PathBuf, Result<Vec<CanonicalPath>>)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|f| {
                let parsed = fs::read(&f)
                    .map_err(|e| Error::io(format!("cannot read {}", f.display()), e))
                    .and_then(|b| {
                        parse(&b).ok_or_else(|| {
                            Error::Refused(format!("{} is not a rebind record", f.display()))
                        })
                    });
                (f, parsed)
            })
            .collect()
    }

    /// Removes a record whose paths are tidy.
    pub fn remove(&self, record: &Path) {
        if let Err(e) = fs::remove_file(record) {
            tracing::warn!("cannot remove {}: {e}", record.display());
        }
    }
}

impl Pending<'_> {
    /// The rebind finished: forget the record. (Not fsynced: should the removal be lost, the
    /// next mount tidies paths that are already tidy.)
    pub fn finish(self) {
        self.journal.remove(&self.file);
    }
}

fn parse(bytes: &[u8]) -> Option<Vec<CanonicalPath>> {
    let rest = bytes.strip_prefix(MAGIC)?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let rest = rest.strip_suffix(&[0])?;
    rest.split(|&b| b == 0)
        .map(|p| {
            let s = std::str::from_utf8(p).ok()?;
            CanonicalPath::from_encoded(s).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> CanonicalPath {
        CanonicalPath::from_encoded(s).unwrap()
    }

    #[test]
    fn a_record_lists_its_paths_until_finished() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join(META_DIR)).unwrap();
        let journal = Journal::new(root.path());
        assert!(journal.pending().is_empty());
        let paths = vec![path("/a/b"), path("/new line\n%25")];
        let first = journal.begin(&paths).unwrap();
        let second = journal.begin(&[path("/c")]).unwrap();
        let pending = journal.pending();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].1.as_ref().unwrap(), &paths);
        assert_eq!(pending[1].1.as_ref().unwrap(), &vec![path("/c")]);
        first.finish();
        second.finish();
        assert!(journal.pending().is_empty());
    }

    #[test]
    fn a_damaged_record_is_reported_not_guessed_at() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join(META_DIR)).unwrap();
        let journal = Journal::new(root.path());
        journal.begin(&[path("/a")]).unwrap();
        let (file, _) = journal.pending().remove(0);
        fs::write(&file, b"kmsfs-rebind-1\0/a").unwrap(); // torn: no terminator
        assert!(journal.pending()[0].1.is_err());
        fs::write(&file, b"something else\0/a\0").unwrap();
        assert!(journal.pending()[0].1.is_err());
        fs::write(&file, b"kmsfs-rebind-1\0relative\0").unwrap();
        assert!(journal.pending()[0].1.is_err());
    }
}
