//! The mount command itself: it reports failures as one line and a non-zero exit before
//! detaching, detaches when all is well, unmounts on SIGTERM (a busy mount too), logs to
//! syslog once detached, answers `kmsfs status`, mounts through mount(8) and fstab via
//! `mount.kmsfs`, and an ending daemon leaves a new mount at its path alone. A user's daemon
//! serves status only from its own 0700 directory; `kmsfs status` believes only its own user or
//! root, reads at most 1 MiB, and escapes the control characters it received.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::assert_success;
use common::mount::{fuse_available, kmsfs, Mount};

fn mounted(mnt: &std::path::Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == mnt.to_str())
}

/// Waits up to 10 s for `mnt` to leave the mount table; `failure` is the message if it does not.
fn wait_until_unmounted(mnt: &std::path::Path, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounted(mnt) {
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one_line_failure(args: &[&std::ffi::OsStr], code: i32, want: &str) {
    let out = kmsfs().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("kmsfs: ") && stderr.contains(want),
        "{args:?}: {stderr}"
    );
}

#[test]
fn mount_failures_are_reported_before_detaching() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let (b, mnt) = (
        m.backing.clone().into_os_string(),
        m.mnt.clone().into_os_string(),
    );
    let missing = m.dir.path().join("missing").into_os_string();
    // Busy: already mounted there.
    one_line_failure(
        &["mount".as_ref(), b.as_os_str(), mnt.as_os_str()],
        1,
        "busy",
    );
    m.stop();
    one_line_failure(
        &["mount".as_ref(), missing.as_os_str(), mnt.as_os_str()],
        1,
        "does not exist",
    );
    one_line_failure(
        &["mount".as_ref(), b.as_os_str(), missing.as_os_str()],
        1,
        "does not exist",
    );
    let empty = m.dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    one_line_failure(
        &["mount".as_ref(), empty.as_os_str(), mnt.as_os_str()],
        1,
        "not a kmsfs volume",
    );
    // The wrong key.
    let other = m.dir.path().join("other.key");
    fs::write(&other, [9u8; 32]).unwrap();
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pin = format!("local:{}", other.display());
    one_line_failure(
        &[
            "mount".as_ref(),
            b.as_os_str(),
            mnt.as_os_str(),
            "--key".as_ref(),
            pin.as_ref(),
        ],
        3,
        "not protected by the key",
    );
    // Key service unreachable (the volume's key file is gone).
    let key = m.key.clone();
    fs::rename(&key, m.dir.path().join("away.key")).unwrap();
    one_line_failure(
        &["mount".as_ref(), b.as_os_str(), mnt.as_os_str()],
        4,
        "does not exist",
    );
    fs::rename(m.dir.path().join("away.key"), &key).unwrap();
    assert!(!mounted(&m.mnt), "nothing was left mounted");
}

#[test]
fn mount_detaches_and_unmounts_on_sigterm() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    m.stop();
    // Without --foreground the command returns once the mount is live.
    let out = kmsfs()
        .arg("mount")
        .arg(&m.backing)
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert_success(&out);
    assert!(mounted(&m.mnt));
    fs::write(m.p("f"), b"daemon").unwrap();
    let out = kmsfs().arg("umount").arg(&m.mnt).output().unwrap();
    assert_success(&out);
    assert!(!mounted(&m.mnt));

    // In the foreground, SIGTERM unmounts and the process exits cleanly.
    m.start();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"daemon");
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    wait_until_unmounted(&m.mnt, "still mounted 10 s after SIGTERM");
    let out = kmsfs().arg("umount").arg(&m.mnt).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "umount of what is not mounted fails"
    );

    // A busy mount is detached at once: files open through it keep working, and the daemon
    // exits when the last one closes (a plain unmount would fail, and leave a daemon that
    // had already taken its one signal).
    m.stop();
    m.start();
    let mut open = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(m.p("f"))
        .unwrap();
    let mut daemon = m.take_daemon();
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
    wait_until_unmounted(&m.mnt, "a busy mount still mounted 10 s after SIGTERM");
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    open.write_all(b" busy").unwrap();
    let mut text = [0u8; 11];
    open.read_exact_at(&mut text, 0).unwrap();
    assert_eq!(&text, b"daemon busy");
    assert_eq!(daemon.wait_for_exit(Duration::from_millis(300)), None);
    drop(open);
    let status = daemon.wait_for_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "after the last close the daemon exits cleanly: {status:?}"
    );
    m.start();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"daemon busy");
}

/// Holds a datagram socket at /dev/log (where syslog(3) sends) and removes it when dropped.
struct FakeSyslog {
    socket: std::os::unix::net::UnixDatagram,
}

impl FakeSyslog {
    /// None when a real system logger owns /dev/log (its messages cannot be read here).
    fn bind() -> Option<Self> {
        if std::path::Path::new("/dev/log").exists() {
            return None;
        }
        let socket = std::os::unix::net::UnixDatagram::bind("/dev/log").ok()?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Some(FakeSyslog { socket })
    }

    fn drain(&self) -> String {
        let mut all = String::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = self.socket.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            all.push('\n');
        }
        all
    }
}

impl Drop for FakeSyslog {
    fn drop(&mut self) {
        let _ = fs::remove_file("/dev/log");
    }
}

#[test]
fn a_detached_daemon_logs_to_syslog_and_answers_status() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("ok"), b"fine").unwrap();
    fs::write(m.p("bad"), vec![7u8; 10_000]).unwrap();
    m.stop();
    let mut raw = fs::read(m.b("bad")).unwrap();
    let n = raw.len();
    raw[n - 50] ^= 1;
    fs::write(m.b("bad"), &raw).unwrap();
    let syslog = FakeSyslog::bind();
    if syslog.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/log is taken under CI=true"
        );
        eprintln!("a system logger owns /dev/log: not capturing syslog");
    }
    let out = kmsfs()
        .arg("mount")
        .arg(&m.backing)
        .arg(&m.mnt)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(fs::read(m.p("ok")).unwrap(), b"fine");
    assert_eq!(
        fs::read(m.p("bad")).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    let status = kmsfs()
        .args(["status", "--json"])
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert_success(&status);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    // The kernel may retry a failed read (readahead, then the read itself).
    let errors = v["io_errors"].as_u64().unwrap();
    assert!((1..=4).contains(&errors), "{v}");
    assert_eq!(v["read_only"], false);
    assert_eq!(v["kms_calls"]["GenerateDataKey"]["requests"], 0);
    assert!(
        v["kms_calls"]["Decrypt"]["requests"].as_u64().unwrap() >= 2,
        "{v}"
    );
    assert!(v["key_cache"]["entries"].as_u64().unwrap() >= 2, "{v}");
    // The root and the two files the kernel looked up.
    assert!(v["inodes"].as_u64().unwrap() >= 3, "{v}");
    let (rss, peak) = (&v["memory"]["rss_kib"], &v["memory"]["peak_rss_kib"]);
    assert!(rss.as_u64().unwrap() > 1000, "{v}");
    assert!(peak.as_u64().unwrap() >= rss.as_u64().unwrap(), "{v}");
    let human = kmsfs().arg("status").arg(&m.mnt).output().unwrap();
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(
        text.contains(&format!("I/O errors returned: {errors}")),
        "{text}"
    );
    assert!(text.contains("inodes the kernel holds: "), "{text}");
    let out = kmsfs().arg("umount").arg(&m.mnt).output().unwrap();
    assert!(out.status.success());
    let gone = kmsfs().arg("status").arg(&m.mnt).output().unwrap();
    assert_eq!(gone.status.code(), Some(1));
    if let Some(syslog) = syslog {
        std::thread::sleep(Duration::from_millis(300));
        let logged = syslog.drain();
        assert!(logged.contains("kmsfs["), "{logged}");
        assert!(
            logged.contains("authentication failed at block"),
            "{logged}"
        );
        assert!(logged.contains("key service calls:"), "{logged}");
        assert!(
            !logged.contains('\u{1b}'),
            "no colour codes in syslog: {logged}"
        );
    }
}

/// `/sbin/mount.kmsfs` pointing at the binary under test, removed when dropped.
struct Helper(std::path::PathBuf);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn mount_8_and_fstab_lines_go_through_mount_kmsfs() {
    if !fuse_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || std::path::Path::new("/sbin/mount.kmsfs").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "under CI=true the test runs as root with no mount.kmsfs installed"
        );
        eprintln!("skipping: needs root and no installed /sbin/mount.kmsfs");
        return;
    }
    let _helper = Helper("/sbin/mount.kmsfs".into());
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kmsfs"), "/sbin/mount.kmsfs").unwrap();
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"via mount(8)").unwrap();
    m.stop();
    let key = format!("key=local:{}", m.key.display());
    // mount -t kmsfs, read-only.
    let st = std::process::Command::new("mount")
        .env("KMSFS_STATE_DIR", common::state_dir())
        .args(["-t", "kmsfs", "-o", &format!("ro,{key}")])
        .arg(&m.backing)
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(mounted(&m.mnt));
    assert_eq!(fs::read(m.p("f")).unwrap(), b"via mount(8)");
    assert_eq!(
        fs::write(m.p("g"), b"x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    assert!(std::process::Command::new("umount")
        .arg(&m.mnt)
        .status()
        .unwrap()
        .success());
    assert!(!mounted(&m.mnt));
    // An fstab line (the same as in docs/OPERATIONS.md), mounted by its mount point.
    let fstab = m.dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} kmsfs allow_other,{key},nofail,x-systemd.requires=network-online.target 0 0\n",
            m.backing.display(),
            m.mnt.display()
        ),
    )
    .unwrap();
    let st = std::process::Command::new("mount")
        .env("KMSFS_STATE_DIR", common::state_dir())
        .arg("-T")
        .arg(&fstab)
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    fs::write(m.p("g"), b"writable").unwrap();
    assert_eq!(fs::read(m.p("g")).unwrap(), b"writable");
    assert!(std::process::Command::new("umount")
        .arg(&m.mnt)
        .status()
        .unwrap()
        .success());
    // A bad option is one line and a usage exit, and nothing is mounted.
    let out = std::process::Command::new("/sbin/mount.kmsfs")
        .env("KMSFS_STATE_DIR", common::state_dir())
        .arg(&m.backing)
        .arg(&m.mnt)
        .args(["-o", "bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    assert!(!mounted(&m.mnt));
}

/// The FUSE control filesystem at /sys/fs/fuse/connections, mounted for the test if it was not
/// (and then unmounted when dropped).
struct FuseControl {
    mounted_here: bool,
}

impl FuseControl {
    const PATH: &'static str = "/sys/fs/fuse/connections";

    fn mount() -> Self {
        let mounted_here = !mounted(std::path::Path::new(Self::PATH));
        if mounted_here {
            assert!(std::process::Command::new("mount")
                .args(["-t", "fusectl", "fusectl", Self::PATH])
                .status()
                .unwrap()
                .success());
        }
        FuseControl { mounted_here }
    }
}

impl Drop for FuseControl {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = std::process::Command::new("umount")
                .arg(Self::PATH)
                .status();
        }
    }
}

/// A daemon restarted at the same path (`umount`, then `mount` again at once) while the old
/// process is still finishing: the old one must not unmount the new mount or remove its status
/// socket on its way out. fuser 0.18 unmounts by path when its session ends, even a mount that
/// is no longer its own (cberner/fuser#703); mount(8) tests met this as a flaky "not mounted".
#[test]
fn an_ending_daemon_leaves_a_new_mount_at_its_path_alone() {
    use std::os::unix::fs::MetadataExt;
    if !fuse_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "under CI=true the test runs as root"
        );
        eprintln!("skipping: aborting a FUSE connection needs root");
        return;
    }
    let mut m = Mount::new(4096, &[]);
    fs::write(m.p("f"), b"old and new").unwrap();
    m.stop();
    // Slow key calls keep the old daemon busy on one request after its connection has ended,
    // so the new mount is certainly in place before the old daemon's session returns.
    m.set_env("KMSFS_INJECT_KMS_LATENCY_MS", "1500");
    m.start();
    let connection = libc::minor(fs::metadata(&m.mnt).unwrap().dev());
    let _fusectl = FuseControl::mount();
    let reader = {
        let f = m.p("f");
        std::thread::spawn(move || fs::read(f))
    };
    std::thread::sleep(Duration::from_millis(400));
    fs::write(format!("/sys/fs/fuse/connections/{connection}/abort"), "1").unwrap();
    assert!(reader.join().unwrap().is_err());
    let mut old = m.take_daemon();
    assert!(std::process::Command::new("umount")
        .arg(&m.mnt)
        .status()
        .unwrap()
        .success());
    m.set_env("KMSFS_INJECT_KMS_LATENCY_MS", "0");
    m.start();
    assert!(
        old.wait_for_exit(Duration::from_secs(10)).is_some(),
        "the old daemon did not exit"
    );
    assert!(mounted(&m.mnt), "the old daemon unmounted the new mount");
    assert_eq!(fs::read(m.p("f")).unwrap(), b"old and new");
    let out = kmsfs().arg("status").arg(&m.mnt).output().unwrap();
    assert!(
        out.status.success(),
        "the new mount's status socket is gone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether root may run the tests that act as other users (setpriv, uid 65534) and nobody can
/// run the binaries under test. Under CI=true both must hold.
fn can_act_as_nobody() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let runs = |exe: &std::path::Path, probe: &[&str]| {
        root && std::process::Command::new(exe)
            .args(probe)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = runs(&nobody_kmsfs(), &["--version"])
        && runs(
            &common::runnable_by_nobody(&std::env::current_exe().unwrap()),
            &["--list", "--exact", "fake_status_server"],
        )
        && std::process::Command::new("setpriv")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "under CI=true the test runs as root, with setpriv, and nobody can run the binaries"
        );
        eprintln!("skipping: needs root, setpriv, and binaries that uid 65534 can run");
    }
    ok
}

/// The kmsfs binary at a path other users can run.
fn nobody_kmsfs() -> std::path::PathBuf {
    common::runnable_by_nobody(env!("CARGO_BIN_EXE_kmsfs").as_ref())
}

/// `kmsfs` run as `uid` (group too) with XDG_RUNTIME_DIR=`runtime`.
fn kmsfs_as(uid: u32, runtime: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(nobody_kmsfs());
    c.env_remove("RUST_LOG")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .uid(uid)
        .gid(uid)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("KMSFS_STATE_DIR", runtime.join("state"));
    c
}

/// A mount daemon run as nobody (uid 65534) with XDG_RUNTIME_DIR=`runtime`, logging to `log`.
/// setpriv leaves it CAP_SYS_ADMIN and CAP_DAC_OVERRIDE (to mount, and open /dev/fuse, without
/// fusermount3), but its uid is not root, so its status socket goes where a user's goes.
/// Unmounted, and killed if it does not exit, when dropped.
struct NobodyDaemon {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl NobodyDaemon {
    fn start(m: &Mount, runtime: &std::path::Path, log: &std::path::Path) -> Self {
        let child = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+sys_admin,+dac_override",
                "--ambient-caps=+sys_admin,+dac_override",
            ])
            .arg(nobody_kmsfs())
            .arg("mount")
            .arg(&m.backing)
            .arg(&m.mnt)
            .arg("--foreground")
            .env_remove("RUST_LOG")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("XDG_RUNTIME_DIR", runtime)
            .env("KMSFS_STATE_DIR", runtime.join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = NobodyDaemon {
            child,
            mnt: m.mnt.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted(&m.mnt) {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}): {}",
                    fs::read_to_string(log).unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }
}

impl Drop for NobodyDaemon {
    fn drop(&mut self) {
        if mounted(&self.mnt) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A user's daemon serves status only from a directory that lstat shows is its own, mode 0700,
/// and not a symbolic link (else status is off, with one log line, and the mount works); it
/// creates the directory if missing; it replaces a stale socket of its own at its name, and
/// nothing else.
#[test]
fn a_users_status_socket_directory_must_be_its_own_and_0700() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !fuse_available() || !can_act_as_nobody() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    // The volume's root becomes nobody's (its authenticated owner), and so does the store.
    std::os::unix::fs::chown(&m.mnt, Some(65534), Some(65534)).unwrap();
    m.stop();
    let st = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(m.dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    // Like /run/user/UID.
    let runtime = m.dir.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    std::os::unix::fs::chown(&runtime, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    // Recorded for nobody first, so the daemon's only log line is about its status socket.
    assert_success(
        &kmsfs_as(65534, &runtime)
            .arg("trust")
            .arg(&m.backing)
            .output()
            .unwrap(),
    );
    let dir = runtime.join("kmsfs");
    let name = kmsfs::cli::status::socket_path(&m.mnt);
    let socket = dir.join(name.file_name().unwrap());
    let log = m.dir.path().join("nobody.log");
    let mount_works = || {
        let out = std::process::Command::new("sh")
            .args(["-c", "printf works > \"$1\" && cat \"$1\"", "sh"])
            .arg(m.p("f"))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_success(&out);
        assert_eq!(out.stdout, b"works");
    };
    let status = || {
        kmsfs_as(65534, &runtime)
            .arg("status")
            .arg(&m.mnt)
            .output()
            .unwrap()
    };
    // Each wrong directory: the log line, a working mount, no answer, nothing bound.
    let off = |why: &str, nothing_in: &std::path::Path| {
        let daemon = NobodyDaemon::start(&m, &runtime, &log);
        mount_works();
        let out = status();
        assert_eq!(out.status.code(), Some(1), "status answered: {why}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("or its daemon does not answer"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(daemon);
        let logged = fs::read_to_string(&log).unwrap();
        let want = format!(
            "kmsfs status will not answer for this mount: {} must be a directory owned by uid \
             65534 with mode 0700, but it is {why}",
            dir.display()
        );
        assert_eq!(logged.matches(&want).count(), 1, "{logged}");
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert_eq!(fs::read_dir(nothing_in).unwrap().count(), 0, "{why}");
    };
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    off("owned by uid 65534 with mode 0755", &dir);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    off("owned by uid 0 with mode 0700", &dir);
    fs::remove_dir(&dir).unwrap();
    let elsewhere = runtime.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::chown(&elsewhere, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    off("a symbolic link", &elsewhere);

    // Positive control: missing, the directory is created 0700 and status answers.
    fs::remove_file(&dir).unwrap();
    let daemon = NobodyDaemon::start(&m, &runtime, &log);
    mount_works();
    let out = status();
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!(
            "{} on {} ",
            m.backing.display(),
            m.mnt.display()
        )),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let made = fs::symlink_metadata(&dir).unwrap();
    assert!(made.is_dir());
    assert_eq!((made.uid(), made.mode() & 0o7777), (65534, 0o700));
    drop(daemon);
    assert_eq!(fs::read_to_string(&log).unwrap(), "");
    assert!(!socket.exists(), "the daemon removes its socket at exit");

    // Something not a socket of this user at the socket's name is left alone (status off)...
    fs::write(&socket, b"not a socket").unwrap();
    let daemon = NobodyDaemon::start(&m, &runtime, &log);
    mount_works();
    assert_eq!(status().status.code(), Some(1));
    drop(daemon);
    assert_eq!(fs::read(&socket).unwrap(), b"not a socket");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "kmsfs status will not answer for this mount: {} exists and is not a socket of uid \
             65534: leaving it alone",
            socket.display()
        )),
        "{logged}"
    );
    // ...while a stale socket of its own (a daemon that was killed) is replaced.
    fs::remove_file(&socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    std::os::unix::fs::lchown(&socket, Some(65534), Some(65534)).unwrap();
    let daemon = NobodyDaemon::start(&m, &runtime, &log);
    assert_success(&status());
    drop(daemon);
    assert_eq!(fs::read_to_string(&log).unwrap(), "");
}

/// Not a test of its own: the fake status server [`FakeServer`] runs in a child process of
/// this test binary, as another user, when KMSFS_TEST_FAKE_STATUS_SERVER is set. It answers
/// every connection with the bytes of the file KMSFS_TEST_FAKE_STATUS_ANSWER.
#[test]
fn fake_status_server() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let Some(socket) = std::env::var_os("KMSFS_TEST_FAKE_STATUS_SERVER") else {
        return;
    };
    let answer = fs::read(std::env::var_os("KMSFS_TEST_FAKE_STATUS_ANSWER").unwrap()).unwrap();
    let socket = std::path::PathBuf::from(socket);
    let binding = socket.with_extension("binding");
    let listener = std::os::unix::net::UnixListener::bind(&binding).unwrap();
    fs::set_permissions(&binding, fs::Permissions::from_mode(0o777)).unwrap();
    // At its name only once it listens.
    fs::rename(&binding, &socket).unwrap();
    for conn in listener.incoming() {
        let _ = conn.unwrap().write_all(&answer);
    }
}

/// A fake daemon's status socket for `kmsfs status MNT` run as nobody with
/// XDG_RUNTIME_DIR=`runtime`, served by `uid`; killed when dropped.
struct FakeServer(std::process::Child);

impl FakeServer {
    fn start(
        uid: u32,
        runtime: &std::path::Path,
        mnt: &std::path::Path,
        answer: &[u8],
    ) -> FakeServer {
        use std::os::unix::fs::PermissionsExt;
        // The directory is the server's, as one another user made first would be.
        let dir = runtime.join("kmsfs");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join(kmsfs::cli::status::socket_path(mnt).file_name().unwrap());
        let answer_file = runtime.join("answer");
        fs::write(&answer_file, answer).unwrap();
        fs::set_permissions(&answer_file, fs::Permissions::from_mode(0o644)).unwrap();
        let mut child = std::process::Command::new(common::runnable_by_nobody(
            &std::env::current_exe().unwrap(),
        ))
        .args(["--exact", "fake_status_server", "--nocapture", "-q"])
        .env("KMSFS_TEST_FAKE_STATUS_SERVER", &socket)
        .env("KMSFS_TEST_FAKE_STATUS_ANSWER", &answer_file)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the fake status server exited: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the fake status server did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        FakeServer(child)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory nobody can reach, holding a mount point (only a name here: the client hashes
/// it) and a runtime directory.
fn client_room() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let room = tempfile::tempdir().unwrap();
    fs::set_permissions(room.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = room.path().canonicalize().unwrap();
    let (mnt, runtime) = (root.join("mnt"), root.join("runtime"));
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&runtime).unwrap();
    (room, mnt, runtime)
}

const HONEST: &str = r#"{"backing":"/srv/bäck ünicode","io_errors":0,"mountpoint":"/mnt/x","pid":42,"read_only":false,"uptime_s":7,"volume":"abc"}"#;

/// `kmsfs status` reads only from a daemon of its own user or root (SO_PEERCRED): a socket
/// served by another user, who made the directory first, is refused with one line.
#[test]
fn status_reads_only_from_its_own_user_or_root() {
    if !can_act_as_nobody() {
        return;
    }
    let (_room, mnt, runtime) = client_room();
    let status = |args: &[&str]| {
        kmsfs_as(65534, &runtime)
            .arg("status")
            .args(args)
            .arg(&mnt)
            .output()
            .unwrap()
    };
    let _server = FakeServer::start(65533, &runtime, &mnt, HONEST.as_bytes());
    for args in [&[][..], &["--json"]] {
        let out = status(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("kmsfs: ")
                && stderr.ends_with(
                    ".sock is served by uid 65533, not by this user (uid 65534) or root: not \
                     reading its answer\n"
                ),
            "{stderr}"
        );
    }
    drop(_server);
    // Positive controls: the same answer from its own user, and from root, is read.
    for uid in [65534, 0] {
        let _server = FakeServer::start(uid, &runtime, &mnt, HONEST.as_bytes());
        let out = status(&[]);
        assert_success(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("/srv/bäck ünicode on /mnt/x "),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Whatever a daemon sends, `kmsfs status` prints no control character of it (C0, DEL, C1):
/// they are shown as `\xNN` (as `\u00NN` escapes in `--json`, which stays the same JSON), and it
/// reads at most 1 MiB.
#[test]
fn status_escapes_control_characters_and_reads_at_most_a_mib() {
    if !can_act_as_nobody() {
        return;
    }
    let (_room, mnt, runtime) = client_room();
    let status = |args: &[&str]| {
        kmsfs_as(65534, &runtime)
            .arg("status")
            .args(args)
            .arg(&mnt)
            .output()
            .unwrap()
    };
    let raw_controls = |text: &str| {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n')
            .count()
    };

    // Positive control: an ordinary answer is printed as it came.
    let server = FakeServer::start(65534, &runtime, &mnt, HONEST.as_bytes());
    let out = status(&[]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        "/srv/bäck ünicode on /mnt/x (volume abc, pid 42, up 7 s)"
    );
    assert!(text.ends_with("\nI/O errors returned: 0\n"), "{text}");
    let out = status(&["--json"]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{HONEST}\n")
    );
    drop(server);

    // Terminal escapes (a title, clear screen, CSI as one C1 character), a carriage return and a
    // newline that would forge a line, DEL, in strings and in a key.
    let hostile = "{\"backing\":\"/srv/\\u001b]0;owned\\u0007\\u001b[2J\",\
                   \"mountpoint\":\"/mnt\\r\\nI/O errors returned: 0\",\
                   \"volume\":\"v\u{9b}31m\\u007f\",\"pid\":\"\\u001b[1A\",\
                   \"kms_calls\":{\"Decrypt\\u001b[8m\":{\"requests\":1}},\"io_errors\":5}";
    let server = FakeServer::start(65534, &runtime, &mnt, hostile.as_bytes());
    let out = status(&[]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(raw_controls(&text), 0, "{text:?}");
    assert_eq!(
        text.lines().next().unwrap(),
        r"/srv/\x1b]0;owned\x07\x1b[2J on /mnt\x0d\x0aI/O errors returned: 0 (volume v\x9b31m\x7f, pid \x1b[1A, up ? s)"
    );
    assert!(text.contains(r"  Decrypt\x1b[8m "), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("I/O errors returned:"))
            .collect::<Vec<_>>(),
        ["I/O errors returned: 5"]
    );
    let out = status(&["--json"]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(raw_controls(&text), 0, "{text:?}");
    let sent: serde_json::Value = serde_json::from_str(hostile).unwrap();
    let printed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(printed, sent, "the same JSON");
    assert!(text.contains(r#""volume":"v\u009b31m\u007f""#), "{text}");
    drop(server);

    // Raw control characters are not JSON at all: refused, and nothing of them printed.
    let server = FakeServer::start(65534, &runtime, &mnt, b"\x1b]0;owned\x07\x1b[2J");
    for args in [&[][..], &["--json"]] {
        let out = status(args);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(raw_controls(&stderr), 0, "{stderr:?}");
        assert!(
            stderr.starts_with("kmsfs: the daemon's answer is not JSON: "),
            "{stderr}"
        );
    }
    drop(server);

    // At most 1 MiB: a longer answer is refused; one just under it (positive control) is read.
    let padded = |len: usize| {
        let pad = len - HONEST.len() - r#","pad":"""#.len();
        format!(
            "{},\"pad\":\"{}\"}}",
            &HONEST[..HONEST.len() - 1],
            "a".repeat(pad)
        )
    };
    let server = FakeServer::start(65534, &runtime, &mnt, padded(1 << 20).as_bytes());
    assert_success(&status(&[]));
    drop(server);
    let _server = FakeServer::start(65534, &runtime, &mnt, padded((1 << 20) + 1).as_bytes());
    let out = status(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "kmsfs: the daemon's answer is longer than 1024 KiB: not reading it\n"
    );
}
