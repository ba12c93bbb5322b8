//! Renewal: truncating a file to zero gives it a new file id, data key and commitment.
//!
//! Blocks are bound to their file by the file id and content key, not to a version of the
//! file, so while a file keeps its key every block it ever had authenticates again at the
//! same index (docs/SECURITY.md, "Rolling back blocks"). Truncation to zero (`O_TRUNC`,
//! `truncate(0)`, which is also how a whole file is usually rewritten) ends that: the file
//! gets a new identity and no block from before authenticates in it. It costs one
//! `GenerateDataKey` under the file's path (plus one `Encrypt` per further trusted key, and one
//! `ReEncrypt` per further name and key for a hard-linked file) and five syncs.
//!
//! The backing inode stays (inode numbers are the backing ones, and hard links share it), so
//! the new header is written in place, which no single write can do: the preamble (file id,
//! commitment) and the final block are far apart. So, under the file's data and header locks:
//!
//! 1. the new file's bytes `N` (preamble, slots, sealed empty final block) are written to a
//!    renewal record `.kmsfs/renew/<ino>-…` (MACed under the volume's record key, written to a
//!    temporary name, fsynced, renamed, directory fsynced);
//! 2. the marker, `N`'s preamble with the magic `KMFW`, is written at offset 0, then
//!    fdatasync (the file reads as damaged until step 4);
//! 3. `N` without its preamble is written at offset 64 and the file cut to `N`'s length, then
//!    fdatasync;
//! 4. `N`'s preamble is written (64 bytes, one sector), then fdatasync;
//! 5. the record is removed (not synced: a record that comes back is harmless, below).
//!
//! A crash before 1 completes leaves the file as it was. After it, the next writable mount
//! finds the record and decides under the file's locks: a file whose preamble is the record's
//! marker stopped in steps 2-4 and is given `N` again (steps 3 and 4), so it reads as empty;
//! any other preamble is `N`'s (done) or the old one (nothing changed: step 3 starts only once
//! the marker is durable, so no torn write of it can leave the old preamble over a changed
//! body), and that file, with whatever was written to it since, is left alone. So after a
//! crash the file reads as its old content or as empty, never as damaged, once a writable
//! mount has started; until then (offline commands, a read-only mount) a file cut short in
//! steps 2-4 reads as damaged.
//!
//! **Growing a header** ([`grow`]) is the other rewrite in place. A file's slots are sized
//! when it is created, for its first name and some room; a rename to a longer path, a further
//! hard link or another trusted key can need more. The slots sit between the preamble and the
//! blocks, so larger slots move every block; a block's associated data (file id, index, last
//! flag) does not depend on where it is, so blocks move verbatim and the file keeps its id,
//! key and commitment: only the preamble's slot size and the slots (resealed, their MAC covers
//! the preamble) change. The same steps and the same recovery, with `N` the whole grown file
//! and a record of its own kind (`kmsfs-grow-1`), whose removal is synced (the file's blocks
//! change afterwards). A move that fails part way (a full disk: the file grows by the slots'
//! growth) puts the file back as it was. A growth moves the whole file through memory, one at
//! a time per process: files larger than [`MAX_GROW`] are not grown (the change that needed
//! room fails). Instances of the file elsewhere look at its layout again: other mounts under
//! the data lock, which the growth holds; this process's, which a mount running alone does
//! not lock, when [`growths`] has moved, and a growth waits for the [`staying`] guards of the
//! reads and writes under way.
//!
//! Seal counting: each open instance counts the blocks it seals under its key
//! ([`SEAL_LIMIT`]), see `super::instance`.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use crate::backing::{Atime, DataLock, MetaDir};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::Envelope;
use crate::format::header::{seal_slot, Preamble, MAX_SLOT_SIZE, PREAMBLE_LEN, SLOT_ALIGN};
use crate::format::{kdf, FormatError};

use super::file::{read_header_only, EncryptedFile};
use super::journal::{under_way_at, Journal};
use super::volume::{Volume, META_DIR};

/// Most blocks an open instance seals under one content key before it refuses to write:
/// far below the 2^32 that AES-GCM with random 96-bit nonces allows per key (NIST SP 800-38D).
pub const SEAL_LIMIT: u64 = 1 << 30;

/// Largest file (backing bytes) whose header [`grow`] moves: the move goes through memory and
/// a record holding the whole file.
pub const MAX_GROW: u64 = 32 << 20;

const DIR_NAME: &str = "renew";
const MAGIC: &[u8] = b"kmsfs-renew-1\0";
const GROW_MAGIC: &[u8] = b"kmsfs-grow-1\0";
const MARKER_MAGIC: &[u8; 4] = b"KMFW";
const TAG_LEN: usize = 32;
/// Most bytes a record may have: a path, two numbers and a file of at most [`MAX_GROW`]
/// bytes with a header of two slots of at most 1 MiB each.
const MAX_RECORD: u64 = MAX_GROW + (3 << 20);
/// One growth at a time in this process: each holds a copy of its file in memory.
static GROWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Growths finished in this process: an instance that last looked at its file before the
/// count moved looks again before it writes ([`EncryptedFile`]'s `write`).
static GROWTHS: AtomicU64 = AtomicU64::new(0);
const STRIPES: usize = 64;
/// Held shared by this process's writes and re-reads of a file, exclusively by a growth of
/// it (by inode, striped): a mount that runs alone takes no data lock, and an instance opened
/// while a rename grew the file it had not opened must not write where the blocks were.
static MOVING: [RwLock<()>; STRIPES] = [const { RwLock::new(()) }; STRIPES];

/// Keeps any growth of file `ino` in this process from starting until dropped (see
/// [`MOVING`]); taken after the file's data lock.
pub fn staying(ino: u64) -> RwLockReadGuard<'static, ()> {
    MOVING[(ino % STRIPES as u64) as usize]
        .read()
        .unwrap_or_else(|e| e.into_inner())
}

/// The count of growths finished in this process so far.
pub fn growths() -> u64 {
    GROWTHS.load(Ordering::Acquire)
}

/// Counts a growth as finished when dropped (it may have moved blocks even if it failed).
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        GROWTHS.fetch_add(1, Ordering::AcqRel);
    }
}
/// How old a record's temporary file must be to be taken for what a crash left (younger, it
/// may be another mount's, being written).
const LEFT_BEHIND: std::time::Duration = std::time::Duration::from_secs(600);

/// How far a renewal goes: all the way, or (tests) up to a simulated crash after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The record is durable; the file is untouched.
    Recorded,
    /// The file's preamble is the marker (the file is being rewritten); nothing else changed.
    Marked,
    /// The body of the new header and its final block are on disk, the old preamble too.
    Body,
    /// The new preamble is on disk; the record is still there.
    Preamble,
    /// Done, record removed.
    Done,
}

/// `set_len` that renews the file when it is cut to zero.
pub fn set_len(volume: &Volume, file: &mut EncryptedFile, size: u64) -> Result<()> {
    if size == 0 {
        renew(volume, file, Step::Done)
    } else {
        file.set_len(size)
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn record_dir(volume: &Volume, create: bool) -> std::io::Result<MetaDir> {
    volume
        .backing()
        .meta_dir(META_DIR, create)?
        .subdir(DIR_NAME, create)
}

/// Renews `file` (open, writable) as an empty file with a new file id and data key, bound to
/// every path its current envelopes name; stops after `until` (tests simulate a crash so).
pub fn renew(volume: &Volume, file: &mut EncryptedFile, until: Step) -> Result<()> {
    let mut path = file.path().clone();
    let backing = file
        .backing_file()
        .try_clone()
        .map_err(io(format!("cannot reopen {path}")))?;
    // Other mounts' writes wait (data lock first, then the header's: the order every
    // holder of both takes), and this one starts from the length they left.
    let data = file.data_lock()?;
    let _data = data.take(true).map_err(io(format!("cannot lock {path}")))?;
    file.refresh_or_wait(true)?;
    let _lock = volume
        .backing()
        .lock_header(&backing)
        .map_err(io(format!("cannot lock the header of {path}")))?;
    // The envelopes on disk now (a rewrap beside the mount may have changed them), of this
    // file: the header there must be the one this instance opened (same file id) and bind this
    // path, and only names that still link to this inode are carried over. Anything else (a
    // header put in place on the store) is refused: a renewal would bind a new key, and what
    // is written next, to the names another header gave.
    let header = read_header_only(&backing, &path)?;
    if header.preamble.file_id != file.preamble().file_id {
        return Err(Error::Integrity(format!(
            "{path}: the header on the backing store is not the one this file was opened with; not renewed"
        )));
    }
    let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
    let me = backing
        .metadata()
        .map_err(io(format!("cannot stat {path}")))?;
    let links_here = |p: &CanonicalPath| {
        volume
            .backing()
            .metadata(p)
            .is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
    };
    let current: Vec<Envelope> = match authentic.first() {
        Some((_, c)) if c.envelopes.iter().any(|e| e.path == path) => c.envelopes.clone(),
        // Another mount of the store renamed it since this instance looked: this file's own
        // header (same file id, its MAC) says where, and the store that it is there.
        Some((_, c)) => match c.envelopes.iter().find(|e| links_here(&e.path)) {
            Some(e) => {
                path = e.path.clone();
                file.set_path(path.clone());
                c.envelopes.clone()
            }
            // No name links to it any more (unlinked, or replaced by a rename): renewed
            // under the names its header gives, for the handles that still hold it.
            None => match c.envelopes.first() {
                Some(e) => {
                    path = e.path.clone();
                    file.set_path(path.clone());
                    c.envelopes.clone()
                }
                None => {
                    return Err(Error::Integrity(format!(
                        "{path}: no authentic header slot binds it; not renewed"
                    )))
                }
            },
        },
        None => {
            return Err(Error::Integrity(format!(
                "{path}: no authentic header slot binds it; not renewed"
            )))
        }
    };
    // And names a rename, link or unlink under way (on this mount or another) is giving the
    // file or taking away: that rebind finishes with what it expects, and its own last step
    // drops what is stale.
    let mut paths = vec![path.clone()];
    let mut under_way = None;
    for e in &current {
        let keep = links_here(&e.path) || {
            let live = under_way.get_or_insert_with(|| {
                Journal::new(volume, true)
                    .map(|j| j.live_paths(None))
                    .unwrap_or_default()
            });
            under_way_at(&e.path, live)
        };
        if keep && !paths.contains(&e.path) {
            paths.push(e.path.clone());
        }
    }
    let ctx = volume.file_context(&path);
    let (dek, wrapped) = volume
        .keyring()
        .generate(&ctx)
        .map_err(|e| Error::key(&path, e))?;
    let mut envelopes: Vec<Envelope> = wrapped
        .iter()
        .map(|key| Envelope {
            path: path.clone(),
            key: key.clone(),
        })
        .collect();
    // Each further name gets the new key too (hard links): a ReEncrypt per name and key.
    for other in &paths[1..] {
        let to = volume.file_context(other);
        for w in &wrapped {
            let key = volume
                .keyring()
                .rewrap(w, &ctx, &w.key_id, &to)
                .map_err(|e| Error::key(&path, e))?;
            envelopes.push(Envelope {
                path: other.clone(),
                key,
            });
        }
    }
    let renewal = file.renewal(volume, &dek, envelopes)?;
    drop(dek);
    let meta = backing
        .metadata()
        .map_err(io(format!("cannot stat {path}")))?;
    let dir = record_dir(volume, true).map_err(io(format!(
        "cannot open the renewal records of the volume for {path}"
    )))?;
    let name = format!(
        "{:016x}-{}",
        meta.ino(),
        crate::format::codec::hex(&renewal.file_id())
    );
    let record = encode(
        volume,
        MAGIC,
        &path,
        meta.dev(),
        meta.ino(),
        &[&renewal.bytes],
    );
    dir.write_atomic(&name, &record)
        .map_err(io(format!("cannot write the renewal record of {path}")))?;
    if until == Step::Recorded {
        return Ok(());
    }
    apply(&backing, &renewal.bytes, until).map_err(io(format!("cannot renew {path}")))?;
    if until < Step::Done {
        return Ok(());
    }
    if let Err(e) = dir.unlink(&name) {
        tracing::warn!("cannot remove the renewal record {name}: {e}");
    }
    file.adopt_renewal(renewal);
    tracing::debug!(path = %path, "renewed: new file id and data key");
    Ok(())
}

/// The preamble a file has while it is rewritten in place: `N`'s, with the magic `KMFW`.
/// No reader takes it for a header, and recovery tells from it that the rest of the file may
/// be half written (see [`finish_one`]).
fn marker(bytes: &[u8]) -> [u8; PREAMBLE_LEN] {
    let mut marker: [u8; PREAMBLE_LEN] = bytes[..PREAMBLE_LEN].try_into().expect("64 bytes");
    marker[..4].copy_from_slice(MARKER_MAGIC);
    marker
}

/// Steps 2 to 4: the marker preamble; `N` from offset 64 on and its length; `N`'s preamble;
/// each made durable before the next. Until the marker is on disk nothing else changed, so a
/// file with its old preamble after a crash is untouched, however the later writes tore.
fn apply(file: &File, bytes: &[u8], until: Step) -> std::io::Result<()> {
    file.write_all_at(&marker(bytes), 0)?;
    file.sync_data()?;
    if until == Step::Marked {
        return Ok(());
    }
    file.write_all_at(&bytes[PREAMBLE_LEN..], PREAMBLE_LEN as u64)?;
    file.set_len(bytes.len() as u64)?;
    file.sync_data()?;
    if until == Step::Body {
        return Ok(());
    }
    file.write_all_at(&bytes[..PREAMBLE_LEN], 0)?;
    file.sync_data()
}

fn encode(
    volume: &Volume,
    magic: &[u8],
    path: &CanonicalPath,
    dev: u64,
    ino: u64,
    parts: &[&[u8]],
) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&dev.to_be_bytes());
    out.extend_from_slice(&ino.to_be_bytes());
    out.extend_from_slice(&(path.as_str().len() as u32).to_be_bytes());
    out.extend_from_slice(path.as_str().as_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    let tag = kdf::hmac(&volume.rebind_record_mac_key(), &[&out]);
    out.extend_from_slice(&tag);
    out
}

struct Record {
    /// (The record's device number is not read: a network filesystem gives each client
    /// mount its own.)
    ino: u64,
    path: CanonicalPath,
    /// A growth's record (else a renewal's).
    growth: bool,
    bytes: Vec<u8>,
}

fn decode(volume: &Volume, record: &[u8]) -> Option<Record> {
    let split = record.len().checked_sub(TAG_LEN)?;
    let (body, tag) = record.split_at(split);
    if !kdf::hmac_verify(
        &volume.rebind_record_mac_key(),
        &[body],
        tag.try_into().ok()?,
    ) {
        return None;
    }
    let (growth, rest) = match body.strip_prefix(MAGIC) {
        Some(rest) => (false, rest),
        None => (true, body.strip_prefix(GROW_MAGIC)?),
    };
    let num = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8"));
    let ino = num(rest.get(8..16)?);
    let len = u32::from_be_bytes(rest.get(16..20)?.try_into().ok()?) as usize;
    let path = std::str::from_utf8(rest.get(20..20 + len)?).ok()?;
    let path = CanonicalPath::from_encoded(path).ok()?;
    let bytes = rest.get(20 + len..)?.to_vec();
    (bytes.len() > PREAMBLE_LEN).then_some(Record {
        ino,
        path,
        growth,
        bytes,
    })
}

/// The slot size a header that needs `need` grows to: half as large again as it was, at
/// least (so a file gaining names one by one is not moved each time), rounded to whole
/// sectors.
fn grown_size(old: u32, need: u32) -> u32 {
    let step = (old + old / 2).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
    need.max(step).min(MAX_SLOT_SIZE)
}

/// Grows the header slots of the file open as `file` at `path` to hold at least `need` bytes
/// each, moving its blocks (see the module comment); stops after `until` (tests simulate a
/// crash so). With `file_id`, only the file with that id is grown (another mount may have
/// renewed it meanwhile: `ESTALE`). Returns the preamble the file has now: one already large
/// enough (another mount grew it) is left as it is. Takes the file's data and header locks:
/// the caller holds neither, nor any file's [`staying`] guard.
pub fn grow(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    need: u32,
    file_id: Option<[u8; 16]>,
    until: Step,
) -> Result<Preamble> {
    let _one = GROWING.lock().unwrap_or_else(|e| e.into_inner());
    let data = DataLock::new(volume.backing(), file).map_err(io(format!("cannot lock {path}")))?;
    let _data = data.take(true).map_err(io(format!("cannot lock {path}")))?;
    // (The header lock before the stripe: a renewal holds the header lock across key calls,
    // and the stripe stops this process's writes to 1/64 of all files.)
    let _lock = volume
        .backing()
        .lock_header(file)
        .map_err(io(format!("cannot lock the header of {path}")))?;
    let _moving = MOVING[(data.ino() % STRIPES as u64) as usize]
        .write()
        .unwrap_or_else(|e| e.into_inner());
    let header = read_header_only(file, path)?;
    let old = header.preamble.clone();
    if file_id.is_some_and(|id| id != old.file_id) {
        return Err(crate::error::os(
            format!("{path} was renewed elsewhere while its header was to grow"),
            libc::ESTALE,
        ));
    }
    if old.slot_size >= need {
        return Ok(old);
    }
    let no_room = |why: String| Error::format(path, FormatError::NoRoom { need, why });
    if need > MAX_SLOT_SIZE {
        return Err(no_room(format!(
            "the header would need slots of {need} bytes, past the format's {MAX_SLOT_SIZE}"
        )));
    }
    let mac_key = volume.header_mac_key(&old.file_id);
    let authentic = header.authentic(&mac_key);
    if authentic.is_empty() {
        return Err(Error::format(
            path,
            FormatError::HeaderAuthFailed("no slot with a valid MAC".into()),
        ));
    }
    let meta = file.metadata().map_err(io(format!("cannot stat {path}")))?;
    if meta.len() > MAX_GROW {
        return Err(no_room(format!(
            "its header must grow, which moves the whole file, and at {} bytes it is larger \
             than the {MAX_GROW} bytes kmsfs moves",
            meta.len()
        )));
    }
    let new = Preamble {
        slot_size: grown_size(old.slot_size, need),
        ..old.clone()
    };
    let mut bytes = new.encode().to_vec();
    for slot in 0..2 {
        match authentic.iter().find(|(i, _)| *i == slot) {
            Some((_, content)) => bytes
                .extend(seal_slot(&new, content, &mac_key).map_err(|e| Error::format(path, e))?),
            // Empty, or damaged: empty now (what a reader would pass over anyway).
            None => bytes.resize(bytes.len() + new.slot_size as usize, 0),
        }
    }
    let blocks = meta
        .len()
        .checked_sub(old.data_offset())
        .ok_or_else(|| Error::format(path, FormatError::InvalidLength(meta.len())))?;
    // The file as it is (to put back should the move fail part way), then the grown one.
    let mut before = vec![0u8; meta.len() as usize];
    file.read_exact_at(&mut before, 0)
        .map_err(io(format!("cannot read {path}")))?;
    bytes.extend_from_slice(&before[(meta.len() - blocks) as usize..]);
    let dir = record_dir(volume, true).map_err(io(format!(
        "cannot open the renewal records of the volume for {path}"
    )))?;
    // (Each growth of a file has its own name: slot sizes only grow.)
    let name = format!(
        "{:016x}-{}-grow-{}",
        meta.ino(),
        crate::format::codec::hex(&old.file_id),
        new.slot_size
    );
    let record = encode(volume, GROW_MAGIC, path, meta.dev(), meta.ino(), &[&bytes]);
    dir.write_atomic(&name, &record)
        .map_err(io(format!("cannot write the growth record of {path}")))?;
    if until == Step::Recorded {
        return Ok(new);
    }
    let _counted = Counted;
    if let Err(e) = apply(file, &bytes, until) {
        // (A full disk: the file grows by the slots' growth.) Before `N`'s preamble is in
        // place, put the file back as it was: its body, then its preamble, each synced (the
        // marker stays until the body is back, so a crash meanwhile finishes the growth).
        // After it, the file is grown; the record stays for recovery should a sync have
        // failed.
        let mut head = [0u8; PREAMBLE_LEN];
        let grown = file.read_exact_at(&mut head, 0).is_ok() && head[..] == bytes[..PREAMBLE_LEN];
        let restored = !grown
            && file
                .write_all_at(&before[PREAMBLE_LEN..], PREAMBLE_LEN as u64)
                .and_then(|()| file.set_len(before.len() as u64))
                .and_then(|()| file.sync_data())
                .and_then(|()| file.write_all_at(&before[..PREAMBLE_LEN], 0))
                .and_then(|()| file.sync_data())
                .is_ok();
        if restored {
            let _ = dir.unlink(&name).and_then(|()| dir.sync());
        }
        return Err(Error::io(format!("cannot grow the header of {path}"), e));
    }
    if until < Step::Done {
        return Ok(new);
    }
    if let Err(e) = dir.unlink(&name).and_then(|()| dir.sync()) {
        tracing::warn!("cannot remove the growth record {name}: {e}");
    }
    tracing::debug!(path = %path, from = old.slot_size, to = new.slot_size, "header grown");
    Ok(new)
}

/// At a writable mount: finishes renewals a crash cut short (see the module comment). A record
/// that does not authenticate is logged and left in place; so is one whose file cannot be
/// finished now (an I/O error). Returns how many files were given their new header.
pub fn finish_interrupted(volume: &Volume) -> usize {
    let dir = match record_dir(volume, false) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!("cannot open the renewal records: {e}");
            return 0;
        }
    };
    let mut names: Vec<String> = match dir.list() {
        Ok(names) => names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list the renewal records: {e}");
            return 0;
        }
    };
    names.sort();
    let mut finished = 0;
    for name in names {
        // A record's temporary name: the crash came before the record counted. Or another
        // mount of the store is writing it right now: only an old one is a crash's.
        if name.starts_with('.') {
            if left_behind(&dir, &name) {
                let _ = dir.unlink(&name);
            }
            continue;
        }
        let shown = dir.shown().join(&name).display().to_string();
        let Some(record) = dir
            .read(&name, MAX_RECORD)
            .ok()
            .and_then(|b| decode(volume, &b))
        else {
            tracing::warn!(
                "{shown} is not an authentic renewal record of this volume; left in place \
                 (remove it by hand once you know where it came from)"
            );
            continue;
        };
        // A live renewal on another mount holds the file's locks until it has removed its
        // record: one gone by the time the locks are ours is finished.
        let still_there = || dir.metadata(&name).is_ok();
        match finish_one(volume, &record, still_there) {
            Ok(Finish::Elsewhere) if !left_behind(&dir, &name) => {}
            Ok(outcome) => {
                match (&outcome, record.growth) {
                    (Finish::Finished, true) => {
                        tracing::warn!(path = %record.path, "a header growth was cut short: finished (the file keeps its content)")
                    }
                    (Finish::Finished, false) => {
                        tracing::warn!(path = %record.path, "a renewal was cut short: the file is now empty, as it was being truncated")
                    }
                    (Finish::Elsewhere, _) => {
                        tracing::warn!(path = %record.path, "a renewal or growth record names another file than stands there now; dropped")
                    }
                    _ => {}
                }
                finished += usize::from(outcome == Finish::Finished);
                if let Err(e) = dir.unlink(&name).and_then(|()| dir.sync()) {
                    tracing::warn!("cannot remove the renewal record {shown}: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot yet finish the renewal in {shown}: {e}"),
        }
    }
    finished
}

/// Whether record `name` is old enough to be taken for what a crash left (younger, it may be
/// another mount's, being written or in use).
fn left_behind(dir: &MetaDir, name: &str) -> bool {
    dir.metadata(name)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > LEFT_BEHIND)
}

/// Gives the file `N` if its preamble is the marker (the rewrite stopped part way); a file
/// with `N`'s preamble is done, and one with any other (its old one: the rewrite stopped
/// before it changed anything, and the file may have been written since) is left alone.
/// Decided under the file's locks, once a live rewrite on another mount (which holds them
/// until its record is gone) has finished.
fn finish_one(volume: &Volume, record: &Record, still_there: impl Fn() -> bool) -> Result<Finish> {
    let path = &record.path;
    let file = match volume.backing().open_file(path, true, Atime::Update) {
        Ok(f) => f,
        // Gone, or no longer a file: nothing to finish.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Finish::Dropped),
        Err(e) => return Err(Error::io(format!("cannot open {path}"), e)),
    };
    let meta = file.metadata().map_err(io(format!("cannot stat {path}")))?;
    // (By inode only: a network filesystem gives each client mount its own device number.)
    if meta.ino() != record.ino {
        return Ok(Finish::Elsewhere);
    }
    let data = DataLock::new(volume.backing(), &file).map_err(io(format!("cannot lock {path}")))?;
    let _data = data.take(true).map_err(io(format!("cannot lock {path}")))?;
    let _lock = volume
        .backing()
        .lock_header(&file)
        .map_err(io(format!("cannot lock the header of {path}")))?;
    if !still_there() {
        return Ok(Finish::Dropped);
    }
    let mut head = [0u8; PREAMBLE_LEN];
    let have = file.read_at(&mut head, 0).unwrap_or(0);
    if have == PREAMBLE_LEN && head == marker(&record.bytes) {
        apply(&file, &record.bytes, Step::Done)
            .map_err(io(format!("cannot finish rewriting {path}")))?;
        return Ok(Finish::Finished);
    }
    if have != PREAMBLE_LEN || head[..] != record.bytes[..PREAMBLE_LEN] {
        tracing::warn!(path = %path, "a renewal or header growth was cut short before it changed the file; the file keeps its content");
    }
    Ok(Finish::Dropped)
}

/// What [`finish_one`] did with a record.
#[derive(Debug, PartialEq, Eq)]
enum Finish {
    /// The file now has the record's bytes.
    Finished,
    /// Nothing to do (done, never started, or the file is gone): the record can go.
    Dropped,
    /// Another inode stands at the record's path: the file moved (perhaps while another
    /// mount's rewrite of it is under way); the record stays until it is old.
    Elsewhere,
}

#[cfg(test)]
// The tests make their volume's directory by path, in a temporary directory of their own.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::core::file::open_backing;
    use crate::core::volume::InitOptions;
    use crate::keys::spec::KeySpec;

    struct Setup {
        _dir: tempfile::TempDir,
        volume: Volume,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let volume = Volume::init(
            &store,
            InitOptions {
                keys: vec![KeySpec::Local(dir.path().join("keys/master.key"))],
                block_size: 512,
                ..Default::default()
            },
        )
        .unwrap()
        .volume;
        Setup { _dir: dir, volume }
    }

    fn path(p: &str) -> CanonicalPath {
        CanonicalPath::from_user(std::path::Path::new(p)).unwrap()
    }

    fn write(v: &Volume, p: &str, data: &[u8]) {
        super::super::file::write_new_file(v, &path(p), &mut &data[..]).unwrap();
    }

    fn read(v: &Volume, p: &str) -> Result<Vec<u8>> {
        let f = EncryptedFile::open(v, &path(p), false)?;
        f.verify_all()?;
        f.read_all()
    }

    /// A crash after each step of a renewal, with the new header's write torn too: after
    /// the next mount's recovery the file reads as its old content or as empty, never as
    /// damaged, and a file the renewal finished keeps what was written to it afterwards.
    #[test]
    fn a_renewal_cut_short_at_any_step_reads_as_old_or_empty_after_recovery() {
        let old = vec![7u8; 3000];
        for until in [Step::Recorded, Step::Marked, Step::Body, Step::Preamble] {
            let s = setup();
            write(&s.volume, "f", &old);
            let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
            renew(&s.volume, &mut f, until).unwrap();
            drop(f);
            let before = read(&s.volume, "f");
            match until {
                // Untouched so far.
                Step::Recorded => assert_eq!(before.unwrap(), old),
                // Cut short: damaged until recovery.
                Step::Marked | Step::Body => assert!(before.is_err()),
                Step::Preamble => assert_eq!(before.unwrap(), b""),
                Step::Done => unreachable!(),
            }
            // Stopped before it changed the file: dropped, the file keeps its content.
            let changed = finish_interrupted(&s.volume);
            let cut = matches!(until, Step::Marked | Step::Body);
            assert_eq!(changed, usize::from(cut), "{until:?}");
            let after = read(&s.volume, "f").unwrap();
            if until == Step::Recorded {
                assert_eq!(after, old);
            } else {
                assert!(after.is_empty());
            }
            assert!(no_records(&s.volume));
        }
        // Torn: the new preamble and part of the body on disk, not the rest (no sync order
        // holds within one write on power loss), the record there.
        let s = setup();
        write(&s.volume, "f", &old);
        let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
        renew(&s.volume, &mut f, Step::Recorded).unwrap();
        let dir = record_dir(&s.volume, false).unwrap();
        let name = dir.list().unwrap()[0].clone().into_string().unwrap();
        let record = decode(&s.volume, &dir.read(&name, MAX_RECORD).unwrap()).unwrap();
        f.backing_file()
            .write_all_at(&record.bytes[..PREAMBLE_LEN + 100], 0)
            .unwrap();
        drop(f);
        assert!(read(&s.volume, "f").is_err());
        // The preamble is the new one, so recovery takes the renewal as done: the one state
        // the design rules out (the preamble is written only after the rest is synced).
        assert_eq!(finish_interrupted(&s.volume), 0);
        // With the marker in place and a torn body, recovery writes the new header.
        let s = setup();
        write(&s.volume, "f", &old);
        let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
        renew(&s.volume, &mut f, Step::Recorded).unwrap();
        let dir = record_dir(&s.volume, false).unwrap();
        let name = dir.list().unwrap()[0].clone().into_string().unwrap();
        let record = decode(&s.volume, &dir.read(&name, MAX_RECORD).unwrap()).unwrap();
        f.backing_file()
            .write_all_at(&record.bytes[PREAMBLE_LEN..PREAMBLE_LEN + 300], 64)
            .unwrap();
        f.backing_file()
            .write_all_at(&marker(&record.bytes), 0)
            .unwrap();
        drop(f);
        assert!(read(&s.volume, "f").is_err());
        assert_eq!(finish_interrupted(&s.volume), 1);
        assert_eq!(read(&s.volume, "f").unwrap(), b"");
    }

    fn slot_size(v: &Volume, p: &str) -> u32 {
        let f = open_backing(v, &path(p), false).unwrap();
        read_header_only(&f, &path(p)).unwrap().preamble.slot_size
    }

    fn grow_by_a_sector(v: &Volume, p: &str, until: Step) -> Result<Preamble> {
        let f = open_backing(v, &path(p), true).unwrap();
        let need = read_header_only(&f, &path(p)).unwrap().preamble.slot_size + 512;
        grow(v, &f, &path(p), need, None, until)
    }

    /// A header growth moves every block behind larger slots; cut short after each step,
    /// the file reads as it was once a writable mount has recovered, with its slots either
    /// size, never damaged, and no record is left.
    #[test]
    fn a_header_growth_cut_short_at_any_step_keeps_the_content_after_recovery() {
        let old: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for until in [
            Step::Recorded,
            Step::Marked,
            Step::Body,
            Step::Preamble,
            Step::Done,
        ] {
            let s = setup();
            write(&s.volume, "f", &old);
            let before = slot_size(&s.volume, "f");
            let new = grow_by_a_sector(&s.volume, "f", until).unwrap();
            assert!(new.slot_size >= before + 512);
            let cut = matches!(until, Step::Marked | Step::Body);
            match until {
                Step::Recorded => assert_eq!(read(&s.volume, "f").unwrap(), old),
                // Cut short: damaged until recovery.
                Step::Marked | Step::Body => assert!(read(&s.volume, "f").is_err()),
                Step::Preamble | Step::Done => assert_eq!(read(&s.volume, "f").unwrap(), old),
            }
            let changed = finish_interrupted(&s.volume);
            assert_eq!(changed, usize::from(cut), "{until:?}");
            assert_eq!(read(&s.volume, "f").unwrap(), old, "{until:?}");
            let grown = if until == Step::Recorded {
                before
            } else {
                new.slot_size
            };
            assert_eq!(slot_size(&s.volume, "f"), grown, "{until:?}");
            assert!(no_records(&s.volume));
        }
    }

    /// An instance open while another grew the file (a rename that did not use it, or
    /// another mount: the same file id and key, the blocks moved) writes where the blocks are
    /// now, whether the mount takes data locks (shared) or not (running alone), and reads
    /// them after a failed read.
    #[test]
    fn an_open_instance_follows_a_growth_elsewhere() {
        for alone in [false, true] {
            let s = setup();
            if alone {
                assert!(s.volume.backing().join(true).unwrap(), "runs alone");
            }
            let old = vec![9u8; 2000];
            write(&s.volume, "f", &old);
            let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
            let new = grow_by_a_sector(&s.volume, "f", Step::Done).unwrap();
            f.write_at(2000, b"tail").unwrap();
            assert_eq!(f.preamble().slot_size, new.slot_size, "alone {alone}");
            drop(f);
            let mut want = old.clone();
            want.extend_from_slice(b"tail");
            assert_eq!(read(&s.volume, "f").unwrap(), want, "alone {alone}");
        }
    }

    fn no_records(v: &Volume) -> bool {
        record_dir(v, false).unwrap().list().unwrap().is_empty()
    }

    /// Found by the red team: a renewal or growth that stopped before it changed the file
    /// (an error after its record, or a crash) must not wipe, when the next mount starts,
    /// what a mount of the store wrote to the file afterwards (a growth's record holds the
    /// whole file as it was).
    #[test]
    fn a_record_left_before_the_file_changed_keeps_later_writes() {
        for growth in [false, true] {
            let s = setup();
            write(&s.volume, "f", b"old");
            if growth {
                grow_by_a_sector(&s.volume, "f", Step::Recorded).unwrap();
            } else {
                let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
                renew(&s.volume, &mut f, Step::Recorded).unwrap();
            }
            let mut other = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
            other.write_at(0, b"fsynced after the cut").unwrap();
            other.sync().unwrap();
            drop(other);
            assert_eq!(finish_interrupted(&s.volume), 0, "growth {growth}");
            assert_eq!(read(&s.volume, "f").unwrap(), b"fsynced after the cut");
            assert!(no_records(&s.volume));
        }
    }

    #[test]
    fn a_stale_renewal_record_leaves_later_writes_alone() {
        let s = setup();
        write(&s.volume, "f", b"old");
        let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
        renew(&s.volume, &mut f, Step::Preamble).unwrap();
        drop(f);
        let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
        f.write_at(0, b"written after").unwrap();
        drop(f);
        assert_eq!(finish_interrupted(&s.volume), 0);
        assert_eq!(read(&s.volume, "f").unwrap(), b"written after");
    }

    /// A forged record (not MACed under the volume key) is never acted on.
    #[test]
    fn a_forged_renewal_record_is_not_acted_on() {
        let s = setup();
        write(&s.volume, "f", b"keep me");
        let mut f = EncryptedFile::open(&s.volume, &path("f"), true).unwrap();
        renew(&s.volume, &mut f, Step::Recorded).unwrap();
        drop(f);
        let dir = record_dir(&s.volume, false).unwrap();
        let name = dir.list().unwrap()[0].clone().into_string().unwrap();
        let mut bytes = dir.read(&name, MAX_RECORD).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        dir.unlink(&name).unwrap();
        dir.write_atomic(&name, &bytes).unwrap();
        assert_eq!(finish_interrupted(&s.volume), 0);
        assert_eq!(read(&s.volume, "f").unwrap(), b"keep me");
        assert_eq!(dir.list().unwrap().len(), 1, "left in place");
    }

    /// An open instance refuses writes once its seal count would pass the limit; truncating
    /// the file to zero gives it a new key and a new count.
    #[test]
    fn writes_past_the_seal_limit_are_refused_until_a_renewal() {
        use crate::core::instance::OpenNode;
        let s = setup();
        write(&s.volume, "f", b"data");
        let node = OpenNode::ready(EncryptedFile::open(&s.volume, &path("f"), true).unwrap());
        node.write_at(&s.volume, Some(0), b"fine").unwrap();
        node.set_seals(SEAL_LIMIT - 2);
        let err = node
            .write_at(&s.volume, Some(0), b"one too many")
            .unwrap_err();
        assert!(err.to_string().contains("too many blocks sealed"), "{err}");
        assert_eq!(read(&s.volume, "f").unwrap(), b"fine");
        node.set_len(&s.volume, 0).unwrap();
        assert!(node.seals() < 4);
        node.write_at(&s.volume, Some(0), b"renewed").unwrap();
        assert_eq!(read(&s.volume, "f").unwrap(), b"renewed");
    }
}
