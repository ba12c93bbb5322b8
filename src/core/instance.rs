//! A file's open instance, shared by all its handles, and creates that do not wait for a key.
//!
//! Creating a file needs a `GenerateDataKey` bound to its path; against AWS KMS that is a
//! network round trip (milliseconds), and a program that writes many small files (tar, git
//! checkout, a build) does one create at a time. So while the key service takes longer than a
//! millisecond to answer (a moving average; the local provider never does), a create returns at
//! once with the instance *pending*: the backing file exists (empty), the key request runs on a worker, and what the
//! application writes meanwhile is held in memory, up to [`PENDING_BYTES`] per file (a larger
//! write waits for the key). When the key arrives the worker writes the header and the held
//! data, keeping the timestamps the file had, and the instance is *ready*.
//!
//! Honesty: `fsync` waits for the key and the data (so an fsynced file is durable, as ever),
//! and anything that changes the file's header (rename, link) waits too, each at most 15 s,
//! then fails with EIO; `close` reports a key request that has already failed. While the key
//! service is down the request keeps being retried (for up to 10 minutes, the data held in
//! memory, new creates waiting for their own keys), so an outage delays those files rather
//! than losing them. A request that fails for good (access denied, or the outage outlasting
//! that) is logged and counted (`kmsfs status`), and the file stays as an empty backing file
//! that reads fail on and fsck reports, as would a crash before the key arrived: data never
//! fsynced is what a crash may lose on any filesystem. docs/SEMANTICS.md says this to users.
//!
//! The instance also counts the blocks it seals under the file's content key (an upper bound
//! per write) and refuses writes, with a line saying why and what to do, once that count would
//! pass [`SEAL_LIMIT`] (2^30, far below the AES-GCM random-nonce bound of 2^32 per key).
//! Truncating the file to zero gives it a new key (see [`super::renew`]) and starts the count
//! again. The count lives as long as the instance: docs/FORMAT.md ("Limits") states what that
//! bounds across opens.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::backing::DataLock;
use crate::error::{os, Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::{Envelope, WrappedKey};
use crate::format::header::Attrs;
use crate::secret::DataKey;

use super::file::EncryptedFile;
use super::renew::{self, SEAL_LIMIT};
use super::volume::Volume;

/// Makes `file` the file its backing file holds now, after another mount renewed it
/// (truncated it to zero: a new file id and data key): the header is authenticated afresh at
/// the instance's path and its key unwrapped (one key call), as a local file's handles see a
/// truncation. Taken while no mount changes the file (its data lock, shared). A file renamed
/// too since this instance looked stays `ESTALE`: reopen it.
fn reopen(volume: &Volume, file: &mut EncryptedFile) -> Result<()> {
    let path = file.path().clone();
    let lock = file.data_lock()?;
    let _held = lock
        .take(false)
        .map_err(|e| Error::io(format!("cannot lock {path}"), e))?;
    let backing = file
        .backing_file()
        .try_clone()
        .map_err(|e| Error::io(format!("cannot reopen {path}"), e))?;
    let fresh = EncryptedFile::from_file(volume, &path, backing).map_err(|e| match e {
        Error::Moved { .. } => os(
            format!(
                "{path}: renewed and renamed by another mount since it was opened here; reopen it"
            ),
            libc::ESTALE,
        ),
        e => e,
    })?;
    tracing::debug!(path = %path, "renewed by another mount: reopened");
    *file = fresh;
    Ok(())
}

/// Most bytes a pending file holds in memory before a write waits for its key.
pub const PENDING_BYTES: u64 = 1 << 20;
/// Longest a call (fsync, rename, a large write) waits for a pending file's key before it
/// fails with EIO; the key request goes on, and a later call can succeed.
const WAIT_AT_MOST: Duration = Duration::from_secs(15);
/// How long a pending file's key request keeps retrying while the key service is down (the
/// data waits in memory); only then is it given up, logged and counted.
const KEEP_TRYING_FOR: Duration = Duration::from_secs(600);

enum Instance {
    Ready(EncryptedFile),
    /// Created; the data key is on its way.
    Pending {
        path: CanonicalPath,
        /// What its header will say (and what a stat shows meanwhile).
        attrs: Attrs,
        file: File,
        data: Vec<u8>,
        /// The file's data lock, held until its header is written (see [`DataLock::hold`]).
        lock: Option<Arc<DataLock>>,
    },
    /// The data key never came: every later use fails with this reason.
    Failed {
        path: CanonicalPath,
        reason: String,
    },
}

pub struct OpenNode {
    state: RwLock<Instance>,
    /// Signalled (under `arrival`) when a pending instance becomes ready or failed.
    arrived: Condvar,
    arrival: Mutex<()>,
    /// Blocks sealed under the file's current content key by this instance (an upper bound).
    seals: AtomicU64,
    /// The current key was made by this instance (a create, a renewal) and has sealed nothing
    /// but the empty final block: truncating to zero again needs no new key.
    fresh: AtomicBool,
}

fn failed(path: &CanonicalPath, reason: &str) -> Error {
    os(
        format!("{path}: its data key never arrived ({reason}); what was written is lost"),
        libc::EIO,
    )
}

fn still_pending(path: &CanonicalPath) -> Error {
    os(
        format!(
            "{path}: its data key has not arrived yet (the key service is not answering); \
             what was written is held and will be stored when it does"
        ),
        libc::EIO,
    )
}

impl OpenNode {
    pub fn ready(file: EncryptedFile) -> Self {
        Self::with_state(Instance::Ready(file))
    }

    /// A file just created at `path` (its backing `file` empty) whose key is still to come;
    /// `lock` is its data lock, held (see [`DataLock::hold`]) and released once the header is
    /// written or the key never comes.
    pub fn pending(
        path: CanonicalPath,
        attrs: Attrs,
        file: File,
        lock: Option<Arc<DataLock>>,
    ) -> Self {
        Self::with_state(Instance::Pending {
            path,
            attrs,
            file,
            data: Vec::new(),
            lock,
        })
    }

    fn with_state(state: Instance) -> Self {
        OpenNode {
            state: RwLock::new(state),
            arrived: Condvar::new(),
            arrival: Mutex::new(()),
            seals: AtomicU64::new(0),
            fresh: AtomicBool::new(false),
        }
    }

    /// Counts the blocks a change of `file` covering plaintext `[from, to)` may seal (every
    /// block it touches, and the old final block it reseals), refusing it if the count would
    /// pass [`SEAL_LIMIT`].
    fn count_seals(&self, file: &EncryptedFile, from: u64, to: u64) -> Result<()> {
        // A growth the backing store cannot hold fails as such (ENOSPC, EFBIG), not here.
        file.check_growth(to)?;
        let bs = file.preamble().block_size as u64;
        let first = from.min(file.size()) / bs;
        let last = to.max(1).div_ceil(bs);
        let blocks = last.saturating_sub(first) + 2;
        let before = self.seals.fetch_add(blocks, Ordering::Relaxed);
        self.fresh.store(false, Ordering::Relaxed);
        if before + blocks > SEAL_LIMIT {
            self.seals.fetch_sub(blocks, Ordering::Relaxed);
            let path = file.path();
            tracing::error!(
                path = %path,
                sealed = before,
                "refusing to write: this open has sealed {before} blocks under the file's key, \
                 close to the limit of {SEAL_LIMIT} (the AES-GCM random-nonce bound is 2^32); \
                 copy the file to a new one, or truncate it to zero, to give it a new key"
            );
            return Err(os(
                format!("{path}: too many blocks sealed under one key; copy the file to renew it"),
                libc::EIO,
            ));
        }
        Ok(())
    }

    /// Blocks sealed under the current key by this instance (an upper bound).
    pub fn seals(&self) -> u64 {
        self.seals.load(Ordering::Relaxed)
    }

    /// Sets the seal count (tests: to reach the limit without writing terabytes).
    #[doc(hidden)]
    pub fn set_seals(&self, seals: u64) {
        self.seals.store(seals, Ordering::Relaxed);
    }

    /// Waits (at most [`WAIT_AT_MOST`]) until the instance is no longer pending.
    fn wait_for_key(&self) {
        let until = Instant::now() + WAIT_AT_MOST;
        let mut guard = self.arrival.lock().unwrap();
        while matches!(*self.state.read().unwrap(), Instance::Pending { .. }) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            guard = self.arrived.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Runs `f` on the file once its key is in hand.
    pub fn with<T>(&self, f: impl FnOnce(&EncryptedFile) -> Result<T>) -> Result<T> {
        self.wait_for_key();
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => f(file),
            Instance::Failed { path, reason, .. } => Err(failed(path, reason)),
            Instance::Pending { path, .. } => Err(still_pending(path)),
        }
    }

    /// Runs `f` on the file, writable, once its key is in hand.
    pub fn with_mut<T>(&self, f: impl FnOnce(&mut EncryptedFile) -> Result<T>) -> Result<T> {
        self.wait_for_key();
        match &mut *self.state.write().unwrap() {
            Instance::Ready(file) => f(file),
            Instance::Failed { path, reason, .. } => Err(failed(path, reason)),
            Instance::Pending { path, .. } => Err(still_pending(path)),
        }
    }

    pub fn size(&self) -> u64 {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => file.size(),
            Instance::Pending { data, .. } => data.len() as u64,
            Instance::Failed { .. } => 0,
        }
    }

    /// The plaintext size of the file were its backing file `len` bytes long (a pending
    /// file's is what it holds).
    pub fn size_for(&self, len: u64) -> u64 {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => file.size_for(len),
            Instance::Pending { data, .. } => data.len() as u64,
            Instance::Failed { .. } => 0,
        }
    }

    /// The authenticated attributes this instance holds (whatever name it is at now).
    pub fn attrs(&self) -> Option<Attrs> {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => Some(file.attrs()),
            Instance::Pending { attrs, .. } => Some(*attrs),
            Instance::Failed { .. } => None,
        }
    }

    /// Follows a rename another mount made: true if the header on disk now binds `path` (see
    /// [`EncryptedFile::follow`]).
    pub fn follow(&self, path: &CanonicalPath) -> bool {
        match &mut *self.state.write().unwrap() {
            Instance::Ready(file) => file.follow(path).unwrap_or(false),
            _ => false,
        }
    }

    /// Catches up with what other mounts of the store did to the file since this instance
    /// looked: its length (see [`EncryptedFile::refresh`]) and its header (names, mode,
    /// owner; see [`EncryptedFile::reload_header`]). Close-to-open: every open of a file some
    /// handle here holds does this, and so does anything that changes or reports its header.
    /// False if this instance can no longer be used (the file was renewed or replaced
    /// elsewhere): the caller needs a new one.
    pub fn catch_up(&self) -> bool {
        match &mut *self.state.write().unwrap() {
            Instance::Ready(file) => match file
                .refresh_or_wait(false)
                .and_then(|_| file.reload_header())
            {
                Ok(()) => true,
                Err(e) => e.errno() != libc::ESTALE,
            },
            _ => true,
        }
    }

    /// Before a change of the header through this instance: if another mount renewed the
    /// file since, the instance becomes the file it is now ([`reopen`]).
    pub fn reopen_if_renewed(&self, volume: &Volume) -> Result<()> {
        if let Instance::Ready(file) = &mut *self.state.write().unwrap() {
            match file.refresh_or_wait(false) {
                Err(e) if e.errno() == libc::ESTALE => {
                    reopen(volume, file)?;
                    self.seals.store(0, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Whether the file's key has not arrived yet (its header is not on disk).
    pub fn is_pending(&self) -> bool {
        matches!(&*self.state.read().unwrap(), Instance::Pending { .. })
    }

    pub fn path(&self) -> CanonicalPath {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => file.path().clone(),
            Instance::Pending { path, .. } | Instance::Failed { path, .. } => path.clone(),
        }
    }

    pub fn backing_metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.with_backing_file(|file| file.metadata())
    }

    /// Runs `f` on the open backing file itself (a change through its descriptor, never
    /// through a name that may have been swapped since).
    pub fn with_backing_file<T>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => f(file.backing_file()),
            Instance::Pending { file, .. } => f(file),
            Instance::Failed { .. } => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// The authenticated attributes, if the instance is bound to `path` (a pending file only
    /// to the path it was created at).
    pub fn attrs_for(&self, at: &CanonicalPath) -> Option<Attrs> {
        match &*self.state.read().unwrap() {
            Instance::Ready(file) => file
                .envelopes()
                .iter()
                .any(|e| &e.path == at)
                .then(|| file.attrs()),
            Instance::Pending { path, attrs, .. } => (path == at).then_some(*attrs),
            Instance::Failed { .. } => None,
        }
    }

    /// Changes the attributes (a header slot rewrite; in memory for a pending file, whose
    /// header is written with them). Says whether they changed.
    pub fn update_attrs(&self, change: impl Fn(Attrs) -> Option<Attrs>) -> Result<bool> {
        if let Instance::Pending { attrs, .. } = &mut *self.state.write().unwrap() {
            return Ok(match change(*attrs) {
                Some(new) => {
                    *attrs = new;
                    true
                }
                None => false,
            });
        }
        self.with_mut(|file| file.update_attrs(change))
    }

    /// The envelope set in force (waits for the key of a pending file).
    pub fn envelopes(&self) -> Result<Vec<Envelope>> {
        self.with(|f| Ok(f.envelopes().to_vec()))
    }

    /// The instance now answers to `path`. Callers change the header first ([`Self::with_mut`]),
    /// which a pending file waits for, so its path never changes under its key request.
    pub fn set_path(&self, new: &CanonicalPath) {
        match &mut *self.state.write().unwrap() {
            Instance::Ready(file) => file.set_path(new.clone()),
            Instance::Pending { path, .. } | Instance::Failed { path, .. } => *path = new.clone(),
        }
    }

    /// The reason a key request failed, for `close` to report.
    pub fn failure(&self) -> Option<Error> {
        match &*self.state.read().unwrap() {
            Instance::Failed { path, reason, .. } => Some(failed(path, reason)),
            _ => None,
        }
    }

    /// Reads from the held data of a pending file, else from the file (never waits). A read
    /// that reaches this instance's end of file, or fails to authenticate, looks again at the
    /// file on disk (another mount may have grown it, or been writing it at that moment; see
    /// [`EncryptedFile::refresh`]) and, if it changed, reads again.
    pub fn read_at(&self, volume: &Volume, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let first = match &*self.state.read().unwrap() {
            Instance::Ready(file) => file.read_at(offset, buf),
            Instance::Failed { path, reason } => return Err(failed(path, reason)),
            Instance::Pending { data, .. } => {
                let start = (offset as usize).min(data.len());
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                return Ok(n);
            }
        };
        // Short (this instance's end of file), or failed: cut shorter, or being written, by
        // another mount (a block shorter than expected, or not flagged as expected).
        let torn = match &first {
            Ok(n) if *n == buf.len() => return first,
            Ok(_) => false,
            Err(Error::Format { .. } | Error::Io { .. }) => true,
            Err(_) => return first,
        };
        let mut state = self.state.write().unwrap();
        let Instance::Ready(file) = &mut *state else {
            return first;
        };
        if !torn {
            match file.refresh() {
                Ok(true) => return file.read_at(offset, buf),
                Ok(false) => return first,
                // Renewed, or being rewritten in place (grown) at this moment: under the
                // lock, below.
                Err(e) if e.errno() == libc::ESTALE => {}
                Err(e) => return Err(e),
            }
        }
        // Whatever another mount was writing (or this process moving: a header growth) is
        // complete once its lock is free.
        let lock = file.data_lock()?;
        let held = lock
            .take(false)
            .map_err(|e| Error::io(format!("cannot lock {}", file.path()), e))?;
        let staying = super::renew::staying(lock.ino());
        match file.refresh() {
            Ok(_) => file.read_at(offset, buf),
            Err(e) if e.errno() == libc::ESTALE => {
                drop((staying, held));
                reopen(volume, file)?;
                self.seals.store(0, Ordering::Relaxed);
                file.read_at(offset, buf)
            }
            Err(e) => Err(e),
        }
    }

    /// A change: on a pending file's held data when `held` can make it there (Some), else on
    /// the file, at once if its key is in hand or once it arrives.
    fn change<T>(
        &self,
        held: impl FnOnce(&mut Vec<u8>) -> Option<T>,
        ready: impl FnOnce(&mut EncryptedFile) -> Result<T>,
    ) -> Result<T> {
        match &mut *self.state.write().unwrap() {
            Instance::Ready(file) => return ready(file),
            Instance::Failed { path, reason } => return Err(failed(path, reason)),
            Instance::Pending { data, .. } => {
                if let Some(done) = held(data) {
                    return Ok(done);
                }
            }
        }
        self.with_mut(ready)
    }

    /// Writes `bytes` at `offset` (None: at the end); a pending file holds them in memory if
    /// they fit. Returns the offset written at.
    pub fn write_at(&self, volume: &Volume, offset: Option<u64>, bytes: &[u8]) -> Result<u64> {
        self.change(
            |data| {
                let at = offset.unwrap_or(data.len() as u64);
                let end = at + bytes.len() as u64;
                if end > PENDING_BYTES {
                    return None;
                }
                let (at, end) = (at as usize, end as usize);
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[at..end].copy_from_slice(bytes);
                Some(at as u64)
            },
            |f| {
                let at = offset.unwrap_or(f.size());
                self.count_seals(f, at, at + bytes.len() as u64)?;
                match f.write(offset, bytes) {
                    // Renewed by another mount: this handle writes into the file it is now.
                    Err(e) if e.errno() == libc::ESTALE => {
                        reopen(volume, f)?;
                        self.seals.store(0, Ordering::Relaxed);
                        self.count_seals(f, at, at + bytes.len() as u64)?;
                        f.write(offset, bytes)
                    }
                    other => other,
                }
            },
        )
    }

    /// Truncates or extends the file; truncating to zero renews it (new file id and data key,
    /// see [`super::renew`]), unless its key is still fresh.
    pub fn set_len(&self, volume: &Volume, size: u64) -> Result<()> {
        self.change(
            |data| (size <= PENDING_BYTES).then(|| data.resize(size as usize, 0)),
            |f| {
                if size > 0 {
                    self.count_seals(f, size.min(f.size()), size)?;
                    return f.set_len(size);
                }
                if self.fresh.load(Ordering::Relaxed) && f.size() == 0 {
                    return Ok(());
                }
                renew::set_len(volume, f, 0)?;
                self.seals.store(1, Ordering::Relaxed);
                self.fresh.store(true, Ordering::Relaxed);
                Ok(())
            },
        )
    }

    /// Extends the file with zeros to `size` bytes if it is shorter (`fallocate`).
    pub fn grow_to(&self, size: u64) -> Result<()> {
        self.change(
            |data| {
                (size <= PENDING_BYTES).then(|| {
                    if (data.len() as u64) < size {
                        data.resize(size as usize, 0);
                    }
                })
            },
            |f| {
                if size > f.size() {
                    self.count_seals(f, f.size(), size)?;
                }
                f.grow_to(size)
            },
        )
    }

    /// Runs `f` (a change of the backing file's timestamps) so that a key arriving at the
    /// same moment cannot overwrite it with the times it keeps. `f` is given the open backing
    /// file, as [`with_backing_file`](Self::with_backing_file) would deadlock under the lock.
    pub fn exclusive<T>(&self, f: impl FnOnce(std::io::Result<&File>) -> T) -> T {
        // A write lock though it only reads: it keeps `complete` out while `f` runs.
        #[allow(clippy::readonly_write_lock)]
        let state = self.state.write().unwrap();
        f(match &*state {
            Instance::Ready(file) => Ok(file.backing_file()),
            Instance::Pending { file, .. } => Ok(file),
            Instance::Failed { .. } => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        })
    }

    /// The answer to a pending file's key request: writes the header and the held data (the
    /// file keeps the timestamps it has now), or records the failure.
    pub fn complete(
        &self,
        volume: &Volume,
        key: std::result::Result<(DataKey, Vec<WrappedKey>), Error>,
    ) -> Result<()> {
        let mut state = self.state.write().unwrap();
        let Instance::Pending {
            path,
            attrs,
            file,
            data,
            lock,
        } = &*state
        else {
            return Ok(());
        };
        let path = path.clone();
        let lock = lock.clone();
        let result = key.and_then(|(dek, wrapped)| {
            let io = |what: &str, e| Error::io(format!("cannot {what} {path}"), e);
            let times = file.metadata().map_err(|e| io("stat", e))?;
            let dup = file.try_clone().map_err(|e| io("reopen", e))?;
            let mut ready =
                EncryptedFile::create_with_key(volume, &path, dup, &dek, wrapped, *attrs)?;
            // Its writes take the lock held (one descriptor: never waiting for itself).
            if let Some(lock) = &lock {
                ready.use_data_lock(lock.clone());
            }
            ready.write_at(0, data)?;
            keep_times(ready.backing_file(), &times).map_err(|e| io("set the times of", e))?;
            Ok(ready)
        });
        if let Some(lock) = &lock {
            lock.release();
        }
        let outcome = match result {
            Ok(ready) => {
                let held = data.len() as u64;
                let bs = ready.preamble().block_size as u64;
                self.seals.store(held.div_ceil(bs) + 1, Ordering::Relaxed);
                self.fresh.store(held == 0, Ordering::Relaxed);
                *state = Instance::Ready(ready);
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                let error = failed(&path, &reason);
                *state = Instance::Failed { path, reason };
                Err(error)
            }
        };
        drop(state);
        let _guard = self.arrival.lock().unwrap();
        self.arrived.notify_all();
        outcome
    }
}

/// Sets `file`'s access and modification times back to those in `meta`.
fn keep_times(file: &File, meta: &std::fs::Metadata) -> std::io::Result<()> {
    crate::backing::open::set_times(file, &super::times_of(meta))
}

/// The workers that fetch the keys of files created without waiting, and their bounds.
pub struct KeyRequests {
    volume: Arc<Volume>,
    queue: OnceLock<mpsc::Sender<Arc<OpenNode>>>,
    in_flight: Arc<(Mutex<usize>, Condvar)>,
    /// Set when a request fails, cleared when a create that waited gets its key: while the key
    /// service is failing, creates wait and report its errors themselves.
    degraded: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    limit: usize,
    /// Recent `GenerateDataKey` time in microseconds (a moving average; `u64::MAX` before the
    /// first): a key service that answers faster than a hand-off to a worker is waited for.
    latency_us: Arc<AtomicU64>,
}

fn record_latency(average: &AtomicU64, took: std::time::Duration) {
    let sample = took.as_micros().min(u64::MAX as u128 / 2) as u64;
    let old = average.load(Ordering::Relaxed);
    let new = if old == u64::MAX {
        sample
    } else {
        (old * 7 + sample) / 8
    };
    average.store(new, Ordering::Relaxed);
}

impl KeyRequests {
    /// Below this `GenerateDataKey` time (a KMS next door) creates wait: not waiting would
    /// cost more than it saves. The local provider is always waited for: a loaded machine
    /// can make it this slow now and then, and a pending create is not shown elsewhere.
    const WAIT_BELOW: std::time::Duration = std::time::Duration::from_millis(1);

    /// `limit`: most files pending at once (0: every create waits for its key).
    pub fn new(volume: Arc<Volume>, limit: usize, failures: Arc<AtomicU64>) -> Self {
        KeyRequests {
            volume,
            queue: OnceLock::new(),
            in_flight: Arc::new((Mutex::new(0), Condvar::new())),
            degraded: Arc::new(AtomicBool::new(false)),
            failures,
            limit,
            latency_us: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn start(&self) -> mpsc::Sender<Arc<OpenNode>> {
        let (tx, rx) = mpsc::channel::<Arc<OpenNode>>();
        let rx = Arc::new(Mutex::new(rx));
        // As many as the keyring lets call the key service at once (each waits on it, not on
        // the CPU): fewer would leave that room unused while creates queue. (Never more
        // threads than files may be pending.)
        let workers = self
            .volume
            .keyring()
            .concurrency()
            .clamp(1, self.limit.max(1));
        for _ in 0..workers {
            let (rx, volume) = (rx.clone(), self.volume.clone());
            let (in_flight, degraded) = (self.in_flight.clone(), self.degraded.clone());
            let (failures, latency) = (self.failures.clone(), self.latency_us.clone());
            let spawned = std::thread::Builder::new()
                .name("kmsfs-keys".into())
                .spawn(move || loop {
                    let Ok(node) = rx.lock().unwrap().recv() else {
                        return;
                    };
                    let path = node.path();
                    let started = Instant::now();
                    let generate = || {
                        volume
                            .keyring()
                            .generate(&volume.file_context(&path))
                            .map_err(|e| Error::key(&path, e))
                    };
                    let mut key = generate();
                    // The key service is down or throttling past the keyring's own retries:
                    // keep trying (new creates wait meanwhile), the data is held.
                    let mut pause = Duration::from_secs(1);
                    let mut retried = false;
                    while let Err(Error::Key { source, .. }) = &key {
                        if !source.kind.is_transient() || started.elapsed() > KEEP_TRYING_FOR {
                            break;
                        }
                        degraded.store(true, Ordering::Relaxed);
                        tracing::warn!("{path}: the data key has not arrived, retrying: {source}");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(30));
                        retried = true;
                        key = generate();
                    }
                    match &key {
                        // Counted before anyone waiting on the file hears of it.
                        Err(_) => {
                            degraded.store(true, Ordering::Relaxed);
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        // An outage's retries say nothing about the service's usual speed.
                        Ok(_) if !retried => record_latency(&latency, started.elapsed()),
                        Ok(_) => {}
                    }
                    let key_failed = key.is_err();
                    if let Err(e) = node.complete(&volume, key) {
                        if !key_failed {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::error!("create failed after it returned: {e}");
                    }
                    drop(node);
                    let (count, done) = &*in_flight;
                    *count.lock().unwrap() -= 1;
                    done.notify_all();
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a key worker: {e}");
            }
        }
        tx
    }

    /// Whether a create now would be handed to a worker rather than wait for its key: not
    /// when pending creates are off, the key service is failing, answers fast or in process.
    pub fn would_take(&self) -> bool {
        let latency = self.latency_us.load(Ordering::Relaxed);
        self.limit > 0
            && !self.volume.keyring().answers_in_process()
            && !self.degraded.load(Ordering::Relaxed)
            && latency >= Self::WAIT_BELOW.as_micros() as u64
            && latency != u64::MAX
    }

    /// Whether a create now would be handed to a worker and find room (see [`Self::submit`]):
    /// otherwise it waits for its key itself.
    pub fn would_queue(&self) -> bool {
        self.would_take() && *self.in_flight.0.lock().unwrap() < self.limit
    }

    /// Hands `node`'s key request to a worker; false when the create should wait for its key
    /// itself (see [`Self::would_take`], or too many pending).
    pub fn submit(&self, node: &Arc<OpenNode>) -> bool {
        if !self.would_take() {
            return false;
        }
        {
            let mut count = self.in_flight.0.lock().unwrap();
            if *count >= self.limit {
                return false;
            }
            *count += 1;
        }
        if self
            .queue
            .get_or_init(|| self.start())
            .send(node.clone())
            .is_err()
        {
            *self.in_flight.0.lock().unwrap() -= 1;
            return false;
        }
        true
    }

    /// A create that waited got its key, in `took`: the key service answers again.
    pub fn answered(&self, took: std::time::Duration) {
        self.degraded.store(false, Ordering::Relaxed);
        record_latency(&self.latency_us, took);
    }

    /// Waits until every pending file has its key (or its failure): before unmount completes.
    pub fn settle(&self) {
        let (count, done) = &*self.in_flight;
        let mut n = count.lock().unwrap();
        while *n > 0 {
            n = done.wait(n).unwrap();
        }
    }
}
