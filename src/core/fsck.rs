//! fsck: check every file of a volume against the backing store it sits on.
//!
//! For each regular file: the header parses; a slot authenticates under the volume's header
//! key; the newest authentic slot has an envelope for the path the file is at (else it was
//! moved or swapped there); its data key unwraps under that path's context through a trusted
//! key and matches the commitment; the backing length is one the format can produce; the final
//! block opens (a file cut at a block boundary fails there); and with `deep`, every block
//! opens. Envelopes for names the file no longer has are reported as stale and, with
//! `repair`, dropped from both slots (the only repair fsck makes: it never touches data).
//! Rebind records left by a crash and temporary files left by an import are reported too.

use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

use super::file::{is_dir_record, open_backing, read_header_only, EncryptedFile};
use super::journal::{under_way_at, Journal};
use super::volume::{Volume, TEMP_PREFIX};
use crate::backing::DataLock;
use crate::format::header::ObjectKind;
use crate::format::object::DIR_RECORD;

/// One thing wrong, found at `path`.
#[derive(Debug, Clone)]
pub struct Problem {
    pub path: String,
    pub kind: &'static str,
    pub detail: String,
    /// Fixed by this run (`repair`).
    pub repaired: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.problems.iter().all(|p| p.repaired)
    }
}

/// A coarse class for an error found opening or reading a file.
fn classify(e: &Error) -> &'static str {
    use crate::format::FormatError as F;
    use crate::keys::KeyErrorKind as K;
    match e {
        Error::Moved { .. } => "moved",
        Error::Key { source, .. } if source.kind == K::ContextMismatch => "bound-elsewhere",
        Error::Key { source, .. } if source.kind == K::UntrustedKey => "untrusted-key",
        Error::Key { .. } | Error::KeyService(_) => "key-unavailable",
        Error::Format { source, .. } => match source {
            F::DecryptionFailed(_) => "tampered-block",
            F::HeaderAuthFailed(_) | F::CommitmentMismatch => "tampered-header",
            F::InvalidLength(_) => "truncated",
            _ => "damaged-header",
        },
        Error::Io { .. } => "unreadable",
        _ => "other",
    }
}

/// Checks one file; returns its problems.
fn check_file(volume: &Volume, path: &CanonicalPath, deep: bool, repair: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let problem = |kind, detail: String| Problem {
        path: path.to_string(),
        kind,
        detail,
        repaired: false,
    };
    // A create that returned before its key arrived, then the daemon stopped (see
    // core::instance): empty, never fsynced. Not removed: a live mount may be writing it now.
    if volume.backing().metadata(path).is_ok_and(|m| m.len() == 0) {
        out.push(problem(
            "unfinished-create",
            "empty: created, but the daemon stopped before its key and header were written \
             (nothing in it was fsynced); delete it if no mount is writing it"
                .into(),
        ));
        return out;
    }
    // A mount of the store may be writing or renewing the file right now: what fails to
    // authenticate is looked at again while no mount changes it (its data lock, shared).
    let verify = |file: &EncryptedFile| {
        if deep {
            file.verify_all()
        } else {
            file.verify_last_block()
        }
    };
    let mut settled = None;
    let mut opened = EncryptedFile::open(volume, path, repair);
    let first_check = opened.as_ref().map(&verify).map_err(|_| ());
    let unsettled = matches!(opened, Err(Error::Format { .. } | Error::Io { .. }))
        || matches!(
            first_check,
            Ok(Err(Error::Format { .. } | Error::Io { .. }))
        );
    if unsettled {
        settled = open_backing(volume, path, false).ok().and_then(|f| {
            DataLock::new(volume.backing(), &f)
                .and_then(|l| l.take_owned(false))
                .ok()
        });
        opened = EncryptedFile::open(volume, path, repair);
    }
    let mut file = match opened {
        Ok(f) => f,
        // Renamed or removed since the walk listed it (a mount is live beside fsck).
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return out
        }
        Err(e) => {
            out.push(problem(classify(&e), e.to_string()));
            return out;
        }
    };
    // A directory record only under its own name, and nothing else there.
    let is_record = is_dir_record(path);
    if is_record != (file.attrs().kind == ObjectKind::Dir) {
        out.push(problem(
            "misplaced-object",
            format!(
                "holds a {:?} object where {} belongs",
                file.attrs().kind,
                if is_record {
                    "a directory record"
                } else {
                    "no directory record"
                }
            ),
        ));
        return out;
    }
    let check = match (unsettled, first_check) {
        (false, Ok(check)) => check,
        _ => verify(&file),
    };
    drop(settled);
    if let Err(e) = check {
        out.push(problem(classify(&e), e.to_string()));
    }
    // Stale envelopes, in any authentic slot.
    let Ok(me) = file.backing_file().metadata() else {
        return out;
    };
    let names_me = |p: &CanonicalPath| {
        p == path
            || volume
                .backing()
                .metadata(p)
                .is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev())
    };
    let stale: Vec<CanonicalPath> = match read_header_only(file.backing_file(), path) {
        Ok(header) => {
            let mut stale: Vec<CanonicalPath> = header
                .authentic(&volume.header_mac_key(&header.preamble.file_id))
                .iter()
                .flat_map(|(_, c)| c.envelopes.iter().map(|e| e.path.clone()))
                .filter(|p| !names_me(p))
                .collect();
            stale.sort();
            stale.dedup();
            stale
        }
        Err(_) => Vec::new(),
    };
    // A rename, link or unlink under way on a mount of the store gives or takes names: those
    // are not stale (looked at again, under the header lock, before a repair).
    let under_way = |journal: &Option<Journal>| {
        journal
            .as_ref()
            .map(|j| j.live_paths(None))
            .unwrap_or_default()
    };
    let journal = Journal::new(volume, true).ok();
    let stale: Vec<CanonicalPath> = if stale.is_empty() {
        stale
    } else {
        let live = under_way(&journal);
        stale
            .into_iter()
            .filter(|p| !under_way_at(p, &live))
            .collect()
    };
    if stale.is_empty() {
        return out;
    }
    let list: Vec<&str> = stale.iter().map(|p| p.as_str()).collect();
    let mut p = problem(
        "stale-envelope",
        format!(
            "holds envelopes for names it no longer has: {}",
            list.join(", ")
        ),
    );
    if repair {
        // The file was opened writable for this: drop the stale names from both slots.
        let fixed = file.update_envelopes(true, |slots| {
            let live = under_way(&journal);
            let keep: Vec<_> = slots[0]
                .iter()
                .filter(|e| names_me(&e.path) || under_way_at(&e.path, &live))
                .cloned()
                .collect();
            Ok((!keep.is_empty()).then_some(keep))
        });
        match fixed {
            Ok(_) => p.repaired = true,
            Err(e) => p.detail.push_str(&format!(" (repair failed: {e})")),
        }
    }
    out.push(p);
    out
}

/// Checks the whole volume.
pub fn check(volume: &Volume, deep: bool, repair: bool) -> Result<Report> {
    let files = volume.files_beneath(&CanonicalPath::root())?;
    let records = files.iter().filter(|p| is_dir_record(p)).count();
    let mut report = Report {
        files: files.len() - records,
        ..Default::default()
    };
    for path in &files {
        report
            .problems
            .extend(check_file(volume, path, deep, repair));
    }
    let journal = Journal::new(volume, !repair)?;
    for record in journal.pending() {
        // A rename under way on a mount of the store: not a problem.
        if record.live {
            continue;
        }
        let mut p = match &record.paths {
            Ok(paths) => Problem {
                path: record.name.clone(),
                kind: "interrupted-rebind",
                detail: format!(
                    "a rename, link or unlink was cut short ({}); the next writable mount tidies it",
                    paths.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                ),
                repaired: false,
            },
            // Never removed, with --repair too: it is not ours to delete.
            Err(e) => Problem {
                path: record.name.clone(),
                kind: "unusable-rebind-record",
                detail: e.to_string(),
                repaired: false,
            },
        };
        if repair && record.paths.is_ok() {
            // Every file was just checked (and tidied) above.
            journal.remove(&record);
            p.repaired = true;
        }
        report.problems.push(p);
    }
    store_walk(volume, repair, &mut report)?;
    // Reported by the names the user knows, where they decrypt: the path, and the paths the
    // detail names (where a file is bound, its stale names, a record's paths).
    if volume.encrypted_names() {
        let mut names = super::names::NameCache::default();
        for p in &mut report.problems {
            if let Ok(stored) = CanonicalPath::from_encoded(&p.path) {
                p.path = user_path(volume, &mut names, &stored);
            }
            p.detail = user_text(volume, &mut names, &p.detail);
        }
    }
    Ok(report)
}

/// The stored path `stored` as a report names it: the user's path where every component
/// decrypts, else the stored path marked "(as stored)". With plaintext names, as it is.
pub fn user_path(
    volume: &Volume,
    names: &mut super::names::NameCache,
    stored: &CanonicalPath,
) -> String {
    match plain_path(volume, names, stored) {
        Some(plain) => plain.to_string(),
        None => format!("{stored} (as stored)"),
    }
}

/// `text` (an error's message, say) with each stored path in it replaced by the user's path,
/// where it decrypts. With plaintext names, as it is.
pub fn user_text(volume: &Volume, names: &mut super::names::NameCache, text: &str) -> String {
    if !volume.encrypted_names() {
        return text.to_string();
    }
    plain_paths_in(text, |s| plain_path(volume, names, s))
}

/// The user's path of the stored path `stored`, if every component decrypts in its directory
/// (kmsfs's own names, a directory's record among them, are kept as they are: no directory id
/// is read for them, so a directory whose record is itself the problem is named too).
fn plain_path(
    volume: &Volume,
    names: &mut super::names::NameCache,
    stored: &CanonicalPath,
) -> Option<CanonicalPath> {
    use super::names::Listed;
    if !volume.encrypted_names() {
        return Some(stored.clone());
    }
    let (mut dir, mut plain) = (CanonicalPath::root(), CanonicalPath::root());
    for name in stored.to_relative_path().iter() {
        let name = name.as_encoded_bytes();
        let shown = if volume.is_own_name(name, dir.is_root()) {
            name.to_vec()
        } else {
            let id = names.dir_id(volume, &dir).ok()?;
            match volume.listed_name(&dir, Some(&id), name).ok()? {
                Listed::Name(n) => n,
                Listed::Own => name.to_vec(),
                Listed::Foreign(_) => return None,
            }
        };
        plain = plain.join(&shown).ok()?;
        dir = dir.join(name).ok()?;
    }
    Some(plain)
}

/// `text` with each stored path in it (a `/` starting a word, up to the first character no
/// stored path has) replaced by `plain` of it, where that gives one.
fn plain_paths_in(
    text: &str,
    mut plain: impl FnMut(&CanonicalPath) -> Option<CanonicalPath>,
) -> String {
    let in_path = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('/') {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "(,:;[".contains(c));
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let len = rest.find(|c| !in_path(c)).unwrap_or(rest.len());
        // A sentence's full stop is not part of a path (no stored name ends in '.').
        let len = rest[..len].trim_end_matches('.').len().max(1);
        let (word, after) = rest.split_at(len);
        match CanonicalPath::from_encoded(word)
            .ok()
            .filter(|_| starts_word)
        {
            Some(stored) => match plain(&stored) {
                Some(p) => out.push_str(p.as_str()),
                None => out.push_str(word),
            },
            None => out.push_str(word),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// With encrypted names: an entry whose name kmsfs did not write in this directory (planted,
/// moved there on the store, or a long name whose side record is lost), or a side record
/// whose entry is gone (left by a crash; removed with `--repair`).
fn check_name(
    volume: &Volume,
    dir: &CanonicalPath,
    id: &[u8; 16],
    child: &CanonicalPath,
    name: &std::ffi::OsStr,
    names: &std::collections::HashSet<std::ffi::OsString>,
    repair: bool,
) -> Option<Problem> {
    use crate::format::names::{classify, EntryName, SIDE_SUFFIX};
    let bytes = name.as_encoded_bytes();
    if classify(bytes) == EntryName::SideRecord {
        let entry = &bytes[..bytes.len() - SIDE_SUFFIX.len()];
        if names.contains(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(entry)) {
            return None;
        }
        // A side record is written before its entry: a young one may be a create under way
        // (a mount's or an import's, beside this fsck), whose name removing it would lose.
        let old = volume
            .backing()
            .metadata(child)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= ORPHAN_AGE);
        let repaired = repair && old && volume.backing().unlink(child, None).is_ok();
        let note = if old {
            "left by a crash; safe to delete"
        } else {
            "younger than an hour: may be a create under way, so --repair leaves it"
        };
        return Some(Problem {
            path: dir.to_string(),
            kind: "orphan-side-record",
            detail: format!(
                "{}: a long name's side record whose entry is gone ({note})",
                name.to_string_lossy()
            ),
            repaired,
        });
    }
    if name == DIR_RECORD || bytes.starts_with(TEMP_PREFIX.as_bytes()) {
        return None;
    }
    match volume.listed_name(dir, Some(id), bytes) {
        Ok(super::names::Listed::Foreign(why)) => Some(Problem {
            path: dir.to_string(),
            kind: "foreign-name",
            detail: format!(
                "{}: an entry whose name kmsfs did not write in this directory ({why}: made \
                 on the store, or moved there from another directory); the mount does not show \
                 it",
                name.to_string_lossy()
            ),
            repaired: false,
        }),
        _ => None,
    }
}

/// How old a side record without its entry must be for `--repair` to remove it.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// What the backing store holds besides objects: leftovers of interrupted imports (never
/// removed by fsck: they may be an import running now), directories without their record, and
/// entries kmsfs never makes (symlinks, fifos, device nodes, sockets: the mount never shows
/// them). None is removed: they are evidence, and the operator's to judge.
fn store_walk(volume: &Volume, repair: bool, report: &mut Report) -> Result<()> {
    let store = volume.backing();
    let mut stack = vec![CanonicalPath::root()];
    while let Some(dir) = stack.pop() {
        let entries = store
            .list_dir(&dir, crate::backing::Atime::Keep)
            .map_err(|e| Error::io(format!("cannot read {dir}"), e))?;
        if !entries.iter().any(|e| e.name == DIR_RECORD) {
            report.problems.push(Problem {
                path: dir.to_string(),
                kind: "missing-dir-record",
                detail: "a directory without its record (made on the store, not through \
                         kmsfs, or its record deleted); the mount does not show it"
                    .into(),
                repaired: false,
            });
        }
        let dir_id = if volume.encrypted_names() {
            volume.dir_id(&dir).ok()
        } else {
            None
        };
        let names: std::collections::HashSet<std::ffi::OsString> =
            entries.iter().map(|e| e.name.clone()).collect();
        for entry in entries {
            let name = entry.name;
            if dir.is_root() && name == super::volume::META_DIR {
                continue;
            }
            let Ok(child) = dir.join(name.as_encoded_bytes()) else {
                continue;
            };
            if let Some(id) = &dir_id {
                if let Some(p) = check_name(volume, &dir, id, &child, &name, &names, repair) {
                    report.problems.push(p);
                    continue;
                }
            }
            if name.as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                report.problems.push(Problem {
                    path: child.to_string(),
                    kind: "temporary-file",
                    detail: "left by an interrupted import; safe to delete when no import runs"
                        .into(),
                    repaired: false,
                });
                continue;
            }
            let kind = match entry.kind {
                libc::DT_UNKNOWN => match store.metadata(&child) {
                    Ok(m) if m.is_dir() => libc::DT_DIR,
                    Ok(m) if m.is_file() => libc::DT_REG,
                    _ => libc::DT_UNKNOWN,
                },
                k => k,
            };
            match kind {
                libc::DT_DIR => stack.push(child),
                libc::DT_REG => {}
                _ => report.problems.push(Problem {
                    path: child.to_string(),
                    kind: "not-kmsfs",
                    detail: "an entry kmsfs never makes (a symlink, fifo, socket or device \
                             node planted on the backing store); the mount does not show it"
                        .into(),
                    repaired: false,
                }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_paths_in_a_detail_are_replaced_where_they_decrypt() {
        let plain = |p: &CanonicalPath| match p.as_str() {
            "/AAAA" => CanonicalPath::from_encoded("/a").ok(),
            "/AAAA/.kmsfs-dir" => CanonicalPath::from_encoded("/a/.kmsfs-dir").ok(),
            _ => None,
        };
        assert_eq!(
            plain_paths_in(
                "/AAAA: bound to /AAAA/.kmsfs-dir, /BBBB (moved?); names: /AAAA.",
                plain
            ),
            "/a: bound to /a/.kmsfs-dir, /BBBB (moved?); names: /a."
        );
        // Only a word that starts with '/', and only a whole path.
        assert_eq!(
            plain_paths_in("key/AAAA x/AAAA /AAAAB /", plain),
            "key/AAAA x/AAAA /AAAAB /"
        );
    }
}
