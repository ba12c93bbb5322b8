//! Warm caches: what makes a walk cheap without changing what it returns.
//!
//! [`Layouts`] remembers each file's block layout after its first stat, so a repeated walk
//! reads no preambles; [`Prefetch`] unwraps the keys of a directory's files in the background
//! when one of them is opened cold. Both are bounded and both only ever save work: a stat
//! still stats, and an open still authenticates the header it reads.

use super::*;

/// Block layouts (header size, block size) of files whose preamble a stat has read, by backing
/// file identity (device, inode, birth time): a preamble never changes for the life of a
/// backing file, so the next stat of it (`ls -l` then `rm -rf`, a second walk) reads nothing.
/// A file rewritten in place on the backing store keeps its identity and could be sized from
/// the old preamble; reading it still authenticates the real header. Bounded; where the
/// filesystem has no birth time nothing is remembered.
#[derive(Default)]
pub(super) struct Layouts(
    Mutex<HashMap<(u64, u64, std::time::Duration), crate::format::block::Layout>>,
);

impl Layouts {
    const MAX: usize = 200_000;

    fn get(&self, id: &(u64, u64, std::time::Duration)) -> Option<crate::format::block::Layout> {
        self.0.lock().unwrap().get(id).copied()
    }

    fn put(&self, id: (u64, u64, std::time::Duration), layout: crate::format::block::Layout) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(id, layout);
    }
}

/// Key prefetch for a directory being read: when a file is opened cold, the data keys of the
/// other files in its directory are unwrapped in the background (in parallel, under the
/// keyring's concurrency limit) into the key cache, so a walk that reads every file waits for
/// one key-service round trip per directory rather than per file. Bounded: at most `limit`
/// files per directory, each directory once per `every`, at most `MAX_JOBS` directories at a
/// time; a walk that only lists (`ls -lR`) never triggers it.
pub(super) struct Prefetch {
    pub(super) limit: usize,
    pub(super) every: std::time::Duration,
    pub(super) recent: Mutex<HashMap<CanonicalPath, std::time::Instant>>,
    pub(super) jobs: Arc<AtomicU64>,
}

impl Prefetch {
    const MAX_JOBS: u64 = 4;
    const THREADS: usize = 16;
}

/// A backing file's identity for [`Layouts`]: device, inode and birth time (None where the
/// filesystem keeps no birth time).
pub(super) fn layout_identity(meta: &fs::Metadata) -> Option<(u64, u64, std::time::Duration)> {
    meta.created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|born| (meta.dev(), meta.ino(), born))
}

/// Unwraps into the key cache the data keys of up to `limit` regular files in `dir` (other
/// than `skip`), reading only their headers (without touching access times).
pub(super) fn prefetch_dir(
    volume: &Volume,
    dir: &CanonicalPath,
    skip: &CanonicalPath,
    limit: usize,
) {
    let Ok(names) = volume.backing().list_dir(dir, Atime::Keep) else {
        return;
    };
    let mut files: Vec<CanonicalPath> = names
        .into_iter()
        .filter(|e| e.kind == libc::DT_REG || e.kind == libc::DT_UNKNOWN)
        .map(|e| e.name)
        .filter(|n| !is_reserved_name(n.as_bytes(), dir.is_root()))
        .filter_map(|n| dir.join(n.as_bytes()).ok())
        .filter(|p| p != skip)
        .collect();
    files.sort();
    files.truncate(limit);
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..Prefetch::THREADS.min(files.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(p) = files.get(i) else { return };
                let _ = prefetch_key(volume, p);
            });
        }
    });
}

/// One file's key into the cache (nothing for anything but an authentic file here).
pub(super) fn prefetch_key(volume: &Volume, path: &CanonicalPath) -> Result<()> {
    if !volume.backing().metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let file = crate::core::file::open_backing(volume, path, false)?;
    let (header, _) = read_header(&file, path)?;
    let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
    let Some((_, slot)) = authentic.first() else {
        return Ok(());
    };
    let mine: Vec<_> = slot
        .envelopes
        .iter()
        .filter(|e| &e.path == path)
        .map(|e| &e.key)
        .collect();
    if !mine.is_empty() {
        volume
            .keyring()
            .unwrap(&mine, &volume.file_context(path))
            .map_err(|e| Error::key(path, e))?;
    }
    Ok(())
}

impl KmsFs {
    /// Files per directory whose keys a cold open prefetches (0: none).
    pub fn set_key_prefetch(&mut self, files: usize) {
        self.prefetch.limit = files;
    }

    /// Starts prefetching the keys of the files beside `path` (see [`Prefetch`]).
    pub(super) fn prefetch_beside(&self, path: &CanonicalPath) {
        let p = &self.prefetch;
        let Some(dir) = path.parent() else { return };
        if p.limit == 0 || p.jobs.load(Ordering::Relaxed) >= Prefetch::MAX_JOBS {
            return;
        }
        {
            let now = std::time::Instant::now();
            let mut recent = p.recent.lock().unwrap();
            if recent
                .get(&dir)
                .is_some_and(|t| now.duration_since(*t) < p.every)
            {
                return;
            }
            if recent.len() > 4096 {
                recent.retain(|_, t| now.duration_since(*t) < p.every);
            }
            recent.insert(dir.clone(), now);
        }
        p.jobs.fetch_add(1, Ordering::Relaxed);
        let (volume, jobs, limit, skip) =
            (self.volume.clone(), p.jobs.clone(), p.limit, path.clone());
        let spawned = std::thread::Builder::new()
            .name("kmsfs-prefetch".into())
            .spawn(move || {
                prefetch_dir(&volume, &dir, &skip, limit);
                jobs.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            p.jobs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Before a directory's first listing with attributes: if its files' layouts are not known
    /// (a fresh mount, a cold cache), read their preambles on a few threads at once, so the
    /// disk sees them in parallel rather than one per entry as the listing goes.
    pub(super) fn warm_layouts(&self, dir: &CanonicalPath, entries: &[DirEntry]) {
        const THREADS: usize = 4;
        let files: Vec<CanonicalPath> = entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| dir.join(e.name.as_bytes()).ok())
            .collect();
        if files.len() < 2 * THREADS {
            return;
        }
        // One file tells whether this directory was seen already.
        let known = self
            .store()
            .metadata(&files[0])
            .ok()
            .and_then(|m| layout_identity(&m))
            .is_some_and(|id| self.layouts.get(&id).is_some());
        if known {
            return;
        }
        std::thread::scope(|s| {
            for part in files.chunks(files.len().div_ceil(THREADS)) {
                s.spawn(move || {
                    for p in part {
                        let _ = self.stat_path(p);
                    }
                });
            }
        });
    }

    /// The plaintext size of a regular file: from its open instance, else from its preamble
    /// and length (one 64-byte read, no key; remembered, see [`Layouts`]).
    pub(super) fn plaintext_size(
        &self,
        ino: u64,
        path: &CanonicalPath,
        meta: &fs::Metadata,
        found: Option<&crate::backing::Found>,
    ) -> Result<u64> {
        let len = meta.len();
        if let Some(node) = self.open_node(ino) {
            return Ok(node.size());
        }
        let identity = layout_identity(meta);
        if let Some(layout) = identity.and_then(|id| self.layouts.get(&id)) {
            return layout
                .plaintext_len(len)
                .map_err(|e| Error::format(path, e));
        }
        // A stat is not an access: the preamble read leaves the access time alone. It reads
        // the inode just stat'ed (through its descriptor, if the caller kept it), or fails.
        let file = match found {
            Some(found) => found.open_read(),
            None => self
                .store()
                .open_file_expecting(path, false, Atime::Keep, Identity::of(meta)),
        }
        .map_err(|e| io_err("cannot open", path, e))?;
        let mut pre = [0u8; crate::format::header::PREAMBLE_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut pre, 0)
            .map_err(|_| os(format!("{path}: shorter than a header"), libc::EIO))?;
        let pre = Preamble::decode(&pre).map_err(|e| Error::format(path, e))?;
        let layout = crate::format::block::Layout {
            data_offset: pre.data_offset(),
            block_size: pre.block_size,
        };
        if let Some(id) = identity {
            self.layouts.put(id, layout);
        }
        layout
            .plaintext_len(len)
            .map_err(|e| Error::format(path, e))
    }
}
