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
//! The store is hostile, so a record is MACed under a key derived from the volume key: one
//! the daemon did not write (forged, or naming `/` to make every mount walk the whole volume)
//! does not authenticate and is never acted on. A record that does not parse or authenticate
//! is never deleted either: it is reported (log, `fsck`, `status`) and left for the operator.
//! Records are read and removed only through the `.kmsfs/pending` directory's descriptor
//! (a real directory owned by the daemon's uid, never a symlink), and no larger than
//! [`MAX_RECORD`]. Even an authentic record says only where to look: tidying decides what is
//! stale from the backing store itself (an envelope whose path does not name the same inode),
//! so a lost or repeated record can leave a stale envelope for later but cannot drop a live one.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backing::MetaDir;
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::kdf;
use crate::secret::DerivedKey;

use super::volume::{Volume, META_DIR};

const DIR_NAME: &str = "pending";
const MAGIC: &[u8] = b"kmsfs-rebind-2\0";
const TAG_LEN: usize = 32;
/// Most bytes a record may have (a rename records at most a few paths).
pub const MAX_RECORD: u64 = 512 * 1024;

/// Where a volume keeps its pending records.
pub struct Journal {
    dir: Option<MetaDir>,
    mac_key: DerivedKey,
    next: AtomicU64,
}

/// A written record; removing it marks the rebind finished. While it lives its record stays
/// locked (see [`MetaDir::write_new_locked`]): the rebind is *live*, and no tidy by any mount
/// of the store, nor `fsck --repair`, takes its half-done names for stale.
pub struct Pending<'a> {
    journal: &'a Journal,
    name: String,
    _live: std::fs::File,
}

/// A record found in the journal.
pub struct Record {
    pub name: String,
    /// Its rebind is under way (on this mount or another): not one a crash left.
    pub live: bool,
    /// The paths it names, or why it cannot be used (unreadable, not a record, not authentic).
    pub paths: Result<Vec<CanonicalPath>>,
}

impl Journal {
    /// The volume's journal. A writable user creates `.kmsfs/pending` if missing; every user
    /// refuses (one clear line) one that is not a real directory owned by them.
    pub fn new(volume: &Volume, read_only: bool) -> Result<Self> {
        let refuse = |e: std::io::Error| Error::Refused(e.to_string());
        let dir = match volume.backing().meta_dir(META_DIR, false) {
            Ok(meta) => match meta.subdir(DIR_NAME, !read_only) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && read_only => None,
                Err(e) => return Err(refuse(e)),
            },
            Err(e) => return Err(refuse(e)),
        };
        Ok(Journal {
            dir,
            mac_key: volume.rebind_record_mac_key(),
            next: AtomicU64::new(0),
        })
    }

    fn shown(&self) -> String {
        self.dir
            .as_ref()
            .map_or_else(|| DIR_NAME.to_string(), |d| d.shown().display().to_string())
    }

    /// Records `paths` durably (file and directory fsynced) before a rebind starts.
    pub fn begin(&self, paths: &[CanonicalPath]) -> Result<Pending<'_>> {
        let io = |e| {
            Error::io(
                format!("cannot write the rebind journal in {}", self.shown()),
                e,
            )
        };
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| io(std::io::Error::from_raw_os_error(libc::EROFS)))?;
        let bytes = encode(&self.mac_key, paths);
        if bytes.len() as u64 > MAX_RECORD {
            return Err(io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
        }
        // Unique across restarts too: a record left by a crash is never overwritten.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{stamp:032x}-{}-{n}", std::process::id());
        let live = dir.write_new_locked(&name, &bytes).map_err(io)?;
        Ok(Pending {
            journal: self,
            name,
            _live: live,
        })
    }

    /// The paths named by the records of rebinds under way now, on any mount of the store
    /// (but `own`, the caller's): names those rebinds are adding or dropping, which a tidy
    /// must leave alone.
    pub fn live_paths(&self, own: Option<&Pending>) -> Vec<CanonicalPath> {
        let own = own.map(|p| p.name.as_str());
        self.pending()
            .into_iter()
            .filter(|r| r.live && Some(r.name.as_str()) != own)
            .filter_map(|r| r.paths.ok())
            .flatten()
            .collect()
    }

    /// Records left by rebinds that did not finish, oldest first, with the paths they name.
    /// A record that cannot be read, parsed or authenticated is reported as an error beside
    /// the others (and must be left where it is).
    pub fn pending(&self) -> Vec<Record> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let mut names: Vec<String> = match dir.list() {
            // A name beginning with `.` is a record still being written (or one a crash cut
            // short before it had its name): never a record.
            Ok(names) => names
                .into_iter()
                .filter_map(|n| n.into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list the rebind journal {}: {e}", self.shown());
                return Vec::new();
            }
        };
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let shown = dir.shown().join(&name).display().to_string();
                let paths = dir
                    .read(&name, MAX_RECORD)
                    .map_err(|e| Error::io(format!("cannot read {shown}"), e))
                    .and_then(|b| {
                        decode(&self.mac_key, &b).ok_or_else(|| {
                            Error::Integrity(format!(
                                "{shown} is not an authentic rebind record of this volume; \
                                 left in place (remove it by hand once you know where it came from)"
                            ))
                        })
                    });
                let live = dir.in_use(&name).unwrap_or(false);
                Record { name, paths, live }
            })
            .collect()
    }

    /// Removes a record whose paths are tidy (only ever one that parsed and authenticated,
    /// and is not live).
    pub fn remove(&self, record: &Record) {
        if record.paths.is_ok() && !record.live {
            self.remove_name(&record.name);
        }
    }

    /// Removes what a crash left of records being written (names beginning with `.`: never a
    /// record, see [`MetaDir::write_new_locked`](crate::backing::MetaDir::write_new_locked));
    /// one being written now (by another mount of the store) is locked, and stays.
    pub fn remove_unfinished_writes(&self) {
        let Some(dir) = &self.dir else { return };
        let Ok(names) = dir.list() else { return };
        for name in names.into_iter().filter_map(|n| n.into_string().ok()) {
            if name.starts_with('.') && name.contains(".tmp") && !dir.in_use(&name).unwrap_or(true)
            {
                self.remove_name(&name);
            }
        }
    }

    fn remove_name(&self, name: &str) {
        if let Some(dir) = &self.dir {
            if let Err(e) = dir.unlink(name) {
                tracing::warn!("cannot remove the rebind record {name}: {e}");
            }
        }
    }
}

impl Pending<'_> {
    /// Leaves the record as a crash would: in place, no longer live (tests of recovery).
    pub fn abandon(self) {
        drop(self._live);
    }

    /// The rebind finished: forget the record. (Not fsynced: should the removal be lost, the
    /// next mount tidies paths that are already tidy.)
    pub fn finish(self) {
        self.journal.remove_name(&self.name);
    }
}

/// Whether `path` is at or beneath one of `live` (what [`Journal::live_paths`] gives): a name a
/// rebind under way may be adding or dropping.
pub fn under_way_at(path: &CanonicalPath, live: &[CanonicalPath]) -> bool {
    live.iter().any(|dir| {
        let (p, d) = (path.as_str(), dir.as_str());
        dir.is_root() || p == d || (p.starts_with(d) && p.as_bytes().get(d.len()) == Some(&b'/'))
    })
}

fn encode(mac_key: &DerivedKey, paths: &[CanonicalPath]) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    for p in paths {
        bytes.extend_from_slice(p.as_str().as_bytes());
        bytes.push(0);
    }
    let tag = kdf::hmac(mac_key, &[&bytes]);
    bytes.extend_from_slice(&tag);
    bytes
}

fn decode(mac_key: &DerivedKey, bytes: &[u8]) -> Option<Vec<CanonicalPath>> {
    let split = bytes.len().checked_sub(TAG_LEN)?;
    let (body, tag) = bytes.split_at(split);
    if !kdf::hmac_verify(mac_key, &[body], tag.try_into().ok()?) {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
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

    fn key() -> DerivedKey {
        DerivedKey::new([7; 32])
    }

    #[test]
    fn a_record_round_trips_and_names_its_paths() {
        let paths = vec![path("/a/b"), path("/new line\n%25")];
        assert_eq!(decode(&key(), &encode(&key(), &paths)), Some(paths));
        assert_eq!(decode(&key(), &encode(&key(), &[])), Some(vec![]));
    }

    #[test]
    fn a_forged_record_naming_the_root_is_not_authentic() {
        // What an attacker with write access to the store can write: the right magic and a
        // path, with a tag under some other key (or none).
        let forged = encode(&DerivedKey::new([8; 32]), &[path("/")]);
        assert_eq!(decode(&key(), &forged), None);
        let mut untagged = MAGIC.to_vec();
        untagged.extend_from_slice(b"/\0");
        assert_eq!(decode(&key(), &untagged), None);
        // Positive control: the same record under the volume's key is accepted.
        assert_eq!(
            decode(&key(), &encode(&key(), &[path("/")])),
            Some(vec![path("/")])
        );
    }

    #[test]
    fn a_damaged_record_is_reported_not_guessed_at() {
        let mut torn = encode(&key(), &[path("/a")]);
        torn.truncate(torn.len() - 1);
        assert_eq!(decode(&key(), &torn), None);
        let mut flipped = encode(&key(), &[path("/a")]);
        flipped[MAGIC.len()] ^= 1;
        assert_eq!(decode(&key(), &flipped), None);
        assert_eq!(decode(&key(), b"short"), None);
    }
}
