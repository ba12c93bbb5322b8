//! `kmsfs mount` and `kmsfs umount`.
//!
//! Everything that can fail is checked before the daemon detaches (mountpoint, volume, keys,
//! the FUSE mount itself), and a failure is one line and a non-zero exit from the command the
//! user ran. To daemonize, the process forks before any thread exists (the AWS client starts
//! threads); the child mounts and reports "ok" or the error through a pipe, and the parent
//! exits with that result. SIGINT, SIGTERM and SIGHUP detach the mount (files already open
//! work on), and the daemon exits after their last close.

// The mount point, /proc, /sys and /dev/null: the host's paths, not the store's.
#![allow(clippy::disallowed_methods)]

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::VolumeArgs;
use crate::core::fs::KmsFs;
use crate::core::volume::Volume;
use crate::error::{Error, Result};
use crate::fuse::FuseFs;
use crate::keys::cache::{CacheConfig, DEFAULT_ENTRIES};
use crate::keys::keyring::DEFAULT_CONCURRENCY;

#[derive(Debug, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// An empty directory to mount the plaintext view on
    pub mountpoint: PathBuf,
    /// Mount read-only: no writes to the backing store, only Decrypt calls
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground instead of detaching
    #[arg(long)]
    pub foreground: bool,
    /// Let users other than the one mounting use the mount (permissions still apply)
    #[arg(long)]
    pub allow_other: bool,
    /// Most plaintext data keys kept in the key cache
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ENTRIES)]
    pub key_cache_entries: usize,
    /// How long a cached data key stays (e.g. 300s, 5m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub key_cache_ttl: Duration,
    /// Most key-service calls in flight at once
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY)]
    pub kms_concurrency: usize,
    /// When a file is opened cold, fetch in the background the keys of the files after it in
    /// walk order, up to N fetched and not yet opened (0: never)
    #[arg(long, value_name = "N", default_value_t = crate::core::fs::DEFAULT_PREFETCH)]
    pub key_prefetch: usize,
    /// Let up to N new files at a time return from create before their data key arrives
    /// (their first writes wait in memory; fsync waits for the key; 0: every create waits)
    #[arg(long, value_name = "N", default_value_t = crate::core::fs::DEFAULT_PENDING)]
    pub pending_creates: usize,
    /// How long the kernel may cache attributes and names before asking again (0: never),
    /// which is how long another mount's changes may take to show here
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub cache_timeout: Duration,
    /// Serve no extended attributes (EOPNOTSUPP): `ls -l` and writes then make fewer round
    /// trips to the daemon
    #[arg(long)]
    pub no_xattrs: bool,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Where a kmsfs volume is mounted
    pub mountpoint: PathBuf,
}

pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (e.g. 90s, 5m, 1h)");
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

/// Whether `path` is a mount point now (listed in /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    path.canonicalize()
        .ok()
        .and_then(|canon| mount_device(&canon))
        .is_some()
}

/// The device (`major:minor`) of the newest mount on `canon`, a canonical path, from
/// /proc/self/mountinfo: no `stat`, which on our own mount would wait for ourselves.
fn mount_device(canon: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .find(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape_mountinfo(m) == canon.as_os_str().as_bytes())
        })
        .and_then(|l| l.split(' ').nth(2).map(str::to_owned))
}

/// Whether the kernel checks each access against the modes and owners the mount reports
/// (`default_permissions`). Always with `--allow-other`: other users are held to them. A mount
/// any other user makes for themselves keeps them too (root of a user namespace included), so
/// their own modes bind them (a read-only file stays read-only). Only root's processes reach
/// a mount the host's root makes without `--allow-other` (the kernel lets in no other uid or
/// group), and the kernel lets root past every mode bit but a missing execute bit on a file,
/// which it checks either way (`access(2)` is answered by [`crate::core::fs::KmsFs::access`]);
/// there the check would cost a `GETATTR` of the parent directory after every create or
/// unlink in it and enforce nothing.
fn kernel_checks_permissions(allow_other: bool) -> bool {
    allow_other || !runs_as_host_root()
}

/// Real and effective uid 0 in the host's user namespace. Root of another user namespace
/// (`unshare -U`, rootless containers) is an ordinary user outside it.
fn runs_as_host_root() -> bool {
    rustix::process::getuid().is_root()
        && rustix::process::geteuid().is_root()
        && std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| is_identity_map(&map))
}

/// The uid map of the initial user namespace: every uid is itself.
fn is_identity_map(map: &str) -> bool {
    map.split_whitespace().eq(["0", "0", "4294967295"])
}

/// Readahead for the mount, in KiB. The kernel gives a FUSE mount 128 KiB (and caps what
/// `FUSE_INIT` may ask for at that), so a streaming read is mostly one 128 KiB request in
/// flight at a time. 1 MiB, the largest request the daemon takes, read 512 MiB in 0.49-0.58 s
/// instead of 0.62-1.39 s with caches dropped (docs/PERFORMANCE.md); random reads are
/// unaffected (the kernel does not read ahead for them).
const READ_AHEAD_KIB: u32 = 1024;

/// Sets the mount's readahead through sysfs, which only root may write; otherwise the
/// kernel's default stays, and that is all.
fn widen_readahead(canon: &Path) {
    let Some(dev) = mount_device(canon) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KIB.to_string()) {
        tracing::debug!("cannot set {knob}: {e}; reads keep the kernel's readahead");
    }
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn check_mountpoint(args: &MountArgs) -> Result<()> {
    let mp = &args.mountpoint;
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Refused(format!(
                "mountpoint {} is not a directory",
                mp.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Refused(format!(
                "mountpoint {} does not exist",
                mp.display()
            )))
        }
        Err(e) => return Err(Error::io(format!("cannot access {}", mp.display()), e)),
    }
    if is_mounted(mp) {
        return Err(Error::Refused(format!(
            "{} is already a mount point (busy)",
            mp.display()
        )));
    }
    if let (Ok(m), Ok(b)) = (mp.canonicalize(), args.volume.backing.canonicalize()) {
        if m.starts_with(&b) || b.starts_with(&m) {
            return Err(Error::Usage(
                "the mountpoint and the backing directory must not contain each other".into(),
            ));
        }
    }
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize and fill a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Mounts and serves until unmounted; `ready` is called once the mount is live.
fn serve(args: &MountArgs, ready: impl FnOnce()) -> Result<()> {
    // Signals go to one waiting thread only: block them before any thread starts.
    let set = signal_set();
    // SAFETY: set is initialized; this thread's mask is inherited by threads spawned later.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // The daemon holds plaintext keys: no core dumps, no ptrace by other users.
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };

    check_mountpoint(args)?;
    let mut key_options = super::key_options()?;
    key_options.cache = CacheConfig {
        max_entries: args.key_cache_entries,
        ttl: args.key_cache_ttl,
    };
    key_options.concurrency = args.kms_concurrency.max(1);
    let volume = Volume::open(
        &args.volume.backing,
        &args.volume.open_options(key_options)?,
    )?;
    let backing = args
        .volume
        .backing
        .canonicalize()
        .unwrap_or_else(|_| args.volume.backing.clone());
    let mut core = KmsFs::new(volume, args.read_only)?;
    core.set_key_prefetch(args.key_prefetch);
    core.set_pending_creates(args.pending_creates);
    core.set_xattrs(!args.no_xattrs);
    let core = Arc::new(core);
    core.join_store()?;
    let status_path = super::status::socket_path(&args.mountpoint);

    let mut options = vec![
        fuser::MountOption::FSName(format!("kmsfs:{}", backing.display())),
        fuser::MountOption::Subtype("kmsfs".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if kernel_checks_permissions(args.allow_other) {
        options.push(fuser::MountOption::DefaultPermissions);
    }
    if args.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if args.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(4);
    config.clone_fd = true;
    let (fuse_fs, notifier) = FuseFs::new(core.clone(), args.cache_timeout);
    let canonical_mountpoint = args.mountpoint.canonicalize();
    let session = fuser::Session::new(fuse_fs, &args.mountpoint, &config)
        .map_err(|e| Error::io(format!("cannot mount on {}", args.mountpoint.display()), e))?;
    let _ = notifier.set(session.notifier());
    if let Ok(canon) = &canonical_mountpoint {
        widen_readahead(canon);
    }
    let connection = Arc::new(Connection {
        device: session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("cannot duplicate the FUSE device descriptor", e))?,
        mountpoint: canonical_mountpoint.unwrap_or_else(|_| args.mountpoint.clone()),
    });
    let signalled = connection.clone();
    std::thread::Builder::new()
        .name("kmsfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: set is a valid, initialized signal set; sig is an out-parameter.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!("signal {sig}: unmounting");
            // Detached: a busy mount would refuse a plain unmount, and this thread takes one
            // signal only.
            signalled.detach();
        })
        .map_err(|e| Error::io("cannot start the signal thread", e))?;
    // Drop expired keys from the cache even when nothing asks for them.
    let purger = core.clone();
    let ttl = args.key_cache_ttl;
    std::thread::Builder::new()
        .name("kmsfs-cache".into())
        .spawn(move || loop {
            std::thread::sleep((ttl / 4).max(Duration::from_secs(1)));
            purger.volume().keyring().cache().purge_expired();
        })
        .map_err(|e| Error::io("cannot start the cache thread", e))?;
    let status_socket = match super::status::serve(core.clone(), &args.mountpoint, &status_path) {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!("kmsfs status will not answer for this mount: {e}");
            None
        }
    };
    let session = session
        .spawn()
        .and_then(session_thread)
        .map_err(|e| Error::io("cannot start the FUSE session", e))?;
    ready();
    let result = match session.join() {
        Ok(ended) => ended.map_err(|e| Error::io("the FUSE session failed", e)),
        Err(_) => Err(Error::io(
            "the FUSE session failed",
            std::io::Error::other("a request handler panicked"),
        )),
    };
    // A session that failed with the mount still ours: detach it rather than leave a mount
    // nobody serves.
    connection.detach();
    // Files created without waiting get their key and data before the daemon exits.
    core.settle();
    drop(status_socket);
    log_key_stats(core.volume());
    result
}

/// The daemon's own view of its FUSE connection: a duplicate of the /dev/fuse descriptor its
/// mount was made with.
///
/// fuser 0.18 unmounts the mount point *path* when a session ends, even once the kernel has
/// ended the connection (its liveness check reads POLLERR the wrong way round, fixed upstream
/// in cberner/fuser#703 but not released): after `umount` and a quick `mount` again, the old
/// daemon on its way out would unmount the new mount. So fuser's mount handle is never dropped
/// (see [`session_thread`]), and the daemon unmounts only while this connection lives.
struct Connection {
    device: OwnedFd,
    /// Canonical, as the kernel lists it.
    mountpoint: PathBuf,
}

impl Connection {
    /// Whether the kernel still serves this mount through the connection: /dev/fuse polls
    /// POLLERR once it is unmounted or aborted.
    fn alive(&self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.device.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { libc::poll(&mut fd, 1, 0) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return !(n == 1 && fd.revents & libc::POLLERR != 0);
        }
    }

    /// Detaches the mount (as libfuse does; files already open work on until their last
    /// close) if it is still this connection's, and does nothing once it has ended.
    fn detach(&self) {
        if !self.alive() {
            return;
        }
        if let Err(e) = unmount_path(&self.mountpoint, true) {
            tracing::error!("unmount failed: {e}");
        }
    }
}

/// The thread serving `session`, with fuser's mount handle forgotten (it would unmount by path
/// when dropped, see [`Connection`]).
fn session_thread(
    mut session: fuser::BackgroundSession,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    // A handle to put in its place: `guard` is the only part fuser lets us take.
    let idle = std::thread::Builder::new().spawn(|| Ok(()))?;
    let serving = std::mem::replace(&mut session.guard, idle);
    std::mem::forget(session);
    Ok(serving)
}

/// One summary line of key-service use, at unmount (`RUST_LOG=info`).
fn log_key_stats(volume: &Volume) {
    use crate::keys::KmsOp;
    let ring = volume.keyring();
    let calls: Vec<String> = KmsOp::ALL
        .iter()
        .map(|&op| {
            let s = ring.op_stats(op);
            format!(
                "{op} {} ({} failed, {} retried)",
                s.requests, s.failures, s.retries
            )
        })
        .collect();
    let c = ring.cache_stats();
    tracing::info!(
        "key service calls: {}; key cache: {} hits, {} misses, {} coalesced, {} evicted, {} expired",
        calls.join(", "),
        c.hits,
        c.misses,
        c.coalesced,
        c.evictions,
        c.expirations
    );
}

pub fn run(args: MountArgs) -> Result<()> {
    if args.foreground {
        return serve(&args, || {
            tracing::info!(
                "mounted {} on {}",
                args.volume.backing.display(),
                args.mountpoint.display()
            )
        });
    }
    let mut fds = [0; 2];
    // SAFETY: fds is a two-element array for pipe(2).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "cannot create a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the fds were just created and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (checked: the AWS runtime and every worker start
    // after this point), so the child is a faithful copy.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("cannot fork", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid in the fresh child.
            unsafe { libc::setsid() };
            let status = std::cell::RefCell::new(Some(std::fs::File::from(write_end)));
            let result = serve(&args, || {
                // Closing the pipe releases the parent.
                if let Some(mut pipe) = status.borrow_mut().take() {
                    let _ = pipe.write_all(b"ok\n");
                }
                detach_stdio();
                crate::log::switch_to_syslog();
            });
            if let (Err(e), Some(mut pipe)) = (&result, status.borrow_mut().take()) {
                let _ = writeln!(pipe, "{} {}", e.exit_code(), e);
            }
            std::process::exit(if result.is_ok() { 0 } else { 1 });
        }
        _child => {
            drop(write_end);
            let mut answer = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
            if answer.starts_with("ok") {
                return Ok(());
            }
            let (code, msg) = answer
                .trim_end()
                .split_once(' ')
                .unwrap_or(("1", "the mount daemon exited"));
            Err(Error::Daemon {
                code: code.parse().unwrap_or(1),
                message: msg.to_string(),
            })
        }
    }
}

fn detach_stdio() {
    let null = CString::new("/dev/null").expect("no NUL");
    // SAFETY: open/dup2/close on fds this process owns.
    unsafe {
        let fd = libc::open(null.as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// Waits (up to a minute) for the daemon to finish: it writes the files whose keys were still on
/// their way, then removes its status socket. Returning earlier would let a new mount, or a
/// backup of the backing store, see those files empty.
fn wait_for_daemon(socket: &Path) {
    // A socket nobody answers on (or another user's) is a daemon that is already gone (killed).
    let alive = || super::status::daemon_listens(socket);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive() {
        tracing::warn!("the kmsfs daemon is still finishing after a minute");
    }
}

pub fn umount(args: UmountArgs) -> Result<()> {
    let mp = &args.mountpoint;
    if !is_mounted(mp) {
        return Err(Error::Refused(format!("{} is not mounted", mp.display())));
    }
    let socket = super::status::socket_path(mp);
    unmount_path(mp, false)?;
    wait_for_daemon(&socket);
    Ok(())
}

/// Unmounts whatever is mounted at `mp`: umount2 as root, else through the setuid
/// `fusermount3` (or `fusermount`). `lazy` detaches a busy mount instead of failing.
fn unmount_path(mp: &Path, lazy: bool) -> Result<()> {
    let c = CString::new(mp.as_os_str().as_bytes())
        .map_err(|_| Error::Usage("path with NUL".into()))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: geteuid has no preconditions; umount2 gets a valid path.
    if unsafe { libc::geteuid() } == 0 && unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    for tool in ["fusermount3", "fusermount"] {
        let mut command = std::process::Command::new(tool);
        command.arg("-u");
        if lazy {
            command.arg("-z");
        }
        if let Ok(status) = command.arg(mp).status() {
            if status.success() {
                return Ok(());
            }
            return Err(Error::Refused(format!(
                "{tool} -u {} failed (busy?)",
                mp.display()
            )));
        }
    }
    Err(Error::io(
        format!("cannot unmount {}", mp.display()),
        std::io::Error::last_os_error(),
    ))
}

#[cfg(test)]
mod tests {
    use super::is_identity_map;

    #[test]
    fn only_the_hosts_uid_map_makes_root_the_hosts_root() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        // `unshare -Ur` by uid 1000, and a rootless container's range.
        assert!(!is_identity_map("         0       1000          1\n"));
        assert!(!is_identity_map("         0     100000      65536\n"));
        assert!(!is_identity_map(""));
    }
}
