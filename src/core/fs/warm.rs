//! Warm caches: what makes a walk cheap without changing what it returns.
//!
//! [`Facts`] remembers what each object's header said (its authenticated attributes, block
//! layout and bound names) after its first stat, so a repeated walk reads no headers; a
//! listing takes its entries' kinds from their kind tags (see [`crate::format::kind_tag`]) and
//! reads only the headers of those without a tag that verifies;
//! [`Prefetch`] unwraps the keys of a directory's files in the background when one of them is
//! opened cold. Both are bounded and both only ever save work: a stat still stats, and an open
//! still authenticates the header it reads.

use super::*;
use crate::core::file::{header_facts, HeaderFacts};
use crate::format::header::{Attrs, ObjectKind};

/// What headers said, by backing inode: valid while the backing file keeps its identity
/// (device, birth time) and its change time, which every write to it moves (a header rewrite
/// by kmsfs or anyone else). Everything remembered was authenticated when read, so a stale
/// entry can only show an earlier authentic state of that object (the rollback docs/SECURITY.md
/// describes), never something kmsfs did not write. Bounded.
#[derive(Default)]
pub(super) struct Facts(
    Mutex<HashMap<u64, (FactsStamp, HeaderFacts)>>,
    /// Kinds kind tags told, by backing inode, with a hash of the path the tag verified at:
    /// a listing again needs no tag read. (An object's kind is its inode's for good, unless
    /// the store's writer puts another object's content in it: then this shows the earlier,
    /// authentic kind, as a stale header fact would.)
    Mutex<HashMap<u64, (u64, ObjectKind)>>,
);

/// When a remembered header is still the one on disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct FactsStamp {
    dev: u64,
    born: std::time::Duration,
    changed: (i64, i64),
    len: u64,
}

impl FactsStamp {
    /// None where the filesystem keeps no birth time (nothing is remembered there).
    pub(super) fn of(meta: &fs::Metadata) -> Option<Self> {
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())?;
        Some(FactsStamp {
            dev: meta.dev(),
            born,
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
        })
    }
}

impl Facts {
    const MAX: usize = 200_000;

    fn get(&self, ino: u64, stamp: &FactsStamp) -> Option<HeaderFacts> {
        let map = self.0.lock().unwrap();
        map.get(&ino)
            .filter(|(s, _)| s == stamp)
            .map(|(_, f)| f.clone())
    }

    /// The kind remembered for backing inode `ino` listed as `path`, for a listing: only if
    /// the header remembered binds that name (an inode linked elsewhere on the store, a
    /// directory's record above all, tells nothing about this one).
    pub(super) fn kind(&self, ino: u64, path: &CanonicalPath) -> Option<ObjectKind> {
        let from_header = self
            .0
            .lock()
            .unwrap()
            .get(&ino)
            .filter(|(_, f)| f.paths.contains(path) && f.attrs.kind != ObjectKind::Dir)
            .map(|(_, f)| f.attrs.kind);
        from_header.or_else(|| {
            let at = path_hash(path);
            self.1
                .lock()
                .unwrap()
                .get(&ino)
                .filter(|(h, _)| *h == at)
                .map(|(_, k)| *k)
        })
    }

    /// Whether what the header of backing inode `ino`, listed as `path`, said is remembered
    /// (maybe stale: only a stat tells).
    pub(super) fn knows(&self, ino: u64, path: &CanonicalPath) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(&ino)
            .is_some_and(|(_, f)| f.paths.contains(path))
    }

    /// Remembers that the kind tag of backing inode `ino` verified as `kind` at `path`.
    pub(super) fn put_tagged(&self, ino: u64, path: &CanonicalPath, kind: ObjectKind) {
        let mut map = self.1.lock().unwrap();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(ino, (path_hash(path), kind));
    }

    /// Forgets what the header of backing inode `ino` said (kmsfs just rewrote it: its change
    /// time may not have moved at the clock's granularity).
    pub(super) fn forget(&self, ino: u64) {
        self.0.lock().unwrap().remove(&ino);
        self.1.lock().unwrap().remove(&ino);
    }

    fn put(&self, ino: u64, stamp: FactsStamp, facts: HeaderFacts) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(ino, (stamp, facts));
    }
}

/// A path's hash, keyed per process (a store's writer cannot aim for a collision).
fn path_hash(path: &CanonicalPath) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(path.as_str())
}

/// Key prefetch for a walk that reads files (a backup, `grep -r`, `find -exec cat`): when a
/// file is opened cold, the data keys of the files after it in walk order (the rest of its
/// directory, then the next directories depth-first, each in listing order, as `find` and
/// `tar` go) are unwrapped in the background into the key cache, on as many threads as the
/// keyring lets run at once, so the walk finds its keys there rather than waiting for one
/// key-service round trip per file. Bounded: at most `limit` files whose keys were fetched and
/// that have not been opened since (`ahead`; opening one file again and again, or files
/// elsewhere, does not let a walk on), and it stops when none of those is opened for
/// [`Prefetch::STALL`], after `DIRS_PER_WALK` directories, or at the end of the volume; each
/// directory once per `every`, at most `MAX_JOBS` walks at a time. A walk that only lists
/// (`ls -lR`) never starts it. (Cloned for a walk: its state is shared.)
#[derive(Clone)]
pub(super) struct Prefetch {
    pub(super) limit: usize,
    pub(super) every: std::time::Duration,
    pub(super) recent: Arc<Mutex<HashMap<CanonicalPath, std::time::Instant>>>,
    pub(super) jobs: Arc<AtomicU64>,
    /// Files whose keys a walk fetched, not opened since.
    pub(super) ahead: Arc<Mutex<std::collections::HashSet<CanonicalPath>>>,
    /// Opens of files in `ahead` so far: how far the walks have come.
    pub(super) reached: Arc<AtomicU64>,
}

impl Prefetch {
    const MAX_JOBS: u64 = 4;
    /// A walk that opens nothing for this long has ended or gone elsewhere.
    const STALL: std::time::Duration = std::time::Duration::from_secs(2);
    /// Most directories one walk enters (a tree of empty directories costs no key call, but
    /// listing it all would be work for nothing).
    const DIRS_PER_WALK: usize = 4096;
    /// Most directories remembered as gone through.
    const MAX_RECENT: usize = 16_384;
}

/// Where a prefetch walk is: the directories entered, each with its entries still to visit
/// (sorted as listings are), deepest last.
struct WalkOrder<'a> {
    volume: &'a Volume,
    stack: Vec<(
        CanonicalPath,
        std::collections::VecDeque<crate::backing::Entry>,
    )>,
    /// The directory the walk climbs out of next, once the stack is empty.
    climb: Option<CanonicalPath>,
    /// Directories listed so far.
    entered: usize,
}

impl<'a> WalkOrder<'a> {
    /// The walk from `dir` on: its entries, then what follows it in its parent, and so on up.
    fn from(volume: &'a Volume, dir: &CanonicalPath) -> Self {
        let mut walk = WalkOrder {
            volume,
            stack: Vec::new(),
            climb: Some(dir.clone()),
            entered: 0,
        };
        walk.enter(dir, None);
        walk
    }

    /// Pushes `dir`'s entries (those after its entry `after`, if any).
    fn enter(&mut self, dir: &CanonicalPath, after: Option<&CanonicalPath>) {
        self.entered += 1;
        let Ok(mut entries) = self.volume.backing().list_dir(dir, Atime::Keep) else {
            return;
        };
        entries.retain(|e| !self.volume.is_own_name(e.name.as_bytes(), dir.is_root()));
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut entries: std::collections::VecDeque<_> = entries.into();
        if let Some(after) = after {
            let at = entries
                .iter()
                .position(|e| dir.join(e.name.as_bytes()).ok().as_ref() == Some(after));
            if let Some(at) = at {
                entries.drain(..=at);
            }
        }
        self.stack.push((dir.clone(), entries));
    }

    /// The next file in walk order (`entered` is told of each directory gone into).
    fn next_file(&mut self, entered: &mut dyn FnMut(&CanonicalPath)) -> Option<CanonicalPath> {
        loop {
            if self.entered >= Prefetch::DIRS_PER_WALK {
                return None;
            }
            let Some((dir, entries)) = self.stack.last_mut() else {
                // Out of the start directory's subtree: on with its parent, after it.
                let from = self.climb.take()?;
                let parent = from.parent()?;
                self.enter(&parent, Some(&from));
                self.climb = Some(parent);
                continue;
            };
            let Some(e) = entries.pop_front() else {
                self.stack.pop();
                continue;
            };
            let Ok(path) = dir.join(e.name.as_bytes()) else {
                continue;
            };
            match e.kind {
                libc::DT_DIR => {
                    entered(&path);
                    self.enter(&path, None);
                }
                libc::DT_REG | libc::DT_UNKNOWN => return Some(path),
                _ => {}
            }
        }
    }
}

/// Unwraps into the key cache the data keys of the files after `from` (opened cold in
/// `dir`) in walk order, with at most `p.limit` of them fetched and not yet opened, until the
/// opens stop (see [`Prefetch`]). Reads only headers, without touching access times.
fn walk_ahead(volume: &Volume, dir: &CanonicalPath, from: &CanonicalPath, p: &Prefetch) {
    let limit = p.limit;
    let (ahead, reached, recent) = (&*p.ahead, &*p.reached, &*p.recent);
    let mut walk = WalkOrder::from(volume, dir);
    let threads = volume.keyring().concurrency().clamp(1, 64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<CanonicalPath>(threads);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = rx.lock().unwrap().recv();
                let Ok(p) = next else { return };
                let _ = prefetch_key(volume, &p);
            });
        }
        let mut sent: Vec<CanonicalPath> = Vec::new();
        let (mut last, mut progress) = (reached.load(Ordering::Relaxed), std::time::Instant::now());
        let mut mark = |d: &CanonicalPath| {
            let mut recent = recent.lock().unwrap();
            if recent.len() >= Prefetch::MAX_RECENT {
                recent.clear();
            }
            recent.insert(d.clone(), std::time::Instant::now());
        };
        'walk: while let Some(file) = walk.next_file(&mut mark) {
            if &file == from {
                continue;
            }
            // Not more than `limit` fetched and not opened yet.
            loop {
                let now = reached.load(Ordering::Relaxed);
                if now != last {
                    (last, progress) = (now, std::time::Instant::now());
                }
                if ahead.lock().unwrap().len() < limit {
                    break;
                }
                if progress.elapsed() > Prefetch::STALL {
                    // Directories not gone through are not prefetched: a later open there
                    // starts a walk again.
                    let mut recent = recent.lock().unwrap();
                    for (d, _) in &walk.stack {
                        recent.remove(d);
                    }
                    break 'walk;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            ahead.lock().unwrap().insert(file.clone());
            sent.push(file.clone());
            if tx.send(file).is_err() {
                break;
            }
        }
        drop(tx);
        // What this walk fetched and nobody opened leaves the budget.
        let mut ahead = ahead.lock().unwrap();
        for f in &sent {
            ahead.remove(f);
        }
    });
}

/// One file's key into the cache (nothing for anything but an authentic file here).
pub(super) fn prefetch_key(volume: &Volume, path: &CanonicalPath) -> Result<()> {
    if !volume.backing().metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let file = crate::core::file::open_backing(volume, path, false)?;
    let header = read_header_only(&file, path)?;
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

    /// Notes an open of `path` (a new instance): a walk's progress if it fetched its key, and
    /// unless a prefetch walk has been through its directory lately, starts one from there
    /// (see [`Prefetch`]).
    pub(super) fn prefetch_beside(&self, path: &CanonicalPath) {
        let p = &self.prefetch;
        if p.ahead.lock().unwrap().remove(path) {
            p.reached.fetch_add(1, Ordering::Relaxed);
        }
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
        let (volume, from, shared) = (self.volume.clone(), path.clone(), p.clone());
        let spawned = std::thread::Builder::new()
            .name("kmsfs-prefetch".into())
            .spawn(move || {
                walk_ahead(&volume, &dir, &from, &shared);
                shared.jobs.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            p.jobs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The kinds of the objects in regular backing files of `listing` from entry `from` on,
    /// a window of them (growing with `from`, so a pass is linear): from what a header said
    /// (remembered), else a kind tag that verifies for the entry's path, else its header,
    /// read now. A listing thus reads no header of a tagged object, which a big directory's
    /// `ls -f` or `find` would otherwise wait for once per entry. An object whose header binds
    /// it here but whose tag did not verify (renamed since, made before tags, stripped) is
    /// tagged again on a writable mount, unless it has other names (whose listings would take
    /// turns retagging it); that moves the backing file's change time, as the rename that left
    /// the tag stale did.
    pub(super) fn tell_kinds(&self, listing: &Listing, from: usize) {
        const TELL_AHEAD: usize = 1024;
        let end = (from + from.clamp(64, TELL_AHEAD)).min(listing.entries.len());
        let Some(window) = listing.entries.get(from..end) else {
            return;
        };
        let mut untold: Vec<(&ListingEntry, u64, OsString, &CanonicalPath)> = Vec::new();
        for l in window.iter().filter(|l| l.told.get().is_none()) {
            let (Some(ino), Some(path)) = (l.regular, &l.stored) else {
                continue;
            };
            match (self.facts.kind(ino, path), path.file_name()) {
                (Some(kind), _) => {
                    let _ = l.told.set(Some(Kind::of(kind)));
                }
                (None, Some(name)) => untold.push((l, ino, OsString::from_vec(name), path)),
                (None, None) => {
                    let _ = l.told.set(None);
                }
            }
        }
        if untold.is_empty() {
            return;
        }
        if let Ok(opened) = self.store().open_dir(&listing.dir, Atime::Keep) {
            let tagged = in_parallel(&untold, |(_, _, name, path)| {
                let value = crate::backing::open::entry_xattr(
                    &opened,
                    name,
                    crate::format::kind_tag::XATTR,
                    crate::format::kind_tag::LEN,
                )
                .ok()?;
                self.volume.tagged_kind(path, &value)
            });
            for ((l, ino, _, path), kind) in untold.iter().zip(tagged) {
                if let Some(kind) = kind {
                    self.facts.put_tagged(*ino, path, kind);
                    let _ = l.told.set(Some(Kind::of(kind)));
                }
            }
            untold.retain(|(l, ..)| l.told.get().is_none());
        }
        let retag = !self.read_only;
        let read = in_parallel(&untold, |(_, _, _, path)| {
            let attr = self.stat_path(path).ok()?;
            if retag && attr.kind != Kind::Dir && attr.nlink == 1 {
                // On the inode whose header was just read, not whatever was renamed over it
                // since (which would carry that one's kind for good).
                let tag = self.volume.kind_tag(path, attr.kind.object());
                if let Err(e) = self.store().set_xattr(
                    path,
                    crate::format::kind_tag::XATTR,
                    &tag,
                    0,
                    Some(self.expected(attr.ino)),
                ) {
                    tracing::debug!("{path}: no kind tag kept: {e}");
                }
            }
            Some(attr.kind)
        });
        for ((l, ..), kind) in untold.iter().zip(read) {
            let _ = l.told.set(kind);
        }
    }

    /// Before a `readdirplus` reply from entry `offset` on: the headers of the next entries
    /// (the reply's and those of the replies after it, up to 1024) are read on a few
    /// threads at once unless already read, so the disk sees them in parallel rather than one
    /// per entry as the replies go.
    pub(super) fn warm_ahead(&self, listing: &Listing, offset: usize) {
        // Growing from 64: the first reply of any pass is a `readdirplus` (the kernel's
        // choice), even for an `ls -f` that then goes on with plain replies.
        const WARM_AHEAD: usize = 1024;
        if offset < listing.warmed.load(Ordering::Relaxed) {
            return;
        }
        let end = (offset + offset.clamp(64, WARM_AHEAD)).min(listing.entries.len());
        listing.warmed.store(end, Ordering::Relaxed);
        let Some(window) = listing.entries.get(offset..end) else {
            return;
        };
        // Not those whose headers were read before (a walk after `ls -lR`, an `rm -rf`): the
        // reply's own stat finds them remembered, or reads again one that changed since.
        let objects: Vec<&CanonicalPath> = window
            .iter()
            .filter_map(|l| match (&l.regular, &l.stored) {
                (Some(ino), Some(path)) if !self.facts.knows(*ino, path) => Some(path),
                _ => None,
            })
            .collect();
        in_parallel(&objects, |path| {
            let _ = self.stat_path(path);
        });
    }

    /// The authenticated attributes of the object in the regular backing file `meta` at
    /// `path`, and its size (plaintext bytes of a file, the target's length of a symlink):
    /// from its open instance, else from its header (one read, no key; remembered, see
    /// [`Facts`]). An object its header does not bind to `path` is refused.
    pub(super) fn object_facts(
        &self,
        ino: u64,
        path: &CanonicalPath,
        meta: &fs::Metadata,
        found: Option<&crate::backing::Found>,
    ) -> Result<(Attrs, u64)> {
        // A file whose key has not arrived has no header yet: its instance says what it will
        // say. Any other open file is reported from its header on disk, like any file: another
        // mount of the store may have changed its mode, owner or length since it was opened.
        // (A mount running alone is the only one that changes anything: its instances are.)
        let alone = self.store().runs_alone();
        if let Some(node) = self.open_node(ino).filter(|n| alone || n.is_pending()) {
            if let Some(attrs) = node.attrs_for(path) {
                return Ok((attrs, node.size_for(meta.len())));
            }
        }
        self.header_facts_of(path, meta, found)
            .map(|(attrs, size, _)| (attrs, size))
    }

    /// [`KmsFs::object_facts`] from the header alone (never an open instance), with the
    /// object's file id: a directory record's is the directory's id.
    pub(super) fn header_facts_of(
        &self,
        path: &CanonicalPath,
        meta: &fs::Metadata,
        found: Option<&crate::backing::Found>,
    ) -> Result<(Attrs, u64, [u8; 16])> {
        let stamp = FactsStamp::of(meta);
        let remembered = stamp.and_then(|s| self.facts.get(meta.ino(), &s));
        let facts = match remembered {
            Some(f) if f.paths.contains(path) => f,
            Some(f) => {
                return Err(Error::Moved {
                    path: path.to_string(),
                    bound: f
                        .paths
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
            None => {
                // A stat is not an access: the header read leaves the access time alone. It
                // reads the inode just stat'ed (through its descriptor, if the caller kept
                // it), or fails.
                let file = match found {
                    Some(found) => found.open_read(),
                    None => self.store().open_file_expecting(
                        path,
                        false,
                        Atime::Keep,
                        Identity::of(meta),
                    ),
                }
                .map_err(|e| io_err("cannot open", path, e))?;
                let facts = header_facts(&self.volume, &file, meta.len(), path)?;
                if let Some(stamp) = stamp {
                    self.facts.put(meta.ino(), stamp, facts.clone());
                }
                facts
            }
        };
        let size = match facts.attrs.kind {
            ObjectKind::File | ObjectKind::Symlink => facts
                .layout
                .plaintext_len(meta.len())
                .map_err(|e| Error::format(path, e))?,
            _ => 0,
        };
        Ok((facts.attrs, size, facts.file_id))
    }
}

/// `f` of each of `items`, in order, on up to 16 threads when there are enough items to pay
/// for them (header and attribute reads wait on the disk, not the CPU: 16 read a cold `ls -lR`
/// of the benchmark tree in 1.02 s, 4 in 1.15 s).
/// (A part no thread could be started for is done here, in turn: a listing never fails for
/// want of threads.)
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    const THREADS: usize = 16;
    if items.len() < 2 * THREADS {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(THREADS))
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .spawn_scoped(s, move || part.iter().map(f).collect::<Vec<R>>());
                (part, spawned.ok())
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for (part, spawned) in parts {
            match spawned.map(|h| h.join()) {
                Some(Ok(done)) => out.extend(done),
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => out.extend(part.iter().map(f)),
            }
        }
        out
    })
}
