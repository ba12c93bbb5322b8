//! Rewrap: moving every file's envelopes from the old keys to a new one, with no data key
//! ever leaving the key service and no body rewritten.
//!
//! The new key joins the volume's trusted set first (the volume key wrapped under it, the
//! config rewritten), so files stay readable throughout: each file is under the old key, the
//! new one, or (between its two slot writes) both. Each file is one locked header update
//! ([`super::file::update_envelopes`], the lock the mount daemon also takes): every envelope
//! under an old key is replaced by a `ReEncrypt` of it to the new key under the same path's
//! context, and the new set is written over both slots, so no slot keeps an envelope under a
//! key about to be retired. A file with nothing under an old key is skipped, which makes a
//! second run after an interruption do only what is left. Retiring the old keys is a separate
//! step that first checks every file, both slots, for envelopes under them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::Envelope;

use super::file::{read_header_only, update_envelopes};
use super::volume::Volume;

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOutcome {
    /// Envelopes moved to the new key (or, in a dry run, would move).
    Rewrapped { envelopes: usize },
    /// Nothing under an old key in either slot.
    AlreadyDone,
}

/// Totals of one run.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    pub rewrapped: usize,
    pub envelopes: usize,
    pub already_done: usize,
    pub failures: Vec<(CanonicalPath, String)>,
}

/// Whether a set holds envelopes under any of `old`.
fn under(envelopes: &[Envelope], old: &[String]) -> bool {
    envelopes.iter().any(|e| old.contains(&e.key.key_id))
}

/// Moves one file's envelopes under `old` keys to `to`. In a dry run, only counts them.
pub fn rewrap_file(
    volume: &Volume,
    path: &CanonicalPath,
    old: &[String],
    to: &str,
    dry_run: bool,
) -> Result<FileOutcome> {
    let file = crate::core::file::open_backing(volume, path, !dry_run)?;
    if dry_run {
        let header = read_header_only(&file, path)?;
        let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
        let Some((_, newest)) = authentic.first() else {
            return Err(Error::format(
                path,
                crate::format::FormatError::HeaderAuthFailed("no slot with a valid MAC".into()),
            ));
        };
        if !authentic.iter().any(|(_, c)| under(&c.envelopes, old)) {
            return Ok(FileOutcome::AlreadyDone);
        }
        let envelopes = newest
            .envelopes
            .iter()
            .filter(|e| old.contains(&e.key.key_id))
            .count();
        return Ok(FileOutcome::Rewrapped { envelopes });
    }
    let mut moved = None;
    update_envelopes(volume, &file, path, true, |slots| {
        // Every slot counts: an older one may still hold old-key envelopes after a run
        // was cut between the two slot writes.
        if !slots.iter().any(|set| under(set, old)) {
            return Ok(None);
        }
        let current = slots[0];
        let mut count = 0;
        let mut out: Vec<Envelope> = current
            .iter()
            .filter(|e| !old.contains(&e.key.key_id))
            .cloned()
            .collect();
        for e in current.iter().filter(|e| old.contains(&e.key.key_id)) {
            if out.iter().any(|o| o.path == e.path && o.key.key_id == to) {
                continue; // already has its envelope under the new key
            }
            let ctx = volume.file_context(&e.path);
            let key = volume
                .keyring()
                .rewrap(&e.key, &ctx, to, &ctx)
                .map_err(|err| Error::key(path, err))?;
            count += 1;
            out.push(Envelope {
                path: e.path.clone(),
                key,
            });
        }
        moved = Some(count);
        Ok(Some(out))
    })?;
    Ok(match moved {
        Some(envelopes) => FileOutcome::Rewrapped { envelopes },
        None => FileOutcome::AlreadyDone,
    })
}

/// Rewraps `files` on `jobs` threads (the keyring bounds concurrent key calls on top),
/// calling `progress` after each file with the number done.
pub fn rewrap_files(
    volume: &Volume,
    files: &[CanonicalPath],
    old: &[String],
    to: &str,
    jobs: usize,
    dry_run: bool,
    progress: &(dyn Fn(usize) + Sync),
) -> Summary {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let (rewrapped, envelopes, already) =
        (AtomicUsize::new(0), AtomicU64::new(0), AtomicUsize::new(0));
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, files.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = files.get(i) else { return };
                // A rename through a live mount that lands between the open and the header
                // lock leaves the file opened bound to its new name only: look again (the
                // path now names nothing, or the file renamed to it). One moved on the store
                // stays moved, and is reported.
                let mut outcome = rewrap_file(volume, path, old, to, dry_run);
                for _ in 0..2 {
                    if !matches!(outcome, Err(Error::Moved { .. })) {
                        break;
                    }
                    outcome = rewrap_file(volume, path, old, to, dry_run);
                }
                match outcome {
                    Ok(FileOutcome::Rewrapped { envelopes: n }) => {
                        rewrapped.fetch_add(1, Ordering::Relaxed);
                        envelopes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(FileOutcome::AlreadyDone) => {
                        already.fetch_add(1, Ordering::Relaxed);
                    }
                    // Gone since the listing (deleted through the mount): nothing to do.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        already.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push((path.clone(), e.to_string())),
                }
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    Summary {
        files: files.len(),
        rewrapped: rewrapped.into_inner(),
        envelopes: envelopes.into_inner() as usize,
        already_done: already.into_inner(),
        failures,
    }
}

/// Files that still hold an envelope under any of `old` keys in an authentic slot (the check
/// before retiring them), with files that cannot be checked.
pub fn still_under(
    volume: &Volume,
    files: &[CanonicalPath],
    old: &[String],
) -> Vec<(CanonicalPath, String)> {
    let mut out = Vec::new();
    for path in files {
        let check = crate::core::file::open_backing(volume, path, false)
            .and_then(|f| read_header_only(&f, path))
            .map(|header| {
                header
                    .authentic(&volume.header_mac_key(&header.preamble.file_id))
                    .iter()
                    .any(|(_, c)| under(&c.envelopes, old))
            });
        match check {
            Ok(false) => {}
            Ok(true) => out.push((path.clone(), "still has envelopes under an old key".into())),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out.push((path.clone(), e.to_string())),
        }
    }
    out
}
