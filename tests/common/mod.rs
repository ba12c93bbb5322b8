//! Helpers shared by the integration tests: throwaway volumes with their key files kept
//! outside the backing directory, and byte-level surgery on backing files.
#![allow(dead_code)]

pub mod moto;
pub mod mount;
pub mod stand_in;

use std::fs;
use std::path::{Path, PathBuf};

use kmsfs::core::file::write_new_file;
use kmsfs::core::volume::{InitOptions, OpenOptions};
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::error::Error;
use kmsfs::format::context::CanonicalPath;
pub use kmsfs::format::header::{Attrs, ObjectKind};
use kmsfs::keys::spec::KeySpec;

pub struct TestVolume {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub key_path: PathBuf,
    pub volume: Volume,
}

/// The state directory (`KMSFS_STATE_DIR`) every kmsfs process a test starts is given, so
/// that trust records never go to the real `/var/lib/kmsfs` or `~/.local/state`.
pub fn state_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("kmsfs-state")
}

pub fn path(p: &str) -> CanonicalPath {
    CanonicalPath::from_user(Path::new(p)).unwrap()
}

/// Whether the tests make volumes with plaintext names (`KMSFS_TEST_NAMES=plaintext`; the
/// suite runs the attack and model tests both ways) rather than encrypted ones (the default).
pub fn plaintext_names() -> bool {
    std::env::var("KMSFS_TEST_NAMES").as_deref() == Ok("plaintext")
}

/// The `kmsfs init` arguments of the name mode the tests run in.
pub fn names_args() -> &'static [&'static str] {
    if plaintext_names() {
        &["--plaintext-names"]
    } else {
        &[]
    }
}

/// The stored path of the user's path `p` (its directories must exist): kmsfs's own names
/// (`.kmsfs/...`, a directory's `.kmsfs-dir`) are kept as they are.
pub fn stored(volume: &Volume, p: &str) -> CanonicalPath {
    let mut out = CanonicalPath::root();
    // Beneath one of kmsfs's own names (`.kmsfs/...`) names are kept as they are.
    let mut own = !volume.encrypted_names();
    for name in Path::new(p).iter().filter(|c| *c != "/") {
        let bytes = name.as_encoded_bytes();
        own = own || volume.is_own_name(bytes, out.is_root());
        out = if own {
            out.join(bytes).unwrap()
        } else {
            volume.stored_child(&out, None, bytes).unwrap().path
        };
    }
    out
}

/// The host path of the backing entry of the user's path `p` in the store at `backing`.
pub fn host_path(volume: &Volume, backing: &Path, p: &str) -> PathBuf {
    backing.join(stored(volume, p).to_relative_path())
}

impl TestVolume {
    pub fn new(block_size: u32) -> Self {
        Self::with_key(block_size, None)
    }

    /// A volume protected by the key file at `key` (created if missing), or a new one.
    pub fn with_key(block_size: u32, key: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let key_path = key
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("keys/master.key"));
        let report = Volume::init(
            &backing,
            InitOptions {
                keys: vec![KeySpec::Local(key_path.clone())],
                block_size,
                // Recorded where the kmsfs processes of the tests look, as `kmsfs init` does.
                record: Some(state_dir()),
                plaintext_names: plaintext_names(),
                ..Default::default()
            },
        )
        .unwrap();
        TestVolume {
            dir,
            backing,
            key_path,
            volume: report.volume,
        }
    }

    /// Opens the volume afresh with its key service behind a fault wrapper (seeded with
    /// `seed`, `faults` for every call kind), which is returned to steer.
    pub fn open_faulty(
        &self,
        seed: u64,
        faults: kmsfs::keys::fault::Faults,
    ) -> (Volume, std::sync::Arc<kmsfs::keys::fault::FaultyProvider>) {
        use kmsfs::keys::fault::FaultyProvider;
        use kmsfs::keys::KeyProvider;
        use std::sync::{Arc, Mutex};
        let made: Arc<Mutex<Option<Arc<FaultyProvider>>>> = Arc::default();
        let slot = made.clone();
        let options = OpenOptions {
            key_options: kmsfs::core::volume::KeyOptions {
                wrap_provider: Some(Arc::new(move |inner: Arc<dyn KeyProvider>| {
                    let f = Arc::new(FaultyProvider::new(inner, seed));
                    f.set(None, faults.clone());
                    *slot.lock().unwrap() = Some(f.clone());
                    f as Arc<dyn KeyProvider>
                })),
                ..Default::default()
            },
            ..Default::default()
        };
        let volume = Volume::open(&self.backing, &options).unwrap();
        let provider = made.lock().unwrap().clone().unwrap();
        (volume, provider)
    }

    /// Opens the volume afresh (empty key cache), as a new process would.
    pub fn reopen(&self) -> Result<Volume, Error> {
        Volume::open(&self.backing, &OpenOptions::default())
    }

    pub fn write(&self, p: &str, data: &[u8]) {
        let at = self.volume.prepare_entry(&path(p)).unwrap();
        write_new_file(&self.volume, &at, &mut &data[..]).unwrap();
    }

    /// The stored path of `p`.
    pub fn stored(&self, p: &str) -> CanonicalPath {
        stored(&self.volume, p)
    }

    /// Reads a file through a fresh open of the volume.
    pub fn read(&self, p: &str) -> Result<Vec<u8>, Error> {
        let volume = self.reopen()?;
        EncryptedFile::open(&volume, &stored(&volume, p), false)?.read_all()
    }

    /// Makes the directory `p` (mode 0755, owned by the test's user), record and all.
    pub fn mkdir(&self, p: &str) {
        self.mkdir_as(p, 0o755, None);
    }

    /// Makes the directory `p` with the authenticated mode `mode` and owner (uid, gid), or
    /// the test's user.
    pub fn mkdir_as(&self, p: &str, mode: u32, owner: Option<(u32, u32)>) {
        let attrs = attrs(ObjectKind::Dir, mode, owner);
        let at = self.volume.prepare_entry(&path(p)).unwrap();
        kmsfs::core::file::make_dir(&self.volume, &at, attrs).unwrap();
    }

    /// Writes the file `p` with the authenticated mode `mode` and owner.
    pub fn write_as(&self, p: &str, data: &[u8], mode: u32, owner: Option<(u32, u32)>) {
        let attrs = attrs(ObjectKind::File, mode, owner);
        let at = self.volume.prepare_entry(&path(p)).unwrap();
        kmsfs::core::file::write_new_file_as(&self.volume, &at, &mut &data[..], attrs).unwrap();
    }

    /// Makes the object `p` of `kind` (a symlink with `data` as its target, a fifo, a device
    /// node numbered `rdev`) as kmsfs would through a mount.
    pub fn object(&self, p: &str, kind: ObjectKind, mode: u32, rdev: u64, data: &[u8]) {
        let mut attrs = attrs(kind, mode, None);
        attrs.rdev = rdev;
        let at = self.volume.prepare_entry(&path(p)).unwrap();
        let bytes = kmsfs::core::file::encode_object(&self.volume, &at, attrs, data).unwrap();
        self.volume
            .backing()
            .write_new_with(&at, &bytes, |f| {
                self.volume.tag_kind(f, &at, kind);
                Ok(())
            })
            .unwrap();
    }

    /// Sets the authenticated owner of the object `p` (a directory: its record) as a chown
    /// through a mount would.
    pub fn chown(&self, p: &str, uid: u32, gid: u32) {
        let is_dir = fs::symlink_metadata(self.backing_file(p)).unwrap().is_dir();
        let at = if is_dir {
            kmsfs::core::file::dir_record(&self.stored(p))
        } else {
            self.stored(p)
        };
        let file = self
            .volume
            .backing()
            .open_file(&at, true, kmsfs::backing::Atime::Keep)
            .unwrap();
        kmsfs::core::file::update_slot(
            &self.volume,
            &file,
            &at,
            true,
            kmsfs::core::file::attrs_change(|a| Some(Attrs { uid, gid, ..a })),
        )
        .unwrap();
    }

    /// The host path of the backing entry of `p`.
    pub fn backing_file(&self, p: &str) -> PathBuf {
        host_path(&self.volume, &self.backing, p)
    }

    pub fn bytes(&self, p: &str) -> Vec<u8> {
        fs::read(self.backing_file(p)).unwrap()
    }

    pub fn put_bytes(&self, p: &str, bytes: &[u8]) {
        fs::write(self.backing_file(p), bytes).unwrap();
    }

    /// (data offset, sealed block length) of a file, read from its preamble.
    pub fn geometry(&self, p: &str) -> (usize, usize) {
        let pre = kmsfs::format::header::Preamble::decode(&self.bytes(p)).unwrap();
        (pre.data_offset() as usize, pre.block_size as usize + 28)
    }
}

/// Deterministic, non-repeating test content.
/// Attributes of `kind` with `mode`, owned by (uid, gid) or the test's user.
pub fn attrs(kind: ObjectKind, mode: u32, owner: Option<(u32, u32)>) -> Attrs {
    let mut a = kmsfs::core::file::own_file_attrs(mode);
    a.kind = kind;
    if let Some((uid, gid)) = owner {
        (a.uid, a.gid) = (uid, gid);
    }
    a
}

/// An operation a test holds up on purpose (a key call made to hang 10 s), running on another
/// thread, timed (see [`held_up`]).
pub struct HeldUp<T>(std::thread::JoinHandle<(T, std::time::Duration)>);

/// Starts `f` on another thread and returns once it is under way (500 ms on), held up.
pub fn held_up<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> HeldUp<T> {
    let running = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let out = f();
        (out, started.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    HeldUp(running)
}

impl<T> HeldUp<T> {
    /// What it returned, once it has: the test fails unless it took 9 s or more (the positive
    /// control: the stall was real).
    pub fn finish(self) -> T {
        let (out, took) = self.0.join().unwrap();
        assert!(
            took >= std::time::Duration::from_secs(9),
            "the key call was not held up: {took:?}"
        );
        out
    }
}

/// Runs `f` (named `what`), failing the test unless it returns within 200 ms while something
/// else (`stuck`) is held up: what must not wait for a stuck key call.
pub fn within_200ms(what: &str, stuck: &str, f: impl FnOnce()) {
    let started = std::time::Instant::now();
    f();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(200),
        "{what} took {took:?} while {stuck}"
    );
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251) as u8).wrapping_add(seed))
        .collect()
}

/// Runs a shell command, failing the test with its output if it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = std::process::Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn tools_present(tools: &[&str]) -> bool {
    let missing: Vec<&&str> = tools
        .iter()
        .filter(|t| {
            std::process::Command::new("which")
                .arg(t)
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{missing:?} missing under CI=true"
        );
        eprintln!("skipping: {missing:?} not installed");
        return false;
    }
    true
}

/// Fails the test with the command's stderr unless it succeeded.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `exe` at a path uid 65534 can run: itself when every directory above it lets others
/// through, else a hard link (or a copy) in a 0755 directory under /tmp, made once per binary
/// and process. CI may check the project out under a directory only root can enter.
#[allow(dead_code)]
pub fn runnable_by_nobody(exe: &Path) -> PathBuf {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let reachable = exe
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0));
    if reachable && std::fs::metadata(exe).is_ok_and(|m| m.mode() & 0o001 != 0) {
        return exe.to_path_buf();
    }
    let dir = std::env::temp_dir().join(format!("kmsfs-test-bins-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    }
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert!(
        meta.is_dir() && meta.uid() == 0,
        "{} is not root's",
        dir.display()
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let to = dir.join(exe.file_name().unwrap());
    if !to.exists() && std::fs::hard_link(exe, &to).is_err() {
        std::fs::copy(exe, &to).unwrap();
    }
    to
}
