//! One encrypted file on the backing store, read and written by plaintext offset.
//!
//! Creating a file asks the keyring for a data key bound to the file's path (one
//! `GenerateDataKey`) and writes the header and a sealed empty final block at once, so every
//! file on the store is complete and authenticated from its first byte. Opening reads the
//! header, takes the newest slot whose envelope names the path being opened, unwraps the DEK
//! under that path's context (through the key cache), checks the key commitment and the slot
//! MAC, and keeps only the derived block cipher and MAC key; the DEK itself is dropped
//! (zeroized) at once. A slot that fails any check is passed over for the other one.
//!
//! Reads and writes touch only the blocks they cover: whole blocks are sealed straight from
//! the caller's data, edges are read, merged and resealed, and growing a file reseals its old
//! final block (which loses its "last" flag) and fills any gap with sealed zeros.

use std::fs::File;

use crate::backing::{Atime, Backing, DataLock};
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::error::{Error, Result};
use crate::format::block::{BlockCipher, Layout, BLOCK_OVERHEAD, NONCE_LEN};
use crate::format::context::CanonicalPath;
use crate::format::envelope::{Envelope, WrappedKey};
use crate::format::header::{
    encode_new_header, seal_slot, slot_size_for, Attrs, Header, Preamble, SlotContent, SlotState,
    SUITE_AES256GCM_HKDF_SHA256,
};
use crate::format::{kdf, FormatError};
use crate::secret::{DataKey, DerivedKey};

use super::renew::Step;
use super::volume::Volume;

/// Largest plaintext range sealed in one go when growing a file (bounds memory).
const GROW_CHUNK: u64 = 1 << 20;

/// How far a streaming write gets ahead of the backing store's writeback before the daemon
/// starts it (see [`EncryptedFile::write_behind`]).
const WRITE_BEHIND: u64 = 8 << 20;
/// The page size writeback works in: the part of a page still to be rewritten is not
/// handed to the disk early.
const PAGE: u64 = 4096;

/// Seals consecutive blocks `(index, plaintext)` (block `final_block` flagged last) into one
/// buffer. On one thread: sealing runs at 2-3 GB/s, so a 128 KiB write seals in ~50 µs, and
/// starting a helper thread per request cost more than it saved (a 512 MiB `dd` took 1.8 s
/// with a second thread from 64 KiB up, 1.35 s without).
fn seal_blocks(cipher: &BlockCipher, blocks: &[(u64, &[u8])], final_block: u64) -> Vec<u8> {
    let total: usize = blocks.iter().map(|(_, p)| p.len() + BLOCK_OVERHEAD).sum();
    let mut out = vec![0u8; total];
    let nonces = random_nonces(blocks.len());
    let mut at = 0;
    for ((index, plain), nonce) in blocks.iter().zip(nonces.chunks_exact(NONCE_LEN)) {
        let len = plain.len() + BLOCK_OVERHEAD;
        cipher.seal_into(
            *index,
            *index == final_block,
            nonce.try_into().expect("12"),
            plain,
            &mut out[at..at + len],
        );
        at += len;
    }
    out
}

pub struct EncryptedFile {
    file: File,
    /// The store, for the lock that header updates take.
    backing: std::sync::Arc<Backing>,
    path: CanonicalPath,
    preamble: Preamble,
    layout: Layout,
    cipher: BlockCipher,
    mac_key: DerivedKey,
    active_slot: usize,
    content: SlotContent,
    size: u64,
    /// Whether the file has ever been made durable: false for a file this instance created
    /// (or renewed) until its first sync. Header rewrites of a file that never was skip their
    /// syncs: they order a new slot after a durable older one, and there is none yet.
    durable: std::sync::atomic::AtomicBool,
    /// This file's data lock (see [`DataLock`]), opened at its first write.
    data_lock: std::sync::OnceLock<std::sync::Arc<DataLock>>,
    /// Where the backing store's writeback was last started: see
    /// [`write_behind`](Self::write_behind).
    written_behind: u64,
    /// [`super::renew::growths`] when this instance last looked at its file's layout: a
    /// growth since (perhaps of this file, by a rename that did not use this instance) makes
    /// it look again before it writes.
    growths_seen: u64,
}

impl std::fmt::Debug for EncryptedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptedFile({}, {} bytes)", self.path, self.size)
    }
}

fn random_nonces(count: usize) -> Vec<u8> {
    let mut nonces = vec![0u8; count * NONCE_LEN];
    getrandom::getrandom(&mut nonces).expect("the OS random number generator failed");
    nonces
}

impl EncryptedFile {
    /// Makes `file` (empty, opened read-write) the object for `path` with `attrs`: a file's
    /// data key comes from the key service (one `GenerateDataKey`), any other object's is
    /// random and wrapped under the volume (no key call).
    pub fn create(volume: &Volume, path: &CanonicalPath, file: File, attrs: Attrs) -> Result<Self> {
        if path.is_root() {
            return Err(Error::Usage(
                "the volume root is a directory, not a file".into(),
            ));
        }
        let (dek, wrapped) = if attrs.kind.uses_key_service() {
            volume
                .keyring()
                .generate(&volume.file_context(path))
                .map_err(|e| Error::key(path, e))?
        } else {
            volume.object_data_key(path)
        };
        Self::create_with_key(volume, path, file, &dek, wrapped, attrs)
    }

    /// [`EncryptedFile::create`] with a data key already generated for `path`'s context
    /// (a create that did not wait for it, see `fs.rs`).
    pub fn create_with_key(
        volume: &Volume,
        path: &CanonicalPath,
        file: File,
        dek: &DataKey,
        wrapped: Vec<WrappedKey>,
        attrs: Attrs,
    ) -> Result<Self> {
        let new = NewObject::make(volume, path, dek, wrapped, attrs, &[])?;
        file.write_all_at(&new.bytes, 0)
            .map_err(|e| Error::io(format!("cannot write {path}"), e))?;
        Ok(EncryptedFile {
            file,
            backing: volume.backing_shared(),
            path: path.clone(),
            layout: new.layout(),
            preamble: new.preamble,
            cipher: new.cipher,
            mac_key: new.mac_key,
            active_slot: 0,
            content: new.content,
            size: 0,
            written_behind: 0,
            growths_seen: super::renew::growths(),
            durable: false.into(),
            data_lock: Default::default(),
        })
    }

    /// Opens the backing file of `path` and authenticates its header for that path.
    pub fn open(volume: &Volume, path: &CanonicalPath, writable: bool) -> Result<Self> {
        let file = open_backing(volume, path, writable)?;
        Self::from_file(volume, path, file)
    }

    /// Authenticates an already open backing `file` as the file at `path`.
    pub fn from_file(volume: &Volume, path: &CanonicalPath, file: File) -> Result<Self> {
        // (Before the header is read: a growth that ends after it counts.)
        let growths_seen = super::renew::growths();
        let (header, len) = read_header(&file, path)?;
        let preamble = header.preamble.clone();
        let layout = preamble.layout();
        let size = layout
            .plaintext_len(len)
            .map_err(|e| Error::format(path, e))?;

        let candidates = header.candidates();
        if candidates.is_empty() {
            let why: Vec<String> = header
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    SlotState::Empty => format!("slot {i} empty"),
                    SlotState::Damaged(r) => format!("slot {i}: {r}"),
                    SlotState::Sealed(_) => unreachable!("sealed slots are candidates"),
                })
                .collect();
            return Err(Error::format(
                path,
                FormatError::InvalidHeader(format!("no valid slot ({})", why.join("; "))),
            ));
        }
        let ctx = volume.file_context(path);
        let mac_key = volume.header_mac_key(&preamble.file_id);
        let mut first_err = None;
        for (slot, content) in &candidates {
            let mine: Vec<_> = content
                .envelopes
                .iter()
                .filter(|e| &e.path == path)
                .map(|e| &e.key)
                .collect();
            // The slot's MAC is checked first, with no key call: an unauthentic slot's
            // envelopes are never sent to the key service.
            let attempt = if !header.verify_mac(*slot, &mac_key) {
                Err(Error::format(
                    path,
                    FormatError::HeaderAuthFailed(format!("slot {slot} MAC mismatch")),
                ))
            } else if mine.is_empty() {
                Err(moved(path, &content.envelopes))
            } else {
                volume
                    .unwrap_data_key(content.attrs.kind, &mine, path, &ctx)
                    .and_then(|dek| {
                        let id = &preamble.file_id;
                        if !kdf::commitment_matches(&dek, id, &preamble.commitment) {
                            return Err(Error::format(path, FormatError::CommitmentMismatch));
                        }
                        Ok(BlockCipher::new(&kdf::content_key(&dek, id), *id))
                    })
            };
            match attempt {
                Ok(cipher) => {
                    if *slot != candidates[0].0
                        || header
                            .slots
                            .iter()
                            .any(|s| matches!(s, SlotState::Damaged(_)))
                    {
                        tracing::warn!(path = %path, slot, "header slot damaged or stale; using the other slot");
                    }
                    return Ok(EncryptedFile {
                        file,
                        backing: volume.backing_shared(),
                        path: path.clone(),
                        preamble: preamble.clone(),
                        layout,
                        cipher,
                        mac_key: volume.header_mac_key(&preamble.file_id),
                        active_slot: *slot,
                        content: (*content).clone(),
                        size,
                        written_behind: layout.block_offset(layout.block_count(size) - 1),
                        growths_seen,
                        durable: true.into(),
                        data_lock: Default::default(),
                    });
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("at least one candidate"))
    }

    pub fn path(&self) -> &CanonicalPath {
        &self.path
    }

    /// Takes the header slot in force on disk (another mount of the store may have changed
    /// the file's names, mode or owner since this instance read it): the same file (id), an
    /// authentic slot; no key call, the content key is the same. A file renewed elsewhere (a
    /// new file id) is `ESTALE`: this instance can no longer be used.
    pub fn reload_header(&mut self) -> Result<()> {
        self.with_header_now(|_, _, _| Ok(()))
    }

    /// [`EncryptedFile::reload_header`], then `f` given this instance, the preamble and the
    /// authentic slots read (newest first).
    fn with_header_now<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &Preamble, &[(usize, &SlotContent)]) -> Result<T>,
    ) -> Result<T> {
        let header = read_header_only(&self.file, &self.path)?;
        let authentic = header.authentic(&self.mac_key);
        // Grown elsewhere: taken only with a slot that authenticates under the larger size
        // (the preamble alone is not authenticated).
        if self.grown_to(&header.preamble) && !authentic.is_empty() {
            self.take_grown(header.preamble.clone())?;
        }
        if header.preamble != self.preamble {
            return Err(self.renewed_elsewhere());
        }
        let Some(&(slot, current)) = authentic.first() else {
            return Err(Error::format(
                &self.path,
                FormatError::HeaderAuthFailed("no slot with a valid MAC".into()),
            ));
        };
        self.active_slot = slot;
        self.content = current.clone();
        f(self, &header.preamble, &authentic)
    }

    /// [`EncryptedFile::reload_header`], then answers to `path` if the header binds it (another
    /// mount renamed or linked the file there). Says whether it does.
    pub fn follow(&mut self, path: &CanonicalPath) -> Result<bool> {
        self.reload_header()?;
        if !self.content.envelopes.iter().any(|e| &e.path == path) {
            return Ok(false);
        }
        self.path = path.clone();
        Ok(true)
    }

    /// If the slot in force no longer binds this instance's path (another mount renamed the
    /// file), takes the name it binds that is this file on the store now.
    fn follow_own_name(&mut self) -> Result<()> {
        if self.content.envelopes.iter().any(|e| e.path == self.path) {
            return Ok(());
        }
        let me = self.file.metadata().map_err(|e| self.io_err("stat", e))?;
        let here = self.content.envelopes.iter().find(|e| {
            self.backing
                .metadata(&e.path)
                .is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
        });
        if let Some(e) = here {
            self.path = e.path.clone();
        }
        Ok(())
    }

    fn renewed_elsewhere(&self) -> Error {
        crate::error::os(
            format!(
                "{}: truncated to zero (renewed) or replaced by another mount since it was \
                 opened here; reopen it",
                self.path
            ),
            libc::ESTALE,
        )
    }

    /// Records that the file now lives at `path` (after a rename rebound it).
    pub fn set_path(&mut self, path: CanonicalPath) {
        self.path = path;
    }

    /// The backing file (for metadata and locks).
    pub fn backing_file(&self) -> &File {
        &self.file
    }

    /// Plaintext size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The plaintext size were the backing file `len` bytes long (this instance's own if
    /// that length is not one a file of this layout can have).
    pub fn size_for(&self, len: u64) -> u64 {
        self.layout.plaintext_len(len).unwrap_or(self.size)
    }

    pub fn envelopes(&self) -> &[Envelope] {
        &self.content.envelopes
    }

    /// The authenticated attributes in force (kind, mode, owner).
    pub fn attrs(&self) -> Attrs {
        self.content.attrs
    }

    pub fn generation(&self) -> u64 {
        self.content.generation
    }

    pub fn preamble(&self) -> &Preamble {
        &self.preamble
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("cannot {what} {}", self.path), e)
    }

    fn final_block(&self, size: u64) -> u64 {
        self.layout.block_count(size) - 1
    }

    /// Reads and opens block `index` of the current file into `out` (its plaintext length).
    fn read_block(&self, index: u64, out: &mut [u8]) -> Result<usize> {
        let sealed = self.read_sealed(index)?;
        self.open_block(index, &sealed, out)
    }

    /// The sealed bytes of block `index` of the current file.
    fn read_sealed(&self, index: u64) -> Result<Vec<u8>> {
        let plain = self.layout.block_plain_len(self.size, index);
        let mut sealed = vec![0u8; plain + BLOCK_OVERHEAD];
        self.file
            .read_exact_at(&mut sealed, self.layout.block_offset(index))
            .map_err(|e| self.io_err("read", e))?;
        Ok(sealed)
    }

    /// Opens `sealed`, block `index` of the current file, into `out`.
    fn open_block(&self, index: u64, sealed: &[u8], out: &mut [u8]) -> Result<usize> {
        let last = index == self.final_block(self.size);
        self.cipher
            .open(index, last, sealed, out)
            .map_err(|e| Error::format(&self.path, e))
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let end = (offset + buf.len() as u64).min(self.size);
        let bs = self.layout.block_size as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let start = self.layout.block_offset(first);
        let stop = self.layout.block_offset(last)
            + (self.layout.block_plain_len(self.size, last) + BLOCK_OVERHEAD) as u64;
        let mut sealed = vec![0u8; (stop - start) as usize];
        self.file
            .read_exact_at(&mut sealed, start)
            .map_err(|e| self.io_err("read", e))?;
        let final_block = self.final_block(self.size);
        let mut scratch = vec![0u8; bs as usize];
        let mut pos = 0usize;
        for index in first..=last {
            let plain = self.layout.block_plain_len(self.size, index);
            let chunk = &sealed[pos..pos + plain + BLOCK_OVERHEAD];
            pos += chunk.len();
            let block_start = index * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + plain as u64);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if from == block_start && to == block_start + plain as u64 {
                self.cipher.open(index, index == final_block, chunk, dst)
            } else {
                let r = self
                    .cipher
                    .open(index, index == final_block, chunk, &mut scratch);
                dst.copy_from_slice(
                    &scratch[(from - block_start) as usize..(to - block_start) as usize],
                );
                r
            }
            .map_err(|e| Error::format(&self.path, e))?;
        }
        Ok((end - offset) as usize)
    }

    /// Reads the whole file.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.size as usize];
        let n = self.read_at(0, &mut out)?;
        debug_assert_eq!(n, out.len());
        Ok(out)
    }

    /// Writes `data` at `offset`, growing the file (with zeros in any gap) as needed.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write(Some(offset), data).map(|_| ())
    }

    /// Writes `data` at `offset`, or at the end (None: `O_APPEND`), under the file's data
    /// lock and at the length the file has now (another mount may have changed it). Returns
    /// where it wrote.
    pub fn write(&mut self, offset: Option<u64>, data: &[u8]) -> Result<u64> {
        let lock = self.data_lock()?;
        let held = lock.take(true).map_err(|e| self.io_err("lock", e))?;
        let _staying = self.catch_up(&lock, held.shared())?;
        let at = offset.unwrap_or(self.size);
        self.write_locked(at, data)?;
        Ok(at)
    }

    /// [`Self::refresh`]; if that finds no header of this file, or a damaged one (renewed,
    /// or being rewritten in place at this moment: a growth or renewal here or on another
    /// mount), again once any rewrite under way has finished (with `locked`, the caller holds
    /// the data lock).
    pub fn refresh_or_wait(&mut self, locked: bool) -> Result<bool> {
        match self.refresh() {
            // (Renewed, or a marker or torn header: not yet an answer.)
            Err(Error::Format { .. } | Error::Io { .. }) => {
                let lock = self.data_lock()?;
                let _held = if locked {
                    None
                } else {
                    Some(lock.take(false).map_err(|e| self.io_err("lock", e))?)
                };
                let _staying = super::renew::staying(lock.ino());
                self.refresh()
            }
            other => other,
        }
    }

    /// Under the data lock: looks at the file again if another process may have changed it
    /// (`shared`), or a growth in this process may have moved its blocks since this instance
    /// last looked; returns the guard that keeps any growth of it from starting meanwhile.
    fn catch_up(
        &mut self,
        lock: &DataLock,
        shared: bool,
    ) -> Result<std::sync::RwLockReadGuard<'static, ()>> {
        let staying = super::renew::staying(lock.ino());
        let growths = super::renew::growths();
        if shared || growths != self.growths_seen {
            self.refresh()?;
            self.growths_seen = growths;
        }
        Ok(staying)
    }

    /// Takes `lock` (opened on this file) as its data lock, if it has none yet.
    pub(crate) fn use_data_lock(&self, lock: std::sync::Arc<DataLock>) {
        let _ = self.data_lock.set(lock);
    }

    /// This file's data lock, opened on first use.
    pub(crate) fn data_lock(&self) -> Result<std::sync::Arc<DataLock>> {
        if let Some(lock) = self.data_lock.get() {
            return Ok(lock.clone());
        }
        let lock = DataLock::new(&self.backing, &self.file)
            .map_err(|e| Error::io(format!("cannot open the data lock of {}", self.path), e))?;
        Ok(self
            .data_lock
            .get_or_init(|| std::sync::Arc::new(lock))
            .clone())
    }

    /// Catches up with changes another mount made to the file since this instance last
    /// looked: its length (so the final block is the one on disk). Says whether it changed.
    /// A file renewed elsewhere (truncated to zero: a new file id and key) cannot be caught up
    /// with; this instance then fails with `ESTALE` (reopen it) rather than seal blocks that
    /// would never authenticate under the new header. Callers that change the file hold its
    /// data lock; a reader need not (a torn view fails to authenticate and is read again under
    /// the lock).
    pub fn refresh(&mut self) -> Result<bool> {
        let mut head = [0u8; crate::format::header::PREAMBLE_LEN];
        let read = self.file.read_exact_at(&mut head, 0);
        let len = self
            .file
            .metadata()
            .map_err(|e| self.io_err("stat", e))?
            .len();
        let now = read.ok().and_then(|_| Preamble::decode(&head).ok());
        let Some(now) = now.filter(|p| p.file_id == self.preamble.file_id) else {
            return Err(self.renewed_elsewhere());
        };
        // Grown elsewhere (a rename, link or rewrap needed header room): the blocks moved.
        // Taken once a slot authenticates under the new size.
        if self.grown_to(&now) {
            self.reload_header()?;
        }
        let size = self
            .layout
            .plaintext_len(len)
            .map_err(|e| Error::format(&self.path, e))?;
        let changed = size != self.size;
        self.size = size;
        Ok(changed)
    }

    fn write_locked(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // A write far past the end first fills the gap in bounded chunks.
        if offset > self.size + GROW_CHUNK {
            self.check_room_to_grow(offset + data.len() as u64)?;
        }
        while offset > self.size + GROW_CHUNK {
            let n = GROW_CHUNK as usize;
            self.write_locked(self.size, &vec![0u8; n])?;
        }
        let bs = self.layout.block_size as u64;
        let old_size = self.size;
        let end = offset + data.len() as u64;
        let new_size = old_size.max(end);
        let (old_final, new_final) = (self.final_block(old_size), self.final_block(new_size));
        let mut first = offset / bs;
        if new_final > old_final {
            first = first.min(old_final);
        }
        let last = (end - 1) / bs;
        // Growing rewrites the old final block (resealed as "not last", or longer): keep its
        // sealed form, so a write that fails part way (ENOSPC after a short write) can put the
        // file back as it was, not leave it with a torn or missing final block (unreadable).
        // It is also what the merge below opens.
        let old_final_sealed = if new_size > old_size {
            Some(self.read_sealed(old_final)?)
        } else {
            None
        };
        // Each block's new plaintext: straight from `data` where the write covers all of it,
        // else merged with what was there (the edges) or zeros (a gap).
        let mut merged: Vec<Option<Vec<u8>>> = Vec::with_capacity((last - first + 1) as usize);
        for index in first..=last {
            let block_start = index * bs;
            let new_len = self.layout.block_plain_len(new_size, index);
            let old_len = if index <= old_final {
                self.layout.block_plain_len(old_size, index)
            } else {
                0
            };
            let covered_from = offset.max(block_start);
            let covered_to = end.min(block_start + new_len as u64);
            if covered_from == block_start && covered_to == block_start + new_len as u64 {
                merged.push(None);
                continue;
            }
            let fully_covered =
                covered_from == block_start && covered_to >= block_start + old_len as u64;
            let mut buf = vec![0u8; new_len];
            if old_len > 0 && !fully_covered {
                let mut old = vec![0u8; bs as usize];
                let n = match &old_final_sealed {
                    Some(sealed) if index == old_final => {
                        self.open_block(index, sealed, &mut old)?
                    }
                    _ => self.read_block(index, &mut old)?,
                };
                buf[..n].copy_from_slice(&old[..n]);
            }
            if covered_from < covered_to {
                buf[(covered_from - block_start) as usize..(covered_to - block_start) as usize]
                    .copy_from_slice(
                        &data[(covered_from - offset) as usize..(covered_to - offset) as usize],
                    );
            }
            merged.push(Some(buf));
        }
        let blocks: Vec<(u64, &[u8])> = (first..=last)
            .zip(&merged)
            .map(|(index, m)| match m {
                Some(buf) => (index, buf.as_slice()),
                None => {
                    let from = (index * bs - offset) as usize;
                    let len = self.layout.block_plain_len(new_size, index);
                    (index, &data[from..from + len])
                }
            })
            .collect();
        let sealed = seal_blocks(&self.cipher, &blocks, new_final);
        if let Err(e) = self
            .file
            .write_all_at(&sealed, self.layout.block_offset(first))
        {
            if let Some(saved) = old_final_sealed {
                self.undo_growth(old_size, &saved);
            }
            return Err(self.io_err("write", e));
        }
        self.size = new_size;
        self.write_behind();
        Ok(())
    }

    /// A file growing by streaming writes has the backing store start writing its settled
    /// part (everything before the final block, which the next append reseals) every
    /// `WRITE_BEHIND` bytes, without waiting for it: the disk works while the next requests
    /// are sealed, instead of all at the `fsync` or `close` that follows, and a large copy
    /// does not pile up dirty pages. A file written in place, or small, never starts it.
    fn write_behind(&mut self) {
        let settled = self.layout.block_offset(self.final_block(self.size)) & !(PAGE - 1);
        if settled < self.written_behind {
            // Truncated since.
            self.written_behind = settled;
        }
        if settled < self.written_behind + WRITE_BEHIND {
            return;
        }
        let from = self.written_behind;
        self.written_behind = settled;
        if let Err(e) = crate::backing::open::start_writeback(&self.file, from, settled - from) {
            tracing::debug!("{}: cannot start writeback: {e}", self.path);
        }
    }

    /// After a failed growing write: the old final block back in place and the file cut to
    /// its old length (neither needs new space). Best effort; a failure is logged, and the
    /// file then reads as truncated (an error, never wrong data).
    fn undo_growth(&self, old_size: u64, old_final_sealed: &[u8]) {
        let index = self.final_block(old_size);
        let restored = self
            .file
            .write_all_at(old_final_sealed, self.layout.block_offset(index))
            .and_then(|_| self.file.set_len(self.layout.backing_len(old_size)));
        if let Err(e) = restored {
            tracing::error!("{}: cannot undo a failed write: {e}", self.path);
        }
    }

    /// Holes are stored as sealed zeros (an all-zero block on disk would be indistinguishable
    /// from one an attacker zeroed), so growing a file takes real space: refuse at once, with
    /// ENOSPC (EFBIG beyond the filesystem's whole size), growth the backing filesystem cannot
    /// hold, instead of writing until it is full.
    fn check_room_to_grow(&self, new_size: u64) -> Result<()> {
        let need = self
            .layout
            .backing_len(new_size)
            .saturating_sub(self.layout.backing_len(self.size));
        if need < GROW_CHUNK {
            return Ok(());
        }
        let st = crate::backing::open::statvfs(&self.file)
            .map_err(|e| self.io_err("stat the filesystem of", e))?;
        // Larger than the whole backing filesystem: the file could never be that big (EFBIG,
        // as a filesystem says of a size beyond its limit); otherwise it could, given room.
        let total = st.f_blocks.saturating_mul(st.f_frsize);
        if self.layout.backing_len(new_size) > total {
            return Err(self.io_err("grow", std::io::Error::from_raw_os_error(libc::EFBIG)));
        }
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if need > free {
            return Err(self.io_err("grow", std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }

    /// Truncates or extends (with zeros) to `new_size` bytes, under the file's data lock.
    pub fn set_len(&mut self, new_size: u64) -> Result<()> {
        let lock = self.data_lock()?;
        let held = lock.take(true).map_err(|e| self.io_err("lock", e))?;
        let _staying = self.catch_up(&lock, held.shared())?;
        self.set_len_locked(new_size)
    }

    /// Extends the file with zeros to `size` bytes if it is shorter now (`fallocate`).
    pub fn grow_to(&mut self, size: u64) -> Result<()> {
        let lock = self.data_lock()?;
        let held = lock.take(true).map_err(|e| self.io_err("lock", e))?;
        let _staying = self.catch_up(&lock, held.shared())?;
        if size > self.size {
            self.set_len_locked(size)?;
        }
        Ok(())
    }

    fn set_len_locked(&mut self, new_size: u64) -> Result<()> {
        if new_size > self.size {
            self.check_room_to_grow(new_size)?;
            while self.size < new_size {
                let n = (new_size - self.size).min(GROW_CHUNK) as usize;
                self.write_locked(self.size, &vec![0u8; n])?;
            }
            return Ok(());
        }
        if new_size == self.size {
            return Ok(());
        }
        // Reseal the new final block (cut short, flagged last), then drop what follows.
        let index = self.final_block(new_size);
        let mut block = vec![0u8; self.layout.block_size as usize];
        self.read_block(index, &mut block)?;
        let keep = self.layout.block_plain_len(new_size, index);
        let mut sealed = Vec::with_capacity(keep + BLOCK_OVERHEAD);
        let nonce = random_nonces(1);
        self.cipher.seal(
            index,
            true,
            nonce[..NONCE_LEN].try_into().expect("12"),
            &block[..keep],
            &mut sealed,
        );
        self.file
            .write_all_at(&sealed, self.layout.block_offset(index))
            .map_err(|e| self.io_err("write", e))?;
        self.file
            .set_len(self.layout.backing_len(new_size))
            .map_err(|e| self.io_err("truncate", e))?;
        self.size = new_size;
        Ok(())
    }

    /// Replaces the envelope set atomically (see [`update_envelopes`]), in the slot room the
    /// file has.
    pub fn replace_envelopes(&mut self, envelopes: Vec<Envelope>) -> Result<()> {
        self.update_envelopes(false, |_| Ok(Some(envelopes.clone())))
            .map(|_| ())
    }

    /// Changes the envelope set under the file's advisory lock: `change` sees the set on disk
    /// now (another process, `kmsfs rewrap`, may have changed it since this file was opened)
    /// and returns the new one, or None to leave it. See [`update_envelopes`]. A set the slots
    /// cannot hold fails with `NoRoom` and changes nothing: the caller grows the header
    /// ([`super::renew::grow`]) holding nothing a writer of this instance waits for (its
    /// data lock comes before this instance's lock), then calls again. Says whether the
    /// header changed.
    pub fn update_envelopes(
        &mut self,
        both_slots: bool,
        change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
    ) -> Result<bool> {
        self.update_slot(both_slots, envelope_change(change))
    }

    /// Changes the attributes (mode, owner) under the file's advisory lock: `change` sees
    /// those on disk now and returns the new ones, or None to leave them. Both slots are
    /// written (two slot writes, no key call), so that no slot keeps the old attributes for a
    /// damaged newer one to fall back to. Says whether the header changed.
    pub fn update_attrs(&mut self, change: impl Fn(Attrs) -> Option<Attrs>) -> Result<bool> {
        // Nothing to change in what this instance holds: no header read (this runs before
        // every write by someone who may not keep set-id bits).
        if change(self.content.attrs).is_none() {
            return Ok(false);
        }
        // (Attributes take the same room whatever they are: never `NoRoom`.)
        self.update_slot(true, attrs_change(change))
    }

    /// Takes the preamble of this file grown in place (same file id and key, larger slots:
    /// its blocks moved), here or by another mount.
    fn take_grown(&mut self, preamble: Preamble) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| self.io_err("stat", e))?
            .len();
        let layout = preamble.layout();
        self.size = layout
            .plaintext_len(len)
            .map_err(|e| Error::format(&self.path, e))?;
        self.written_behind = layout.block_offset(layout.block_count(self.size) - 1);
        self.layout = layout;
        self.preamble = preamble;
        Ok(())
    }

    /// Whether `other` is this file's preamble but for a larger slot size: the file was grown.
    fn grown_to(&self, other: &Preamble) -> bool {
        other.slot_size > self.preamble.slot_size
            && *other
                == Preamble {
                    slot_size: other.slot_size,
                    ..self.preamble.clone()
                }
    }

    fn update_slot(
        &mut self,
        both_slots: bool,
        change: impl FnOnce(&[&SlotContent]) -> Result<Option<NewSlot>>,
    ) -> Result<bool> {
        // One header read, under the lock: the slot in force, and the name this file has now
        // if another mount renamed it.
        let backing = self.backing.clone();
        let _lock = backing
            .lock_header(&self.file)
            .map_err(|e| Error::io(format!("cannot lock the header of {}", self.path), e))?;
        let updated = self.with_header_now(|this, preamble, authentic| {
            this.follow_own_name()?;
            let current = authentic[0].1;
            if !current.envelopes.iter().any(|e| e.path == this.path) {
                return Err(moved(&this.path, &current.envelopes));
            }
            let durable = this.durable.load(std::sync::atomic::Ordering::Relaxed);
            write_slot_change(
                &this.file,
                &this.path,
                preamble,
                authentic,
                &this.mac_key,
                durable,
                both_slots,
                change,
            )
        })?;
        let changed = updated.is_some();
        if let Some((slot, content)) = updated {
            self.active_slot = slot;
            self.content = content;
        }
        Ok(changed)
    }

    /// Makes written data durable (fdatasync of the backing file).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err("sync", e))?;
        self.durable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Opens the final block: a file cut at a block boundary, or extended, fails here.
    pub fn verify_last_block(&self) -> Result<()> {
        let mut buf = vec![0u8; self.layout.block_size as usize];
        let count = self.layout.block_count(self.size);
        self.read_block(count.saturating_sub(1), &mut buf)
            .map(|_| ())
    }

    /// Opens every block: a full integrity check (fsck --deep, cat).
    pub fn verify_all(&self) -> Result<()> {
        let chunk = 64 * self.layout.block_size as u64;
        let mut buf = vec![0u8; chunk as usize];
        let mut off = 0;
        loop {
            let n = self.read_at(off, &mut buf)?;
            off += n as u64;
            if n == 0 || off >= self.size {
                // A zero-length file still has its final block to check.
                if self.size == 0 {
                    self.read_block(0, &mut buf)?;
                }
                return Ok(());
            }
        }
    }
}

/// A new object's bytes (header and sealed content), before they are written anywhere, and
/// the state an open file takes once they are on disk (a create; a renewal, see
/// `super::renew`).
pub(crate) struct NewObject {
    preamble: Preamble,
    content: SlotContent,
    mac_key: DerivedKey,
    cipher: BlockCipher,
    pub(crate) bytes: Vec<u8>,
}

impl NewObject {
    /// A new object at `path` whose data key `dek` is wrapped as `wrapped`.
    fn make(
        volume: &Volume,
        path: &CanonicalPath,
        dek: &DataKey,
        wrapped: Vec<WrappedKey>,
        attrs: Attrs,
        data: &[u8],
    ) -> Result<Self> {
        let envelopes = wrapped
            .into_iter()
            .map(|key| Envelope {
                path: path.clone(),
                key,
            })
            .collect();
        Self::build(volume, path, dek, envelopes, attrs, data, 0)
    }

    /// A new object (fresh file id) under `dek` with `envelopes`, `path`'s first among them.
    /// Its slots hold at least `min_slot` bytes and room for names like `path`'s, and grow if
    /// `envelopes` need more.
    fn build(
        volume: &Volume,
        path: &CanonicalPath,
        dek: &DataKey,
        envelopes: Vec<Envelope>,
        attrs: Attrs,
        data: &[u8],
        min_slot: u32,
    ) -> Result<Self> {
        let mut file_id = [0u8; 16];
        getrandom::getrandom(&mut file_id).expect("the OS random number generator failed");
        let own: Vec<Envelope> = envelopes
            .iter()
            .filter(|e| &e.path == path)
            .cloned()
            .collect();
        let mut preamble = Preamble {
            suite: SUITE_AES256GCM_HKDF_SHA256,
            block_size: volume.config().block_size,
            slot_size: slot_size_for(&own).max(min_slot),
            file_id,
            commitment: kdf::commitment(dek, &file_id),
        };
        let mac_key = volume.header_mac_key(&file_id);
        let content = SlotContent {
            generation: 1,
            attrs,
            envelopes,
        };
        let mut bytes = loop {
            match encode_new_header(&preamble, &content, &mac_key) {
                Ok(bytes) => break bytes,
                Err(FormatError::NoRoom { need, .. })
                    if need <= crate::format::header::MAX_SLOT_SIZE =>
                {
                    preamble.slot_size = need;
                }
                Err(e) => return Err(Error::format(path, e)),
            }
        };
        let cipher = BlockCipher::new(&kdf::content_key(dek, &file_id), file_id);
        let bs = preamble.block_size as usize;
        let blocks: Vec<(u64, &[u8])> = if data.is_empty() {
            vec![(0, &[][..])]
        } else {
            data.chunks(bs)
                .enumerate()
                .map(|(i, c)| (i as u64, c))
                .collect()
        };
        let last = blocks.len() as u64 - 1;
        bytes.extend_from_slice(&seal_blocks(&cipher, &blocks, last));
        Ok(NewObject {
            preamble,
            content,
            mac_key,
            cipher,
            bytes,
        })
    }

    /// The new file id (a renewal's record is named after it).
    pub(crate) fn file_id(&self) -> [u8; 16] {
        self.preamble.file_id
    }

    fn layout(&self) -> Layout {
        Layout {
            data_offset: self.preamble.data_offset(),
            block_size: self.preamble.block_size,
        }
    }
}

/// The complete bytes of a new object that is not a file (a symlink with its target as
/// `data`, a special file, a directory record) at `path`: its data key is wrapped under the
/// volume, so this costs no key call.
pub fn encode_object(
    volume: &Volume,
    path: &CanonicalPath,
    attrs: Attrs,
    data: &[u8],
) -> Result<Vec<u8>> {
    debug_assert!(!attrs.kind.uses_key_service());
    let (dek, wrapped) = volume.object_data_key(path);
    Ok(NewObject::make(volume, path, &dek, wrapped, attrs, data)?.bytes)
}

/// The record of directory `dir`: a path beneath it, with a reserved name.
pub fn dir_record(dir: &CanonicalPath) -> CanonicalPath {
    dir.join(crate::format::object::DIR_RECORD.as_bytes())
        .expect("the record's name is a valid name")
}

/// A file's attributes with mode `mode`, owned by the user running this (for files made
/// outside a mount: `import`).
pub fn own_file_attrs(mode: u32) -> Attrs {
    Attrs {
        kind: crate::format::header::ObjectKind::File,
        mode,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
        rdev: 0,
    }
}

/// Makes the directory `path` with `attrs` (a `Dir`), with its record, outside a mount.
pub fn make_dir(volume: &Volume, path: &CanonicalPath, attrs: Attrs) -> Result<()> {
    let bytes = encode_object(volume, &dir_record(path), attrs, &[])?;
    volume
        .backing()
        .make_dir(path, crate::format::object::DIR_RECORD, &bytes)
        .map_err(|e| Error::io(format!("cannot create {path}"), e))?;
    Ok(())
}

/// Whether `path` names a directory record.
pub fn is_dir_record(path: &CanonicalPath) -> bool {
    path.as_str()
        .rsplit('/')
        .next()
        .is_some_and(|name| name == crate::format::object::DIR_RECORD)
}

/// Gives the volume root its record, with the mode and owner the backing root has now (what
/// the mount showed before the volume had one). For `init`.
pub fn write_root_record(volume: &Volume) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let root = CanonicalPath::root();
    let meta = volume
        .backing()
        .root_metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", volume.root().display()), e))?;
    let attrs = Attrs {
        kind: crate::format::header::ObjectKind::Dir,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
    };
    let record = dir_record(&root);
    let bytes = encode_object(volume, &record, attrs, &[])?;
    volume
        .backing()
        .write_new(&record, &bytes)
        .map_err(|e| Error::io(format!("cannot create {record}"), e))?;
    Ok(())
}

/// Opens the regular backing file of `path` (anything else there is refused); one opened
/// only to read does not update its access time (`O_NOATIME`, where the caller owns the file
/// or is root), so reading a volume, through a read-only mount or an export, writes nothing to
/// the backing store.
pub fn open_backing(volume: &Volume, path: &CanonicalPath, writable: bool) -> Result<File> {
    let atime = if writable { Atime::Update } else { Atime::Keep };
    volume
        .backing()
        .open_file(path, writable, atime)
        .map_err(|e| Error::io(format!("cannot open {path}"), e))
}

/// The error for a header whose slot in force does not bind `path`: naming where it is bound.
fn moved(path: &CanonicalPath, envelopes: &[Envelope]) -> Error {
    let mut bound: Vec<&str> = envelopes.iter().map(|e| e.path.as_str()).collect();
    bound.dedup();
    Error::Moved {
        path: path.to_string(),
        bound: bound.join(", "),
    }
}

/// What a slot change writes: the attributes and the envelopes (the generation is the next).
pub type NewSlot = (Attrs, Vec<Envelope>);

/// A slot change that sees the envelope sets (newest first) and keeps the attributes.
pub fn envelope_change(
    mut change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
) -> impl FnMut(&[&SlotContent]) -> Result<Option<NewSlot>> {
    move |slots: &[&SlotContent]| {
        let sets: Vec<&[Envelope]> = slots.iter().map(|c| &c.envelopes[..]).collect();
        Ok(change(&sets)?.map(|envelopes| (slots[0].attrs, envelopes)))
    }
}

/// A slot change that sees the attributes in force and keeps the envelopes.
pub fn attrs_change(
    mut change: impl FnMut(Attrs) -> Option<Attrs>,
) -> impl FnMut(&[&SlotContent]) -> Result<Option<NewSlot>> {
    move |slots: &[&SlotContent]| {
        let current = slots[0];
        Ok(change(current.attrs)
            .filter(|a| *a != current.attrs)
            .map(|a| (a, current.envelopes.clone())))
    }
}

/// Changes a file's envelope set with no data key (see [`update_slot`]).
pub fn update_envelopes(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    both_slots: bool,
    change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
) -> Result<Option<(usize, SlotContent)>> {
    update_slot(volume, file, path, both_slots, envelope_change(change))
}

/// Changes an object's slot with no data key: under the file's advisory lock, read the
/// header, let `change` see the slots whose MAC verifies under the key `mac_key` gives for the
/// file id (the volume-derived header key), newest first, and write the attributes and
/// envelopes it returns to the slot not in force with the next generation, made durable before
/// it counts. With `both_slots` the content is then written over the older slot too (next
/// generation again), so no slot keeps envelopes that are gone: a rename's dropped name, or a
/// rewrap's retired key. Returns the slot now in force and its content, or None when `change`
/// left the slot as it was. Slots too small for what `change` returns are grown first
/// ([`super::renew::grow`]), and `change` runs again on the header as it is then.
pub fn update_slot(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    both_slots: bool,
    change: impl FnMut(&[&SlotContent]) -> Result<Option<NewSlot>>,
) -> Result<Option<(usize, SlotContent)>> {
    rewrite_slot(volume, file, path, true, both_slots, change)
}

/// [`update_envelopes`] of a file whose slot in force does not bind `path` (where it is now):
/// only for `adopt`, whose `change` checks the path it was bound to.
pub fn update_envelopes_of_moved(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
) -> Result<Option<(usize, SlotContent)>> {
    rewrite_slot(volume, file, path, false, true, envelope_change(change))
}

/// How many times one header change grows the slots before it gives up (another mount may
/// add names between a growth and the change that needed it).
pub(crate) const GROW_TRIES: usize = 3;

/// See [`update_slot`]. With `bound`, the slot in force must bind `path`: the header read is
/// the one the caller authenticated at that path, not another object's put in its place on
/// the store (whose slots the volume's MAC key would otherwise re-sign with the caller's
/// change: a chmod through a user's own file must never write another file's mode).
fn rewrite_slot(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    bound: bool,
    both_slots: bool,
    mut change: impl FnMut(&[&SlotContent]) -> Result<Option<NewSlot>>,
) -> Result<Option<(usize, SlotContent)>> {
    let mut grown = 0;
    loop {
        match rewrite_slot_once(volume, file, path, bound, both_slots, &mut change) {
            Err(Error::Format {
                source: FormatError::NoRoom { need, .. },
                ..
            }) if grown < GROW_TRIES => {
                super::renew::grow(volume, file, path, need, None, Step::Done)?;
                grown += 1;
            }
            other => return other,
        }
    }
}

fn rewrite_slot_once(
    volume: &Volume,
    file: &File,
    path: &CanonicalPath,
    bound: bool,
    both_slots: bool,
    change: impl FnOnce(&[&SlotContent]) -> Result<Option<NewSlot>>,
) -> Result<Option<(usize, SlotContent)>> {
    let _lock = volume
        .backing()
        .lock_header(file)
        .map_err(|e| Error::io(format!("cannot lock the header of {path}"), e))?;
    let header = read_header_only(file, path)?;
    let mac_key = volume.header_mac_key(&header.preamble.file_id);
    let authentic = header.authentic(&mac_key);
    let Some(&(_, current)) = authentic.first() else {
        return Err(Error::format(
            path,
            FormatError::HeaderAuthFailed("no slot with a valid MAC".into()),
        ));
    };
    if bound && !current.envelopes.iter().any(|e| &e.path == path) {
        return Err(moved(path, &current.envelopes));
    }
    write_slot_change(
        file,
        path,
        &header.preamble,
        &authentic,
        &mac_key,
        true,
        both_slots,
        change,
    )
}

/// The second half of [`rewrite_slot`], under the header lock, on the header just read:
/// `change` given the authentic slots (newest first: the first is the one in force), and what
/// it returns written to the other slot (both, with `both_slots`).
#[allow(clippy::too_many_arguments)]
fn write_slot_change(
    file: &File,
    path: &CanonicalPath,
    preamble: &Preamble,
    authentic: &[(usize, &SlotContent)],
    mac_key: &DerivedKey,
    durable: bool,
    both_slots: bool,
    change: impl FnOnce(&[&SlotContent]) -> Result<Option<NewSlot>>,
) -> Result<Option<(usize, SlotContent)>> {
    let (slot, current) = authentic[0];
    let slots: Vec<&SlotContent> = authentic.iter().map(|(_, c)| *c).collect();
    let Some((attrs, envelopes)) = change(&slots)? else {
        return Ok(None);
    };
    let mut generation = current.generation;
    let mut target = slot;
    for _ in 0..if both_slots { 2 } else { 1 } {
        target = 1 - target;
        generation += 1;
        let content = SlotContent {
            generation,
            attrs,
            envelopes: envelopes.clone(),
        };
        let sealed = seal_slot(preamble, &content, mac_key).map_err(|e| Error::format(path, e))?;
        file.write_all_at(&sealed, preamble.slot_offset(target))
            .and_then(|_| if durable { file.sync_data() } else { Ok(()) })
            .map_err(|e| Error::io(format!("cannot write the header of {path}"), e))?;
    }
    Ok(Some((
        target,
        SlotContent {
            generation,
            attrs,
            envelopes,
        },
    )))
}

/// Reads and parses the header region of a backing file (no key needed); also returns the
/// file's length.
pub fn read_header(file: &File, path: &CanonicalPath) -> Result<(Header, u64)> {
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot read {path}"), e))?
        .len();
    Ok((read_header_only(file, path)?, len))
}

/// How much of a file a header read takes at first: the preamble says how long the header
/// is, and most are shorter than this, so one read does.
const HEADER_READ: usize = 4096;

/// [`read_header`] without the length: one read for most headers, no `stat`.
pub fn read_header_only(file: &File, path: &CanonicalPath) -> Result<Header> {
    let io = |e| Error::io(format!("cannot read {path}"), e);
    let mut head = vec![0u8; HEADER_READ];
    let mut got = read_up_to(file, &mut head, 0).map_err(io)?;
    let pre = &head[..got.min(crate::format::header::PREAMBLE_LEN)];
    let preamble = Preamble::decode(pre).map_err(|e| Error::format(path, e))?;
    let want = usize::try_from(preamble.data_offset()).unwrap_or(usize::MAX);
    if want > got && got == head.len() {
        head.resize(want, 0);
        got += read_up_to(file, &mut head[got..], got as u64).map_err(io)?;
    }
    head.truncate(want.min(got));
    Header::parse(&head).map_err(|e| Error::format(path, e))
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns how much it read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes `data` as the file at `path`, atomically: a temporary file in the same backing
/// directory, fsynced, renamed over nothing (an existing file is refused), directory fsynced.
pub fn write_new_file(
    volume: &Volume,
    path: &CanonicalPath,
    data: &mut dyn std::io::Read,
) -> Result<u64> {
    write_new_file_as(volume, path, data, own_file_attrs(0o600))
}

/// [`write_new_file`] with the given attributes.
pub fn write_new_file_as(
    volume: &Volume,
    path: &CanonicalPath,
    data: &mut dyn std::io::Read,
    attrs: Attrs,
) -> Result<u64> {
    let backing = volume.backing();
    if backing.exists(path) {
        return Err(Error::Refused(format!("{path} already exists")));
    }
    let dir = path.parent().unwrap_or_else(CanonicalPath::root);
    if !backing.metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Err(Error::Refused(format!(
            "the parent directory of {path} does not exist"
        )));
    }
    let tmp = backing
        .new_temporary_file(&dir, 0o600)
        .map_err(|e| Error::io(format!("cannot create a file next to {path}"), e))?;
    let file = tmp
        .file()
        .try_clone()
        .map_err(|e| Error::io("cannot clone a file handle", e))?;
    let mut enc = EncryptedFile::create(volume, path, file, attrs)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("cannot read the input", e)),
        };
        enc.write_at(enc.size(), &buf[..n])?;
    }
    enc.sync()?;
    let size = enc.size();
    volume.tag_kind(tmp.file(), path, attrs.kind);
    tmp.persist_noclobber(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::Refused(format!("{path} already exists")),
        _ => Error::io(format!("cannot create {path}"), e),
    })?;
    backing
        .sync_dir(&dir)
        .map_err(|e| Error::io(format!("cannot sync the directory of {path}"), e))?;
    Ok(size)
}

/// What a `stat` needs from an object's header, learnt with no key call.
#[derive(Debug, Clone)]
pub struct HeaderFacts {
    /// The attributes in force for the path asked about.
    pub attrs: Attrs,
    pub layout: Layout,
    /// The file id (authenticated: the slot MAC's key is derived from it). A directory
    /// record's is the directory's id, which its entries' names are encrypted under.
    pub file_id: [u8; 16],
    /// Every path the slot in force binds (the object's names, or names it is gaining).
    pub paths: Vec<CanonicalPath>,
}

/// Reads an object's header through `file` (of length `len`) and returns what the newest slot
/// that authenticates and binds `path` says: the same slot an open would use. A header that
/// binds `path` in no authentic slot (moved or swapped on the store, or not kmsfs's) is an
/// error, so nothing about it is shown.
pub fn header_facts(
    volume: &Volume,
    file: &File,
    len: u64,
    path: &CanonicalPath,
) -> Result<HeaderFacts> {
    let io = |e| Error::io(format!("cannot read {path}"), e);
    // One read covers the header of any object with slots up to 2 KiB (nearly all).
    let mut head = vec![0u8; (len as usize).min(4096)];
    file.read_exact_at(&mut head, 0).map_err(io)?;
    let preamble = Preamble::decode(&head).map_err(|e| Error::format(path, e))?;
    let end = preamble.data_offset().min(len) as usize;
    if end > head.len() {
        head.resize(end, 0);
        file.read_exact_at(&mut head[4096..], 4096).map_err(io)?;
    }
    let header = Header::parse(&head).map_err(|e| Error::format(path, e))?;
    let layout = preamble.layout();
    let mac_key = volume.header_mac_key(&preamble.file_id);
    // Newest first; each MAC checked only if the slot before it did not serve.
    let mut authentic = Vec::new();
    let mut chosen = None;
    for (slot, content) in header.candidates() {
        if header.verify_mac(slot, &mac_key) {
            authentic.push((slot, content));
            if content.envelopes.iter().any(|e| &e.path == path) {
                chosen = Some((slot, content));
                break;
            }
        }
    }
    match chosen {
        Some((_, content)) => {
            let mut paths: Vec<CanonicalPath> =
                content.envelopes.iter().map(|e| e.path.clone()).collect();
            paths.sort();
            paths.dedup();
            Ok(HeaderFacts {
                attrs: content.attrs,
                layout,
                file_id: preamble.file_id,
                paths,
            })
        }
        None if authentic.is_empty() => Err(Error::format(
            path,
            FormatError::HeaderAuthFailed("no slot with a valid MAC".into()),
        )),
        None => Err(moved(path, &authentic[0].1.envelopes)),
    }
}

/// Renewal: the same backing inode gets a new file id, data key and commitment.
impl EncryptedFile {
    /// A new identity for this file under `dek` (fresh from `GenerateDataKey`), with
    /// `envelopes` (one per bound path and trusted key). The slot size never shrinks, so every
    /// name the file has still fits; it grows if the new envelopes need it.
    pub(crate) fn renewal(
        &self,
        volume: &Volume,
        dek: &DataKey,
        envelopes: Vec<Envelope>,
    ) -> Result<NewObject> {
        // The attributes stay as they are.
        NewObject::build(
            volume,
            &self.path,
            dek,
            envelopes,
            self.content.attrs,
            &[],
            self.preamble.slot_size,
        )
    }

    /// Refuses (ENOSPC, EFBIG) growth to `new_size` the backing filesystem cannot hold, as a
    /// growing write or `set_len` would: checked before the seal count (`super::instance`).
    pub(crate) fn check_growth(&self, new_size: u64) -> Result<()> {
        if new_size > self.size {
            self.check_room_to_grow(new_size)?;
        }
        Ok(())
    }

    /// The open file is now `renewal` (its bytes are on disk): empty, under the new key.
    pub(crate) fn adopt_renewal(&mut self, renewal: NewObject) {
        // A renewal is made durable before it is adopted.
        self.durable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.layout = renewal.layout();
        self.preamble = renewal.preamble;
        self.cipher = renewal.cipher;
        self.mac_key = renewal.mac_key;
        self.content = renewal.content;
        self.active_slot = 0;
        self.size = 0;
    }
}
