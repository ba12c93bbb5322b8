//! A real kmsfs mount for tests: the `kmsfs` binary in the foreground on a fresh volume,
//! unmounted and killed (by pid) when dropped, even if the test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mount {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub key: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// Filesystems mounted under the temp dir for the test (e.g. a small tmpfs as the backing
    /// store), unmounted after the daemon stops.
    pub cleanup_mounts: Vec<PathBuf>,
    /// The volume, opened in the test to name backing entries ([`Mount::b`]).
    volume: std::sync::OnceLock<kmsfs::core::Volume>,
    /// What [`Mount::b`] found, for a thread that can no longer read the store (an attacker
    /// running as nobody).
    named: std::sync::Mutex<std::collections::HashMap<String, PathBuf>>,
}

/// Whether FUSE can be used here. Under CI=true it must be.
pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/fuse is missing under CI=true"
        );
        eprintln!("skipping: /dev/fuse is not available on this machine");
    }
    ok
}

pub fn kmsfs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kmsfs"));
    c.env_remove("RUST_LOG")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("KMSFS_STATE_DIR", super::state_dir());
    // To see what a daemon did in a failing test: KMSFS_TEST_RUST_LOG=kmsfs=debug.
    if let Ok(filter) = std::env::var("KMSFS_TEST_RUST_LOG") {
        c.env("RUST_LOG", filter);
    }
    c
}

fn mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

impl Mount {
    /// A new volume (block size `bs`, local key) mounted with `extra` mount options.
    pub fn new(bs: u32, extra: &[&str]) -> Self {
        Self::new_on(bs, extra, None)
    }

    /// As `new`, with the backing directory on a tmpfs of `tmpfs_bytes` (a disk that fills).
    pub fn new_on(bs: u32, extra: &[&str], tmpfs_bytes: Option<u64>) -> Self {
        Self::build(bs, extra, tmpfs_bytes, None, &[], None)
    }

    /// A new volume under the KMS key `key` (an ARN), with `env` (the KMS endpoint, region,
    /// credentials) for init and every mount.
    pub fn new_kms(bs: u32, key: &str, env: &[(&str, &str)]) -> Self {
        Self::build(bs, &[], None, Some(key), env, None)
    }

    fn build(
        bs: u32,
        extra: &[&str],
        tmpfs_bytes: Option<u64>,
        kms_key: Option<&str>,
        env: &[(&str, &str)],
        backing_at: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (backing, mnt, key) = (
            backing_at.unwrap_or_else(|| root.join("backing")),
            root.join("mnt"),
            root.join("keys/master.key"),
        );
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let mut cleanup_mounts = Vec::new();
        if let Some(bytes) = tmpfs_bytes {
            let ok = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={bytes},mode=700"),
                    "tmpfs",
                ])
                .arg(&backing)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot mount a tmpfs on {}", backing.display());
            cleanup_mounts.push(backing.clone());
        }
        let mut m = Mount {
            dir,
            backing,
            mnt,
            key,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cleanup_mounts,
            volume: std::sync::OnceLock::new(),
            named: Default::default(),
        };
        let key_arg = match kms_key {
            Some(arn) => arn.to_string(),
            None => format!("local:{}", m.key.display()),
        };
        let out = kmsfs()
            .args([
                "init",
                m.backing.to_str().unwrap(),
                "--block-size",
                &bs.to_string(),
            ])
            .args(super::names_args())
            .arg("--key")
            .arg(&key_arg)
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        m.start();
        m
    }

    /// A second mount of the same backing store on a mountpoint of its own (stopped when
    /// dropped; the store stays this mount's).
    pub fn another(&self) -> Mount {
        self.another_through(self.backing.clone())
    }

    /// [`Mount::another`] through `backing`, another view of the same store (the store on a
    /// network filesystem, mounted there by a second client).
    pub fn another_through(&self, backing: PathBuf) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().canonicalize().unwrap().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mount {
            dir,
            backing,
            mnt,
            key: self.key.clone(),
            child: None,
            extra: self.extra.clone(),
            env: self.env.clone(),
            cleanup_mounts: Vec::new(),
            volume: std::sync::OnceLock::new(),
            named: Default::default(),
        };
        m.start();
        m
    }

    /// Mounts (again), in the foreground, and waits until the mount is live.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// As `start`, but a daemon that exits instead of mounting (a volume it refuses) is an
    /// error with what it logged, not a panic.
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        let child = kmsfs()
            .arg("mount")
            .arg(&self.backing)
            .arg(&self.mnt)
            .arg("--foreground")
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted(&self.mnt) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("kmsfs mount exited ({status}): {}", self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Unmounts cleanly (as `kmsfs umount` does) and waits for the daemon to exit.
    pub fn stop(&mut self) {
        if mounted(&self.mnt) {
            let out = kmsfs().arg("umount").arg(&self.mnt).output().unwrap();
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// kill -9 of the daemon, then the stale mount is cleared.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }

    /// Environment for the next start (e.g. `RUST_LOG`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Replaces the extra mount options used by the next `start`.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    pub fn remount(&mut self) {
        self.stop();
        self.start();
    }

    /// Hands the running daemon to the test, so the volume can be mounted again at the same
    /// path while the old daemon is still running.
    pub fn take_daemon(&mut self) -> Daemon {
        Daemon(self.child.take().expect("a running daemon"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mount.log")
    }

    /// Everything the daemon logged so far (across remounts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The host path of the backing entry of the user's path `rel` (its directories must
    /// exist on the store). A thread that cannot read the store (running as nobody) gets
    /// what an earlier call found.
    pub fn b(&self, rel: &str) -> PathBuf {
        if super::plaintext_names() {
            return self.backing.join(rel);
        }
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.name(rel)));
        let mut named = self.named.lock().unwrap();
        match found {
            Ok(p) => {
                named.insert(rel.to_string(), p.clone());
                p
            }
            Err(e) => match named.get(rel) {
                Some(p) => p.clone(),
                None => std::panic::resume_unwind(e),
            },
        }
    }

    /// The stored path of the user's path `rel`, as the daemon's log and the encryption
    /// context name it (`/a.txt` with plaintext names).
    pub fn stored(&self, rel: &str) -> String {
        let host = self.b(rel);
        let rel = host.strip_prefix(&self.backing).unwrap();
        format!("/{}", rel.display())
    }

    fn name(&self, rel: &str) -> PathBuf {
        let volume = self.volume.get_or_init(|| {
            assert!(
                self.key.exists(),
                "Mount::b needs the local key (a KMS volume's stored names are not computed here)"
            );
            kmsfs::core::Volume::open(
                &self.backing,
                &kmsfs::core::OpenOptions {
                    pin: vec![kmsfs::keys::spec::KeySpec::Local(self.key.clone())],
                    ..Default::default()
                },
            )
            .expect("open the volume to name its backing entries")
        });
        super::host_path(volume, &self.backing, rel)
    }

    /// `kmsfs info BACKING PATH` output (authenticates the file offline).
    pub fn info(&self, rel: &str) -> (bool, String) {
        let out = kmsfs()
            .arg("info")
            .arg(&self.backing)
            .arg(rel)
            .arg("--key")
            .arg(format!("local:{}", self.key.display()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// A daemon the test waits for; killed (by pid) when dropped.
pub struct Daemon(Child);

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its exit status, if it exits within `within`.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        for m in self.cleanup_mounts.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

/// Several mounts of one backing store, each on its own view of it: the same local directory,
/// or, when `KMSFS_TEST_SHARED_ROOTS` lists the client mounts of one network filesystem
/// (scripts/gluster.sh sets up GlusterFS so), a directory on it reached through a different
/// client for each mount, as hosts sharing the store would. All are unmounted, and the store
/// removed from the network filesystem, when this drops.
pub struct Shared {
    pub mounts: Vec<Mount>,
    remove: Option<PathBuf>,
}

/// The client mounts of the network filesystem the shared-storage tests run on, if any.
/// Under `KMSFS_TEST_SHARED=gluster` they must be there.
pub fn shared_roots() -> Vec<PathBuf> {
    let roots: Vec<PathBuf> = std::env::var("KMSFS_TEST_SHARED_ROOTS")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    if std::env::var("KMSFS_TEST_SHARED").as_deref() == Ok("gluster") {
        assert!(
            roots.len() >= 2 && roots.iter().all(|r| mounted(r)),
            "KMSFS_TEST_SHARED=gluster needs KMSFS_TEST_SHARED_ROOTS: two or more GlusterFS client mounts (scripts/gluster.sh)"
        );
    }
    roots
}

impl Shared {
    /// `n` mounts of a new volume (block size `bs`), each with `extra` options.
    pub fn new(n: usize, bs: u32, extra: &[&str]) -> Shared {
        let roots = shared_roots();
        if roots.is_empty() {
            let first = Mount::new(bs, extra);
            let mut mounts = vec![];
            for _ in 1..n {
                mounts.push(first.another());
            }
            mounts.insert(0, first);
            return Shared {
                mounts,
                remove: None,
            };
        }
        let name = format!(
            "kmsfs-test-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let first = Mount::build(bs, extra, None, None, &[], Some(roots[0].join(&name)));
        let mut shared = Shared {
            mounts: vec![],
            remove: Some(roots[0].join(&name)),
        };
        for i in 1..n {
            let m = first.another_through(roots[i % roots.len()].join(&name));
            shared.mounts.push(m);
        }
        shared.mounts.insert(0, first);
        shared
    }

    /// Whether the store is on a network filesystem.
    pub fn networked(&self) -> bool {
        self.remove.is_some()
    }
}

impl std::ops::Index<usize> for Shared {
    type Output = Mount;
    fn index(&self, i: usize) -> &Mount {
        &self.mounts[i]
    }
}

impl std::ops::IndexMut<usize> for Shared {
    fn index_mut(&mut self, i: usize) -> &mut Mount {
        &mut self.mounts[i]
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for m in &mut self.mounts {
            m.stop();
        }
        if std::thread::panicking() {
            for (i, m) in self.mounts.iter().enumerate() {
                let log = m.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- mount {i} log (last 30 lines, newest first):");
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
        if let Some(dir) = &self.remove {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
