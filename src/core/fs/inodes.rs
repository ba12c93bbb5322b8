//! The inode table: which paths each inode the kernel holds is known by.
//!
//! FUSE names files by inode; the backing store by path. The table maps every inode the kernel
//! has looked up (and not forgotten) to the paths it was found at, preferred first, and counts
//! the kernel's lookups. Inode numbers are the backing store's own, with the backing root's
//! traded for 1; a change names the backing inode it expects ([`KmsFs::expected`]), so an
//! entry swapped on the store since the kernel's lookup is refused rather than changed.

use super::*;

#[derive(Default)]
pub(super) struct Node {
    pub(super) paths: Vec<CanonicalPath>,
    pub(super) lookups: u64,
    /// A directory's id, which its entries' names are encrypted under (read from its record
    /// when first needed; it never changes while the directory exists).
    pub(super) dir_id: Option<[u8; 16]>,
}

impl KmsFs {
    /// The FUSE inode of a backing inode (the backing root and inode 1 trade places). Files
    /// are never replaced by new inodes while mounted, so the numbers stay meaningful.
    pub(super) fn ino_of(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    pub(super) fn path_of(&self, ino: u64) -> Result<CanonicalPath> {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .get(&ino)
            .and_then(|n| n.paths.first().cloned())
            .ok_or_else(|| os(format!("inode {ino}"), libc::ESTALE))
    }

    /// The backing inode the kernel named as `ino`: what a change must find at the inode's
    /// path, else it fails (`ESTALE`) and changes nothing.
    pub(super) fn expected(&self, ino: u64) -> Identity {
        Identity {
            dev: self.root_dev,
            ino: self.ino_of(ino),
        }
    }

    /// Where the entry `name` of directory `parent` is stored (with the side record a long
    /// encrypted name needs).
    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Result<StoredChild> {
        let dir = self.path_of(parent)?;
        let id = if self.volume.encrypted_names() {
            Some(self.dir_id_of(parent, &dir)?)
        } else {
            None
        };
        self.child_in(parent, &dir, id, name)
    }

    /// Where a new entry `name` of directory `parent` goes, and the directory's attributes:
    /// its id read from its record as it is now (a name made under an id remembered of
    /// another directory would not decrypt here later).
    pub(super) fn new_child(&self, parent: u64, name: &OsStr) -> Result<(StoredChild, Attrs)> {
        let dir = self.path_of(parent)?;
        let (attrs, id) = self.dir_record_facts(&dir, None)?;
        let encrypted = self.volume.encrypted_names();
        if encrypted {
            if let Some(node) = self.nodes.lock().unwrap().get_mut(&parent) {
                node.dir_id = Some(id);
            }
        }
        let child = self.child_in(parent, &dir, encrypted.then_some(id), name)?;
        Ok((child, attrs))
    }

    fn child_in(
        &self,
        parent: u64,
        dir: &CanonicalPath,
        id: Option<[u8; 16]>,
        name: &OsStr,
    ) -> Result<StoredChild> {
        if id.is_none() && is_reserved_name(name.as_bytes(), parent == ROOT_INO) {
            return Err(os(format!("{name:?} is reserved"), libc::EPERM));
        }
        self.volume
            .stored_child(dir, id.as_ref(), name.as_bytes())
            .map_err(|e| match e {
                Error::Format {
                    source: crate::format::FormatError::TooLarge(why),
                    ..
                } => os(format!("name too long: {why}"), libc::ENAMETOOLONG),
                Error::Format { .. } => os(format!("bad name {name:?}"), libc::EINVAL),
                e => e,
            })
    }

    /// The id of directory `ino` at `dir` (remembered in its node).
    pub(super) fn dir_id_of(&self, ino: u64, dir: &CanonicalPath) -> Result<[u8; 16]> {
        if let Some(id) = self.nodes.lock().unwrap().get(&ino).and_then(|n| n.dir_id) {
            return Ok(id);
        }
        // Through the header cache a stat of the directory has just filled.
        let (_, id) = self.dir_record_facts(dir, None)?;
        if let Some(node) = self.nodes.lock().unwrap().get_mut(&ino) {
            node.dir_id = Some(id);
        }
        Ok(id)
    }

    /// Remembers that `ino` is reachable at `path` (now its preferred path) and counts one
    /// kernel lookup. Paths it is no longer found at (moved behind the mount) are dropped.
    pub(super) fn remember(&self, ino: u64, path: &CanonicalPath) {
        let mut gone = Vec::new();
        {
            let mut nodes = self.nodes.lock().unwrap();
            let node = nodes.entry(ino).or_default();
            if node.paths.is_empty() {
                // Known by no name: whatever directory id it had was another directory's.
                node.dir_id = None;
            }
            if node.paths.first() != Some(path) {
                node.paths.retain(|p| {
                    let here = p != path
                        && self
                            .store()
                            .metadata(p)
                            .is_ok_and(|m| self.ino_of(m.ino()) == ino);
                    if !here && p != path {
                        gone.push(p.clone());
                    }
                    here
                });
                node.paths.insert(0, path.clone());
                if !gone.is_empty() {
                    // Its old names hold it no more: the inode number may be a new
                    // directory's (ext4 reuses them at once), with an id of its own.
                    node.dir_id = None;
                }
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
    pub(super) fn forget_path(&self, ino: u64, path: &CanonicalPath) {
        if let Some(node) = self.nodes.lock().unwrap().get_mut(&ino) {
            node.paths.retain(|p| p != path);
        }
    }

    /// Every known path equal to `from` or beneath it moves beneath `to` (for a file, only
    /// its own node `ino` is looked at).
    pub(super) fn move_paths(&self, ino: Option<u64>, from: &CanonicalPath, to: &CanonicalPath) {
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
    pub(super) fn move_known_paths(&self, from: &CanonicalPath, to: &CanonicalPath, exact: bool) {
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

    /// Inodes the kernel has looked up and not yet forgotten: what the daemon's table holds.
    pub fn known_inodes(&self) -> usize {
        self.nodes.lock().unwrap().len()
    }

    /// The inode of the file at `path` if the core has it open (its instance must see header
    /// changes), for `with_file`.
    pub(super) fn ino_at(&self, path: &CanonicalPath) -> u64 {
        self.store()
            .metadata(path)
            .map(|m| self.ino_of(m.ino()))
            .unwrap_or(0)
    }
}
