//! Names on the store: between the paths a user sees and the stored paths kmsfs works with.
//!
//! Everything below the mount and the commands' arguments works on *stored* paths: the names
//! the backing entries have, which are also what headers bind and what the encryption context
//! names (so CloudTrail and the store show only encrypted names). With plaintext names
//! (`init --plaintext-names`) the two are the same. With encrypted names (the default) each
//! component is encrypted under its directory's id ([`crate::format::names`]): the file id of
//! the directory's authenticated record, read here (and cached by the fs core per inode).
//! Turning a user's path into a stored one walks down from the root, one record per
//! directory; turning a stored path back decrypts each component the same way, which is what
//! `fsck`, `export`, `decode` and `audit` show. A long name's side record is written before
//! its entry and removed after it, so a crash leaves at worst a side record nobody names.

use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::header::ObjectKind;
use crate::format::names::{self, EntryName, StoredName, MAX_SIDE_RECORD};

use super::file::{dir_record, header_facts};
use super::volume::{is_reserved_name, Volume};

/// A long name's side record: where it goes and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideRecord {
    pub path: CanonicalPath,
    pub content: String,
}

/// A name as stored in a directory: the entry's path, and the side record a long name needs.
#[derive(Debug, Clone)]
pub struct StoredChild {
    pub path: CanonicalPath,
    pub side: Option<SideRecord>,
}

/// What a backing entry's name says, read in its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A user's entry and its plaintext name.
    Name(Vec<u8>),
    /// kmsfs's own (a record, a temporary file, a side record): never listed.
    Own,
    /// Not a name kmsfs wrote in this directory (planted, moved there on the store, or its
    /// side record lost): never shown; why.
    Foreign(String),
}

impl Volume {
    /// Whether names are encrypted on the store.
    pub fn encrypted_names(&self) -> bool {
        self.name_key().is_some()
    }

    /// Whether the backing entry `name` (in the root if `in_root`) is kmsfs's own.
    pub fn is_own_name(&self, name: &[u8], in_root: bool) -> bool {
        is_reserved_name(name, in_root)
            || (self.encrypted_names() && names::classify(name) == EntryName::SideRecord)
    }

    /// The id names in the directory at stored path `dir` are encrypted under: its record's
    /// file id, from a record that authenticates and is bound to that directory.
    pub fn dir_id(&self, dir: &CanonicalPath) -> Result<[u8; 16]> {
        let record = dir_record(dir);
        let file = self
            .backing()
            .open_file(&record, false, crate::backing::Atime::Keep)
            .map_err(|e| Error::io(format!("cannot open the record of {dir}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {record}"), e))?
            .len();
        let facts = header_facts(self, &file, len, &record)?;
        if facts.attrs.kind != ObjectKind::Dir {
            return Err(Error::Integrity(format!(
                "{dir}: its record is not a directory's"
            )));
        }
        Ok(facts.file_id)
    }

    /// `dir`'s id as the caller knows it, else read from its record.
    fn given_or_read(&self, dir: &CanonicalPath, given: Option<&[u8; 16]>) -> Result<[u8; 16]> {
        match given {
            Some(id) => Ok(*id),
            None => self.dir_id(dir),
        }
    }

    /// Where the entry `name` of the directory at stored path `dir` (whose id is `dir_id`,
    /// with encrypted names) is stored.
    pub fn stored_child(
        &self,
        dir: &CanonicalPath,
        dir_id: Option<&[u8; 16]>,
        name: &[u8],
    ) -> Result<StoredChild> {
        let bad = |e| Error::format(dir, e);
        let Some(key) = self.name_key() else {
            return Ok(StoredChild {
                path: dir.join(name).map_err(bad)?,
                side: None,
            });
        };
        let id = self.given_or_read(dir, dir_id)?;
        match names::encrypt(key, &id, name).map_err(bad)? {
            StoredName::Short(s) => Ok(StoredChild {
                path: dir.join(s.as_bytes()).map_err(bad)?,
                side: None,
            }),
            StoredName::Long { backing, encrypted } => Ok(StoredChild {
                path: dir.join(backing.as_bytes()).map_err(bad)?,
                side: Some(SideRecord {
                    path: dir
                        .join(names::side_record(&backing).as_bytes())
                        .map_err(bad)?,
                    content: encrypted,
                }),
            }),
        }
    }

    /// The plaintext name of the backing entry `name` in the directory at stored path `dir`
    /// (whose id is `dir_id`, with encrypted names; read if None).
    pub fn listed_name(
        &self,
        dir: &CanonicalPath,
        dir_id: Option<&[u8; 16]>,
        name: &[u8],
    ) -> Result<Listed> {
        if self.is_own_name(name, dir.is_root()) {
            return Ok(Listed::Own);
        }
        let Some(key) = self.name_key() else {
            return Ok(Listed::Name(name.to_vec()));
        };
        let encrypted = match names::classify(name) {
            EntryName::Short(s) => s.to_string(),
            EntryName::Long => {
                let side = names::side_record(std::str::from_utf8(name).expect("classified"));
                let path = dir
                    .join(side.as_bytes())
                    .map_err(|e| Error::format(dir, e))?;
                let content = match self.read_side_record(&path) {
                    Ok(c) => c,
                    Err(e) => return Ok(Listed::Foreign(format!("its side record: {e}"))),
                };
                match names::side_record_name(
                    &side[..side.len() - names::SIDE_SUFFIX.len()],
                    &content,
                ) {
                    Ok(n) => n,
                    Err(e) => return Ok(Listed::Foreign(e.to_string())),
                }
            }
            EntryName::SideRecord => return Ok(Listed::Own),
            EntryName::Other => return Ok(Listed::Foreign("not an encrypted name".into())),
        };
        let id = self.given_or_read(dir, dir_id)?;
        Ok(match names::decrypt(key, &id, &encrypted) {
            Ok(n) => Listed::Name(n),
            Err(_) => Listed::Foreign("a name that does not decrypt in this directory".into()),
        })
    }

    fn read_side_record(&self, path: &CanonicalPath) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let file = self
            .backing()
            .open_file(path, false, crate::backing::Atime::Keep)?;
        let mut out = Vec::new();
        file.take(MAX_SIDE_RECORD as u64 + 1)
            .read_to_end(&mut out)?;
        if out.len() > MAX_SIDE_RECORD {
            return Err(std::io::Error::other("too long"));
        }
        Ok(out)
    }

    /// Writes a long name's side record (before its entry): one already there with the same
    /// content is fine (left by an entry removed in a crash, or the entry a rename replaces).
    pub fn put_side_record(&self, side: &SideRecord) -> Result<()> {
        match self
            .backing()
            // On disk before its entry can be: an entry whose side record a crash lost
            // would have no name.
            .write_new_as(&side.path, side.content.as_bytes(), true)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match self.read_side_record(&side.path) {
                    Ok(c) if c == side.content.as_bytes() => Ok(()),
                    _ => Err(Error::Integrity(format!(
                        "{}: a side record that is not this name's stands there",
                        side.path
                    ))),
                }
            }
            Err(e) => Err(Error::io(format!("cannot create {}", side.path), e)),
        }
    }

    /// Removes a long name's side record once its entry is gone (a failure only leaves a
    /// record nobody names).
    pub fn drop_side_record(&self, side: &Option<SideRecord>) {
        if let Some(side) = side {
            if let Err(e) = self.backing().unlink(&side.path, None) {
                tracing::warn!("cannot remove the side record {}: {e}", side.path);
            }
        }
    }

    /// The stored path of the user's path `plain` (its directories must exist).
    pub fn stored_path(&self, plain: &CanonicalPath) -> Result<CanonicalPath> {
        if !self.encrypted_names() {
            return Ok(plain.clone());
        }
        let mut stored = CanonicalPath::root();
        for name in plain.to_relative_path().iter() {
            stored = self.stored_child(&stored, None, name.as_bytes())?.path;
        }
        Ok(stored)
    }

    /// Where a new entry at the user's path `plain` is stored (its directory must exist); a
    /// long name's side record is written now, before the entry is made.
    pub fn prepare_entry(&self, plain: &CanonicalPath) -> Result<CanonicalPath> {
        let parent = plain
            .parent()
            .ok_or_else(|| Error::Usage("the volume root is not a new entry".into()))?;
        let name = plain
            .to_relative_path()
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let missing = || Error::Refused(format!("the parent directory of {plain} does not exist"));
        let dir = self.stored_path(&parent).map_err(|e| match &e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => missing(),
            _ => e,
        })?;
        if !self.backing().metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Err(missing());
        }
        let child = self.stored_child(&dir, None, &name)?;
        if let Some(side) = &child.side {
            self.put_side_record(side)?;
        }
        Ok(child.path)
    }

    /// The user's path of the stored path `stored`, decrypting each component in its
    /// directory; fails at the first that does not decrypt (or whose directory is gone).
    pub fn plain_path(&self, stored: &CanonicalPath) -> Result<CanonicalPath> {
        let mut names = NameCache::default();
        names.plain_path(self, stored)
    }

    /// The stored path `stored` for a message: its user's path where it decrypts, else the
    /// stored path itself.
    pub fn shown_path(&self, stored: &CanonicalPath) -> String {
        match self.plain_path(stored) {
            Ok(p) => p.to_string(),
            Err(_) => stored.to_string(),
        }
    }
}

/// Directory ids already read, for a walk that names many paths (fsck, audit).
#[derive(Default)]
pub struct NameCache {
    ids: std::collections::HashMap<CanonicalPath, [u8; 16]>,
}

impl NameCache {
    pub fn dir_id(&mut self, volume: &Volume, dir: &CanonicalPath) -> Result<[u8; 16]> {
        if let Some(id) = self.ids.get(dir) {
            return Ok(*id);
        }
        let id = volume.dir_id(dir)?;
        if self.ids.len() > 100_000 {
            self.ids.clear();
        }
        self.ids.insert(dir.clone(), id);
        Ok(id)
    }

    /// See [`Volume::plain_path`].
    pub fn plain_path(&mut self, volume: &Volume, stored: &CanonicalPath) -> Result<CanonicalPath> {
        if !volume.encrypted_names() {
            return Ok(stored.clone());
        }
        let mut dir = CanonicalPath::root();
        let mut plain = CanonicalPath::root();
        for name in stored.to_relative_path().iter() {
            let id = self.dir_id(volume, &dir)?;
            match volume.listed_name(&dir, Some(&id), name.as_bytes())? {
                Listed::Name(n) => {
                    plain = plain.join(&n).map_err(|e| Error::format(&plain, e))?;
                }
                Listed::Own => {
                    plain = plain
                        .join(name.as_bytes())
                        .map_err(|e| Error::format(&plain, e))?;
                }
                Listed::Foreign(why) => {
                    return Err(Error::Integrity(format!(
                        "{}: {why}",
                        dir.join(name.as_bytes()).unwrap_or(dir.clone())
                    )))
                }
            }
            dir = dir
                .join(name.as_bytes())
                .map_err(|e| Error::format(&dir, e))?;
        }
        Ok(plain)
    }
}
