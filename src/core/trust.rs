//! This host's record of which keys each volume trusts, kept outside the store.
//!
//! A volume config names its own trusted keys, and an attacker who can write the store can
//! replace it with one made under their own key (its MAC is then valid). Without `--key`, the
//! first use of a volume on a host (`init`, or the first command that opens a volume made
//! elsewhere: trust on first use) records its volume id, its backing path and its trusted key
//! ids here; every later open reaches only the recorded keys before the config's MAC is
//! checked, and refuses a config whose trusted keys differ from the record, with one line
//! saying what changed and how to approve it (`kmsfs trust BACKING`). `rewrap` updates the
//! record for the change it makes: first recording the keys it moves to (`next`), then writing
//! the config, then the record in full, so a crash between leaves a config this host still
//! opens (its `next`, which then becomes the record), never one it refuses.
//!
//! One small text file per volume, `<state dir>/volumes/<volume id hex>`, and one per backing
//! path, `<state dir>/paths/<SHA-256 of the path>` naming the volume recorded there (so a new
//! volume put in place of a recorded one is refused, not trusted on first use); mode 0600 in
//! directories of mode 0700, written atomically (temporary file, fsync, rename, fsync of the
//! directory). The state directory is `$KMSFS_STATE_DIR` if set, else `/var/lib/kmsfs` for
//! root, else `$XDG_STATE_HOME/kmsfs` or `~/.local/state/kmsfs`.

// The state directory is this host's, never the store's.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::codec::{hex, unhex};

/// The environment variable that overrides the state directory (tests, unusual layouts).
pub const STATE_DIR_ENV: &str = "KMSFS_STATE_DIR";

const HEADER: &str = "# kmsfs trust record: the keys this host trusts for one volume; \
change it with 'kmsfs trust BACKING'";

/// The state directory for the user running kmsfs.
pub fn state_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/kmsfs"));
    }
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state"),
            None => {
                return Err(Error::Usage(format!(
                    "cannot find a state directory to record the volume's trusted keys in: set \
                     HOME, XDG_STATE_HOME or {STATE_DIR_ENV}, or pin the key with --key"
                )))
            }
        },
    };
    Ok(base.join("kmsfs"))
}

/// A trusted key as this host recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedKey {
    /// The key id envelopes name: `local:<fingerprint>` or a KMS key ARN.
    pub id: String,
    /// For a local key, the key file this host reads it from; KMS keys are reached by id.
    pub path: Option<PathBuf>,
}

/// What this host recorded about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub volume_id: [u8; 16],
    /// The canonical backing directory it was recorded at (another volume found there later
    /// is refused, not trusted on first use).
    pub backing: PathBuf,
    /// In preference order: the first is the key new data keys are generated under.
    pub keys: Vec<RecordedKey>,
    /// The keys a change this host's operator is making moves the volume to (empty: none):
    /// recorded before the volume's config is written, so a crash between the two leaves a
    /// config the record accepts (see [`Record::landed`]).
    pub next: Vec<RecordedKey>,
}

impl Record {
    fn encode(&self) -> Result<String> {
        let mut out = format!("{HEADER}\nvolume {}\n", hex(&self.volume_id));
        let line = |s: &str| {
            if s.contains('\n') {
                Err(Error::Refused(format!(
                    "cannot record {s:?}: it holds a newline"
                )))
            } else {
                Ok(())
            }
        };
        let backing = self.backing.to_string_lossy();
        line(&backing)?;
        out += &format!("backing {backing}\n");
        let keys = self.keys.iter().map(|k| ("key", k));
        for (what, k) in keys.chain(self.next.iter().map(|k| ("next", k))) {
            line(&k.id)?;
            if k.id.contains(' ') || k.id.is_empty() {
                return Err(Error::Refused(format!("cannot record key id {:?}", k.id)));
            }
            match &k.path {
                Some(p) => {
                    let p = p.to_string_lossy();
                    line(&p)?;
                    out += &format!("{what} {} {p}\n", k.id);
                }
                None => out += &format!("{what} {}\n", k.id),
            }
        }
        Ok(out)
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut volume_id = None;
        let mut backing = None;
        let mut keys = Vec::new();
        let mut next = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (what, rest) = line.split_once(' ').unwrap_or((line, ""));
            match what {
                "volume" => {
                    let bytes = unhex(rest).ok_or("bad volume id")?;
                    volume_id = Some(bytes.try_into().map_err(|_| "bad volume id")?);
                }
                "backing" => backing = Some(PathBuf::from(rest)),
                "key" | "next" => {
                    let (id, path) = match rest.split_once(' ') {
                        Some((id, path)) => (id, Some(PathBuf::from(path))),
                        None => (rest, None),
                    };
                    if id.is_empty() {
                        return Err("empty key id".into());
                    }
                    let key = RecordedKey {
                        id: id.to_string(),
                        path,
                    };
                    if what == "key" {
                        keys.push(key)
                    } else {
                        next.push(key)
                    }
                }
                other => return Err(format!("unknown line '{other}'")),
            }
        }
        match (volume_id, backing) {
            (Some(volume_id), Some(backing)) if !keys.is_empty() => Ok(Record {
                volume_id,
                backing,
                keys,
                next,
            }),
            _ => Err("incomplete".into()),
        }
    }

    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The record as it is once the change under way (`next`) has landed, if `now` (a
    /// config's trusted key ids) is what it moves to: the operator's own change, cut short by
    /// a crash after the config was written and before the record followed it.
    pub fn landed(&self, now: &[&str]) -> Option<Record> {
        let next: Vec<&str> = self.next.iter().map(|k| k.id.as_str()).collect();
        (!next.is_empty() && next == now).then(|| Record {
            keys: self.next.clone(),
            next: Vec::new(),
            ..self.clone()
        })
    }
}

/// The records of one state directory: `volumes/<volume id>` for each volume, and
/// `paths/<SHA-256 of its backing path>` naming the volume recorded there.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

impl TrustStore {
    pub fn new(state_dir: &Path) -> Self {
        TrustStore {
            dir: state_dir.to_path_buf(),
        }
    }

    fn path_of(&self, volume_id: &[u8; 16]) -> PathBuf {
        self.dir.join("volumes").join(hex(volume_id))
    }

    fn index_of(&self, backing: &Path) -> PathBuf {
        use sha2::Digest;
        use std::os::unix::ffi::OsStrExt;
        let digest = sha2::Sha256::digest(backing.as_os_str().as_bytes());
        self.dir.join("paths").join(hex(&digest))
    }

    fn read(&self, path: &Path) -> Result<Option<Record>> {
        match fs::read_to_string(path) {
            Ok(text) => Record::parse(&text).map(Some).map_err(|e| {
                Error::Refused(format!(
                    "the trust record {} is damaged ({e}); remove it and approve the volume again with 'kmsfs trust BACKING'",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    /// The record of the volume `volume_id`.
    pub fn get(&self, volume_id: &[u8; 16]) -> Result<Option<Record>> {
        self.read(&self.path_of(volume_id))
    }

    /// The record of another volume recorded at `backing` (a volume replaced in place).
    pub fn other_at(&self, backing: &Path, volume_id: &[u8; 16]) -> Result<Option<Record>> {
        let index = self.index_of(backing);
        let named = match fs::read_to_string(&index) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", index.display()), e)),
        };
        let Some(id) = unhex(&named).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
            return Ok(None);
        };
        if &id == volume_id {
            return Ok(None);
        }
        // The index is a hint: the volume's own record must say it is still there.
        Ok(self.get(&id)?.filter(|r| r.backing == backing))
    }

    /// Writes `record` atomically, and makes it the volume recorded at its backing path
    /// (dropping the record of a volume it replaced there).
    pub fn put(&self, record: &Record) -> Result<()> {
        let replaced = self.other_at(&record.backing, &record.volume_id)?;
        self.write(&self.path_of(&record.volume_id), &record.encode()?)?;
        self.write(
            &self.index_of(&record.backing),
            &format!("{}\n", hex(&record.volume_id)),
        )?;
        if let Some(old) = replaced {
            let _ = fs::remove_file(self.path_of(&old.volume_id));
        }
        Ok(())
    }

    /// Temporary file (mode 0600), fsync, rename, fsync of the directory (mode 0700).
    fn write(&self, target: &Path, text: &str) -> Result<()> {
        let dir = target.parent().expect("a record has a directory");
        let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("cannot create", e))?;
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).expect("the OS random number generator failed");
        let tmp = dir.join(format!(".tmp-{}", hex(&nonce)));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, target)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io("cannot write the trust record in", e)
        })
    }
}

/// What changed between a recorded key list and a config's, for one line: empty if the set
/// and the first key are the same.
pub fn describe_change(recorded: &[&str], now: &[&str]) -> String {
    let mut parts = Vec::new();
    let added: Vec<&str> = now
        .iter()
        .filter(|k| !recorded.contains(k))
        .copied()
        .collect();
    let removed: Vec<&str> = recorded
        .iter()
        .filter(|k| !now.contains(k))
        .copied()
        .collect();
    if !added.is_empty() {
        parts.push(format!("added {}", added.join(", ")));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(", ")));
    }
    if let (Some(a), Some(b)) = (recorded.first(), now.first()) {
        if a != b {
            parts.push(format!("new files now use {b}, not {a}"));
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u8, keys: &[(&str, Option<&str>)]) -> Record {
        Record {
            volume_id: [id; 16],
            backing: PathBuf::from("/srv/store with space"),
            keys: keys
                .iter()
                .map(|(id, p)| RecordedKey {
                    id: id.to_string(),
                    path: p.map(PathBuf::from),
                })
                .collect(),
            next: Vec::new(),
        }
    }

    #[test]
    fn records_round_trip_and_replace_others_at_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::new(dir.path());
        assert_eq!(store.get(&[1; 16]).unwrap(), None);
        let a = record(
            1,
            &[("local:ab", Some("/k/a key")), ("arn:aws:kms:x", None)],
        );
        store.put(&a).unwrap();
        assert_eq!(store.get(&[1; 16]).unwrap(), Some(a.clone()));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("volumes")), 0o700);
        assert_eq!(mode(&store.path_of(&[1; 16])), 0o600);
        assert_eq!(store.other_at(&a.backing, &[1; 16]).unwrap(), None);
        assert_eq!(
            store.other_at(&a.backing, &[2; 16]).unwrap(),
            Some(a.clone())
        );
        let b = record(2, &[("local:cd", Some("/k/b"))]);
        store.put(&b).unwrap();
        assert_eq!(store.get(&[1; 16]).unwrap(), None, "replaced at its path");
        assert_eq!(store.get(&[2; 16]).unwrap(), Some(b));
        fs::write(store.path_of(&[3; 16]), "volume zz\n").unwrap();
        assert!(store
            .get(&[3; 16])
            .unwrap_err()
            .to_string()
            .contains("damaged"));
    }

    #[test]
    fn changes_are_described_in_one_line() {
        assert_eq!(describe_change(&["a", "b"], &["a", "b"]), "");
        assert_eq!(describe_change(&["a", "b"], &["a"]), "removed b");
        assert_eq!(
            describe_change(&["a"], &["x", "a"]),
            "added x; new files now use x, not a"
        );
        assert_eq!(
            describe_change(&["a", "b"], &["b", "a"]),
            "new files now use b, not a"
        );
    }
}
