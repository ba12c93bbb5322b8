//! Rebinding: names and keys move together.
//!
//! A file's data key is bound to its path, so `rename` and `link` first add an envelope for
//! the new path (a `ReEncrypt`: the data key never leaves the key service), then change the
//! name on the backing store, then drop the envelopes of names that are gone; `unlink` of one
//! of several names drops that name's envelopes. Between steps a crash leaves stale envelopes,
//! recorded in the journal (see [`crate::core::journal`]) and tidied at the next writable
//! mount. Header changes go through a [`HeaderHandle`]: the file's open instance if there is
//! one, which must see them, else the backing file, with no data key either way.

use super::*;
use crate::core::journal::{under_way_at, Pending};
use crate::format::envelope::WrappedKey;

/// Where a file's envelope set is changed: its open instance, which must see the change, or
/// else the backing file itself. Neither needs the file's data key (the header MAC key is the
/// volume's), so renaming, linking and tidying a file nobody has open costs no `Decrypt`.
pub(super) enum HeaderHandle {
    Open(Arc<OpenNode>),
    Closed(File),
}

impl HeaderHandle {
    pub(super) fn metadata(&self) -> std::io::Result<fs::Metadata> {
        match self {
            HeaderHandle::Open(node) => node.backing_metadata(),
            HeaderHandle::Closed(file) => file.metadata(),
        }
    }

    /// The envelope set in force.
    pub(super) fn envelopes(&self, volume: &Volume, path: &CanonicalPath) -> Result<Vec<Envelope>> {
        match self {
            HeaderHandle::Open(node) => node.envelopes(),
            HeaderHandle::Closed(file) => {
                let header = read_header_only(file, path)?;
                let authentic = header.authentic(&volume.header_mac_key(&header.preamble.file_id));
                Ok(authentic
                    .first()
                    .map(|(_, c)| c.envelopes.clone())
                    .unwrap_or_default())
            }
        }
    }

    /// See [`crate::core::file::update_envelopes`]; says whether the header changed. What
    /// the header said is forgotten by `facts` (the names it binds change).
    pub(super) fn update(
        &self,
        facts: &super::warm::Facts,
        volume: &Volume,
        path: &CanonicalPath,
        both_slots: bool,
        change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
    ) -> Result<bool> {
        let forget = || {
            if let Ok(m) = self.metadata() {
                facts.forget(m.ino());
            }
        };
        forget();
        let changed = self.update_inner(volume, path, both_slots, change);
        forget();
        changed
    }

    fn update_inner(
        &self,
        volume: &Volume,
        path: &CanonicalPath,
        both_slots: bool,
        change: impl FnMut(&[&[Envelope]]) -> Result<Option<Vec<Envelope>>>,
    ) -> Result<bool> {
        match self {
            // At `path`, where another mount may have renamed it since the instance looked.
            // A header to grow is grown outside the instance's lock (a writer of the file
            // holds that lock and then waits for the data lock, which the growth takes).
            HeaderHandle::Open(node) => {
                let mut change = change;
                let mut grown = 0;
                loop {
                    let changed = node.with_mut(|file| {
                        let _ = file.follow(path);
                        file.update_envelopes(both_slots, &mut change)
                    });
                    match changed {
                        Err(Error::Format {
                            source: crate::format::FormatError::NoRoom { need, .. },
                            ..
                        }) if grown < crate::core::file::GROW_TRIES => {
                            let (file, id) = node.with(|f| {
                                let file = f
                                    .backing_file()
                                    .try_clone()
                                    .map_err(|e| io_err("cannot reopen", path, e))?;
                                Ok((file, f.preamble().file_id))
                            })?;
                            crate::core::renew::grow(
                                volume,
                                &file,
                                path,
                                need,
                                Some(id),
                                crate::core::renew::Step::Done,
                            )?;
                            grown += 1;
                        }
                        other => return other,
                    }
                }
            }
            HeaderHandle::Closed(file) => Ok(crate::core::file::update_envelopes(
                volume, file, path, both_slots, change,
            )?
            .is_some()),
        }
    }

    /// The open instance, if any, now answers to `path`.
    pub(super) fn set_path(&self, path: &CanonicalPath) {
        if let HeaderHandle::Open(node) = self {
            node.set_path(path);
        }
    }
}

/// Envelopes a rename or link will add, made before it takes the volume's namespace lock (see
/// [`KmsFs::premake`]): by (old path, new path), each source envelope's key with the key
/// wrapped for the new path.
#[derive(Default)]
pub(super) struct Premade(Mutex<PremadeKeys>);

type PremadeKeys = HashMap<(CanonicalPath, CanonicalPath), Vec<(WrappedKey, WrappedKey)>>;

impl Premade {
    fn get(
        &self,
        from: &CanonicalPath,
        to: &CanonicalPath,
        source: &WrappedKey,
    ) -> Option<WrappedKey> {
        let made = self.0.lock().unwrap();
        made.get(&(from.clone(), to.clone()))?
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, k)| k.clone())
    }

    fn put(&self, from: &CanonicalPath, to: &CanonicalPath, source: WrappedKey, made: WrappedKey) {
        self.0
            .lock()
            .unwrap()
            .entry((from.clone(), to.clone()))
            .or_default()
            .push((source, made));
    }
}

/// The distinct paths a set of envelopes is bound to (the names a file has, or had).
pub(super) fn envelope_paths(envelopes: &[Envelope]) -> Vec<CanonicalPath> {
    let mut paths: Vec<CanonicalPath> = envelopes.iter().map(|e| e.path.clone()).collect();
    paths.sort();
    paths.dedup();
    paths
}

impl KmsFs {
    /// The handle through which to change the header of the file `ino` at `path`.
    pub(super) fn header_of(&self, ino: u64, path: &CanonicalPath) -> Result<HeaderHandle> {
        // An instance another mount's renewal left behind is not the file's any more: the
        // backing file is changed directly then.
        let node = self.open_node(ino).filter(|n| n.catch_up());
        if let Some(node) = node {
            return Ok(HeaderHandle::Open(node));
        }
        // The inode the caller named (0: whatever file stands there, e.g. a tidy by path).
        let file = if ino == 0 {
            self.store().open_file(path, true, Atime::Update)
        } else {
            self.store()
                .open_file_expecting(path, true, Atime::Update, self.expected(ino))
        };
        file.map(HeaderHandle::Closed)
            .map_err(|e| Error::io(format!("cannot open {path}"), e))
    }

    /// Those of `envelopes` whose path still names the file `me` (and any for `also`, a name
    /// being given to it), or is at or beneath a path a rebind under way names (on another
    /// mount of the store, or this one; but `own`, the caller's): that rebind may be about to
    /// give the file that name, or have just taken it away, and drops what it must itself.
    pub(super) fn live_envelopes(
        &self,
        envelopes: &[Envelope],
        me: &fs::Metadata,
        also: &CanonicalPath,
        own: Option<&Pending>,
    ) -> Vec<Envelope> {
        let names_me = |e: &&Envelope| {
            &e.path == also
                || self
                    .store()
                    .metadata(&e.path)
                    .is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev())
        };
        if envelopes.iter().all(|e| names_me(&e)) {
            return envelopes.to_vec();
        }
        let under_way = self.journal.live_paths(own);
        envelopes
            .iter()
            .filter(|e| names_me(e) || under_way_at(&e.path, &under_way))
            .cloned()
            .collect()
    }

    /// The envelopes renaming or linking `from` to `to` will add: one per envelope for the
    /// file `from`, or for every file beneath the directory `from`, each a `ReEncrypt` made
    /// now, before the caller takes the volume's namespace lock, so that no change of names
    /// elsewhere on the volume (on any mount of it) waits for the key service meanwhile.
    /// Best effort: what is missing when the locked pass comes (a file created or rewrapped
    /// since, a failed call) that pass makes, or fails on.
    pub(super) fn premake(&self, from: &CanonicalPath, to: &CanonicalPath) -> Premade {
        let premade = Premade::default();
        let files = match self.store().metadata(from) {
            Ok(m) if m.is_dir() => self.volume.files_beneath(from).unwrap_or_default(),
            Ok(m) if m.is_file() => vec![from.clone()],
            _ => Vec::new(),
        };
        // (Stops at the first failed call: the locked pass reports it.)
        let _ = self.parallel(&files, |p| {
            let new = Self::moved(p, from, to);
            let Ok(header) = self.header_of(self.ino_at(p), p) else {
                return Ok(());
            };
            let in_force = header.envelopes(&self.volume, p).unwrap_or_default();
            self.make_missing(&in_force, p, &new, &premade)
        });
        premade
    }

    /// Makes (a `ReEncrypt` each) into `premade` the envelopes for `to` that a file whose
    /// envelopes are `in_force` lacks beside its envelopes for `from`, but those it holds.
    fn make_missing(
        &self,
        in_force: &[Envelope],
        from: &CanonicalPath,
        to: &CanonicalPath,
        premade: &Premade,
    ) -> Result<()> {
        for e in in_force.iter().filter(|e| &e.path == from) {
            let bound = in_force
                .iter()
                .any(|o| &o.path == to && o.key.key_id == e.key.key_id);
            if !bound && premade.get(from, to, &e.key).is_none() {
                let made = self.volume.rewrap_for_path(&e.key, from, to)?;
                premade.put(from, to, e.key.clone(), made);
            }
        }
        Ok(())
    }

    /// Adds to a file an envelope for `to` beside each of its envelopes for `from`, taking
    /// those `premade` holds rather than making them again.
    pub(super) fn bind_extra_path(
        &self,
        header: &HeaderHandle,
        from: &CanonicalPath,
        to: &CanonicalPath,
        premade: &Premade,
    ) -> Result<()> {
        // Names this file no longer has (replaced by a rename over them, or a crash between
        // steps) only take header room: drop their envelopes first. Not those a rebind under
        // way names, this one's included: a directory rename binds each name of a file with
        // several beneath it in turn, and the names added first do not exist yet.
        let me = header
            .metadata()
            .map_err(|e| io_err("cannot stat", from, e))?;
        // The new envelopes are made (a ReEncrypt each) before the header is locked (an open
        // instance's lock stops its reads and writes), from the envelopes in force now; the
        // update takes them if those are still in force, else (a rewrap meanwhile) makes them.
        let in_force = header.envelopes(&self.volume, from).unwrap_or_default();
        self.make_missing(&in_force, from, to, premade)?;
        header.update(&self.facts, &self.volume, from, false, |slots| {
            let current = slots[0];
            let mut envelopes = self.live_envelopes(current, &me, from, None);
            let pruned = envelopes.len() != current.len();
            let mut added = Vec::new();
            for e in envelopes.iter().filter(|e| &e.path == from) {
                if envelopes
                    .iter()
                    .any(|o| &o.path == to && o.key.key_id == e.key.key_id)
                {
                    continue;
                }
                let key = match premade.get(from, to, &e.key) {
                    Some(key) => key,
                    None => self.volume.rewrap_for_path(&e.key, from, to)?,
                };
                added.push(Envelope {
                    path: to.clone(),
                    key,
                });
            }
            if added.is_empty() && !pruned {
                return Ok(None);
            }
            envelopes.extend(added);
            Ok(Some(envelopes))
        })?;
        Ok(())
    }

    /// `files`, beneath a directory being renamed, without the empty backing files with no
    /// header: a create a crash cut short, which has no envelope to move (nothing in it was
    /// ever acknowledged: it moves as it is). One another mount is making (its data lock
    /// held) is not left out: its header binds the old path once its key comes, and must
    /// move; the rename waits for it, the namespace lock released (see `rename_or_wait`).
    pub(super) fn without_unfinished_creates(&self, files: Vec<CanonicalPath>) -> Result<Beneath> {
        let mut kept = Vec::with_capacity(files.len());
        for path in files {
            match self.unfinished(&path, |_| Ok(()))? {
                Unfinished::No => kept.push(path),
                Unfinished::LeftByACrash => {}
                Unfinished::UnderWay(lock) => return Ok(Beneath::BeingCreated { path, lock }),
            }
        }
        Ok(Beneath::Files(kept))
    }

    /// Whether `path` is an empty backing file with no header, and whether a create is
    /// making it (another mount's: this mount's own pending files' instances wait for their
    /// keys); `left`, given its identity, runs on one a crash left, while no create can
    /// take it. Called under the namespace lock, which creates hold until their lock is.
    pub(super) fn unfinished(
        &self,
        path: &CanonicalPath,
        left: impl FnOnce(Identity) -> Result<()>,
    ) -> Result<Unfinished> {
        let store = self.store();
        let meta = match store.metadata(path) {
            Ok(m) if m.is_file() && m.len() == 0 => m,
            _ => return Ok(Unfinished::No),
        };
        let id = Identity::of(&meta);
        if self.open_node(self.ino_of(id.ino)).is_some() {
            return Ok(Unfinished::No);
        }
        let file = store
            .open_file_expecting(path, false, Atime::Keep, id)
            .map_err(|e| io_err("cannot open", path, e))?;
        let io = |e| io_err("cannot lock", path, e);
        let lock = crate::backing::DataLock::new(store, &file).map_err(io)?;
        let Some(free) = lock
            .take_within(false, std::time::Duration::ZERO)
            .map_err(io)?
        else {
            return Ok(Unfinished::UnderWay(lock));
        };
        // Still empty, asked of the name, the file and by a read: a network filesystem may
        // answer a stat from attributes it cached before another client wrote.
        let mut byte = [0u8; 1];
        let empty = store
            .metadata(path)
            .is_ok_and(|m| m.len() == 0 && Identity::of(&m) == id)
            && file.metadata().is_ok_and(|m| m.len() == 0)
            && std::os::unix::fs::FileExt::read_at(&file, &mut byte, 0).is_ok_and(|n| n == 0);
        if !empty {
            return Ok(Unfinished::No);
        }
        left(id)?;
        drop(free);
        Ok(Unfinished::LeftByACrash)
    }

    /// Drops the envelopes of names the file at `path` no longer has, in both header slots.
    /// Changes nothing unless an envelope for `path` itself stays. Says whether it changed
    /// the file.
    pub(super) fn tidy_file(&self, path: &CanonicalPath, own: Option<&Pending>) -> Result<bool> {
        match self.store().metadata(path) {
            // (Not an empty backing file: it has no header, so no envelope to tidy.)
            Ok(m) if m.is_file() && m.len() > 0 => {}
            _ => return Ok(false),
        }
        let header = self.header_of(self.ino_at(path), path)?;
        let me = header
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?;
        header.update(&self.facts, &self.volume, path, true, |slots| {
            // The older slot counts too: a crash between the two writes of an unbind leaves
            // the dropped name there.
            let stale_in_some_slot = slots
                .iter()
                .any(|set| self.live_envelopes(set, &me, path, own).len() != set.len());
            let live = self.live_envelopes(slots[0], &me, path, own);
            if !stale_in_some_slot || !live.iter().any(|e| &e.path == path) {
                return Ok(None);
            }
            Ok(Some(live))
        })
    }

    /// Tidies every file at or beneath each of `paths` that exists; returns how many changed.
    /// `own`: the caller's own rebind, if it has one under way.
    pub(super) fn tidy_paths(
        &self,
        paths: &[CanonicalPath],
        own: Option<&Pending>,
    ) -> Result<usize> {
        let mut files = Vec::new();
        for p in paths {
            match self.store().metadata(p) {
                Ok(m) if m.is_dir() => files.extend(self.volume.files_beneath(p)?),
                Ok(m) if m.is_file() => files.push(p.clone()),
                _ => {}
            }
        }
        files.sort();
        files.dedup();
        let changed = AtomicU64::new(0);
        self.parallel(&files, |p| {
            if self.tidy_file(p, own)? {
                changed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?;
        Ok(changed.into_inner() as usize)
    }

    /// Tidies the names recorded by rebinds a crash cut short (see [`super::journal`]). A
    /// record whose files cannot all be tidied now is kept for the next mount.
    pub(super) fn finish_interrupted_rebinds(&self) {
        // While no other mount changes names (a rename under way elsewhere finishes first).
        let _ns = match self.namespace() {
            Ok(ns) => ns,
            Err(e) => {
                tracing::warn!("{e}; interrupted renames (if any) are left for a later mount");
                return;
            }
        };
        self.journal.remove_unfinished_writes();
        for record in self.journal.pending() {
            // Another mount of the store is renaming right now: its record is live.
            if record.live {
                tracing::info!(
                    "a rename is under way on another mount of this store ({}); left to it",
                    record.name
                );
                continue;
            }
            let paths = match &record.paths {
                Ok(paths) => paths,
                Err(e) => {
                    // Never deleted: a torn record (a crash before the rebind's first step,
                    // which changed nothing) and a planted one look alike from here.
                    tracing::warn!("{e}");
                    self.unusable_records.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            match self.tidy_paths(paths, None) {
                Ok(changed) => {
                    tracing::info!(
                        files = changed,
                        "tidied stale envelopes left by an interrupted rename, link or unlink"
                    );
                    self.journal.remove(&record);
                }
                Err(e) => tracing::warn!(
                    "cannot yet tidy after an interrupted rename ({}): {e}",
                    record.name
                ),
            }
        }
    }

    /// Rebind records found at mount that did not parse or authenticate (left in place).
    pub fn unusable_records(&self) -> u64 {
        self.unusable_records.load(Ordering::Relaxed)
    }

    /// Drops a file's envelopes for `gone`, in both header slots (so no slot still opens the
    /// file at a name it no longer has).
    pub(super) fn unbind_path(
        &self,
        header: &HeaderHandle,
        path: &CanonicalPath,
        gone: &CanonicalPath,
    ) -> Result<()> {
        header.update(&self.facts, &self.volume, path, true, |slots| {
            let current = slots[0];
            let keep: Vec<Envelope> = current
                .iter()
                .filter(|e| &e.path != gone)
                .cloned()
                .collect();
            if keep.len() == current.len() || keep.is_empty() {
                return Ok(None);
            }
            Ok(Some(keep))
        })?;
        Ok(())
    }

    /// Runs `f` over `items` on up to 8 threads (KMS calls dominate; the keyring bounds them).
    pub(super) fn parallel<T: Sync>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<()> + Sync,
    ) -> Result<()> {
        let workers = items.len().clamp(1, 8);
        let next = AtomicU64::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= items.len() || first_err.lock().unwrap().is_some() {
                        return;
                    }
                    if let Err(e) = f(&items[i]) {
                        first_err.lock().unwrap().get_or_insert(e);
                    }
                });
            }
        });
        match first_err.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The new path of `p` when `from` becomes `to` (p is `from` or beneath it).
    pub(super) fn moved(
        p: &CanonicalPath,
        from: &CanonicalPath,
        to: &CanonicalPath,
    ) -> CanonicalPath {
        if p == from {
            return to.clone();
        }
        let rest = &p.as_str()[from.as_str().len()..];
        CanonicalPath::from_encoded(&format!("{}{rest}", to.as_str())).expect("canonical")
    }
}
