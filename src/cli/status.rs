//! `kmsfs status`: what a running mount is doing, asked over a Unix socket the daemon serves.
//!
//! The daemon listens on a socket named after its mount point in a directory only its user can
//! enter (`/run/kmsfs` for root, `$XDG_RUNTIME_DIR/kmsfs` or `/tmp/kmsfs-UID` otherwise); each
//! connection gets one JSON snapshot (key cache, key-service calls by kind with failures,
//! retries and mean latency, I/O errors) and is closed. The socket holds no secret and accepts
//! no command.
//!
//! Neither side trusts the path alone. The daemon serves only from a directory that `lstat`
//! shows is its user's, mode 0700 (it creates one that is missing): anything else, such as a
//! `/tmp/kmsfs-UID` another user made first, turns status off with one log line and the mount
//! goes on. The client reads only from a daemon of its own user or root (`SO_PEERCRED`), reads
//! at most [`MAX_ANSWER`] bytes, and shows every control character it received escaped.

// The status socket's directory: the host's paths, not the store's.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::core::fs::KmsFs;
use crate::error::{Error, Result};
use crate::keys::KmsOp;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Where a kmsfs volume is mounted
    pub mountpoint: PathBuf,
    /// Print the snapshot as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// The most `kmsfs status` reads from a daemon (a snapshot is a few KiB).
pub const MAX_ANSWER: usize = 1 << 20;

/// How long `kmsfs status` waits for the whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn socket_dir() -> PathBuf {
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/kmsfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("kmsfs"),
        _ => PathBuf::from(format!("/tmp/kmsfs-{}", uid.as_raw())),
    }
}

/// The socket of the mount at `mountpoint` (named by a hash of its canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let canon = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let digest = Sha256::digest(canon.as_os_str().as_encoded_bytes());
    let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    socket_dir().join(format!("{name}.sock"))
}

/// Opens the daemon's socket directory `dir` (`O_PATH`, not following a symbolic link),
/// creating it with mode 0700 if it is missing, and checks what `lstat` shows of it: a
/// directory owned by this process's user with no access for group or others. Everything after
/// is done relative to the descriptor, so the directory checked is the one the socket goes in.
fn open_socket_dir(dir: &Path) -> Result<OwnedFd> {
    let uid = rustix::process::geteuid();
    match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(Error::io(
                format!("cannot create {}", dir.display()),
                e.into(),
            ))
        }
    }
    let wrong = |is: String| {
        Error::Refused(format!(
            "{} must be a directory owned by uid {} with mode 0700, but it is {is}",
            dir.display(),
            uid.as_raw()
        ))
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOTDIR | Errno::LOOP) => {
            let symlink = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_symlink());
            return Err(wrong(if symlink {
                "a symbolic link".into()
            } else {
                "not a directory".into()
            }));
        }
        Err(e) => {
            return Err(Error::io(
                format!("cannot open {}", dir.display()),
                e.into(),
            ))
        }
    };
    let st = rustix::fs::fstat(&fd)
        .map_err(|e| Error::io(format!("cannot stat {}", dir.display()), e.into()))?;
    let mode = st.st_mode & 0o7777;
    if st.st_uid != uid.as_raw() || mode & 0o077 != 0 {
        return Err(wrong(format!(
            "owned by uid {} with mode {mode:04o}",
            st.st_uid
        )));
    }
    Ok(fd)
}

/// The socket a daemon serves on. Dropping it removes the socket file, unless another daemon
/// has since bound its own at that path (a new mount at the same mount point, started before
/// this daemon finished).
pub struct StatusSocket {
    dir: OwnedFd,
    name: PathBuf,
    identity: (u64, u64),
}

impl StatusSocket {
    fn identity_of(dir: &OwnedFd, name: &Path) -> rustix::io::Result<(u64, u64)> {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|st| (st.st_dev, st.st_ino))
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        if Self::identity_of(&self.dir, &self.name).ok() == Some(self.identity) {
            let _ = rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty());
        }
    }
}

/// Serves snapshots for the mount at `mountpoint` on the socket `path` (from [`socket_path`],
/// computed before mounting: resolving a path through a mount its daemon does not serve yet
/// would hang) until the process ends. Its directory must pass [`open_socket_dir`]; a socket of
/// this user already at `path` (left by a daemon that was killed, or is still finishing) is
/// replaced, anything else there is left alone and status is off.
pub fn serve(core: Arc<KmsFs>, mountpoint: &Path, path: &Path) -> Result<StatusSocket> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::Usage(format!(
            "{} has no directory or no name",
            path.display()
        )));
    };
    let name = PathBuf::from(name);
    let dir = open_socket_dir(dir)?;
    let uid = rustix::process::geteuid();
    match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st)
            if FileType::from_raw_mode(st.st_mode) == FileType::Socket
                && st.st_uid == uid.as_raw() =>
        {
            rustix::fs::unlinkat(&dir, &name, AtFlags::empty())
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e.into()))?
        }
        Ok(_) => {
            return Err(Error::Refused(format!(
                "{} exists and is not a socket of uid {}: leaving it alone",
                path.display(),
                uid.as_raw()
            )))
        }
        Err(Errno::NOENT) => {}
        Err(e) => {
            return Err(Error::io(
                format!("cannot stat {}", path.display()),
                e.into(),
            ))
        }
    }
    // Bound through the checked directory's descriptor: no path resolution to redirect (and
    // bind(2) never follows a symbolic link at the name itself).
    let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&name);
    let listener = UnixListener::bind(&via)
        .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
    let identity = StatusSocket::identity_of(&dir, &name)
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e.into()))?;
    let socket = StatusSocket {
        dir,
        name,
        identity,
    };
    let started = Instant::now();
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("kmsfs-status".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let snapshot = snapshot(&core, &mp, started.elapsed());
                let _ = (&conn).write_all(snapshot.to_string().as_bytes());
            }
        })
        .map_err(|e| Error::io("cannot start the status thread", e))?;
    Ok(socket)
}

/// This process's resident and peak resident memory in KiB, from one read of
/// `/proc/self/status` (0 for a line that is missing).
fn own_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn snapshot(core: &KmsFs, mountpoint: &Path, uptime: Duration) -> serde_json::Value {
    let volume = core.volume();
    let ring = volume.keyring();
    let calls: serde_json::Map<String, serde_json::Value> = KmsOp::ALL
        .iter()
        .map(|&op| {
            let s = ring.op_stats(op);
            let mean_ms = if s.requests == 0 {
                0.0
            } else {
                s.total_latency_us as f64 / s.requests as f64 / 1000.0
            };
            (
                op.to_string(),
                serde_json::json!({
                    "requests": s.requests, "failures": s.failures, "retries": s.retries,
                    "mean_latency_ms": mean_ms,
                }),
            )
        })
        .collect();
    let c = ring.cache_stats();
    let (rss_kib, peak_rss_kib) = own_memory();
    serde_json::json!({
        "mountpoint": mountpoint.display().to_string(),
        "backing": volume.root().display().to_string(),
        "volume": volume.id_hex(),
        "pid": std::process::id(),
        "uptime_s": uptime.as_secs(),
        "read_only": core.read_only(),
        "trusted_keys": ring.key_ids(),
        "key_cache": {
            "entries": c.entries, "hits": c.hits, "misses": c.misses, "coalesced": c.coalesced,
            "evictions": c.evictions, "expirations": c.expirations, "locked_in_memory": c.locked,
        },
        "kms_calls": calls,
        "io_errors": core.io_errors(),
        "unusable_rebind_records": core.unusable_records(),
        "inodes": core.known_inodes(),
        "memory": { "rss_kib": rss_kib, "peak_rss_kib": peak_rss_kib },
        // SAFETY: PR_GET_DUMPABLE reads a flag of this process.
        "dumpable": unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0,
    })
}

/// `text` as it can be shown on a terminal: every control character (C0, newline included, DEL
/// and C1) becomes `\xNN`, so nothing a daemon sends can move the cursor, set a title, clear the
/// screen or forge a line of its own.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// `v` as JSON text with no control character in it: serde_json escapes C0 in strings, and DEL
/// and C1 (which it leaves alone) get the same `\u00NN` form, so the value is unchanged.
fn json_without_controls(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in v.to_string().chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// One value of the snapshot for a human: a string as it is, anything else as JSON, escaped.
fn show(v: &serde_json::Value) -> String {
    escape_controls(&match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "?".into(),
        other => other.to_string(),
    })
}

/// Reads the daemon's whole answer: at most [`MAX_ANSWER`] bytes, within [`ANSWER_TIMEOUT`]
/// (`Ok(None)` if it is longer).
fn read_answer(mut conn: &UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(&mut buf) {
            Ok(0) => return Ok(Some(answer)),
            Ok(n) if answer.len() + n > MAX_ANSWER => return Ok(None),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The user whose process listens on the other end of `conn` (`SO_PEERCRED`). Only this
/// user's daemon or root's may be believed: anyone else could have made the directory first
/// (`/tmp/kmsfs-UID`) and would answer with anything it likes.
fn served_by(conn: &UnixStream) -> rustix::io::Result<rustix::process::Uid> {
    rustix::net::sockopt::socket_peercred(conn).map(|cred| cred.uid)
}

/// Whether a daemon of this user or root listens on the status socket `path` (`kmsfs umount`
/// waits while one does; another user's socket there is no daemon of ours).
pub fn daemon_listens(path: &Path) -> bool {
    let me = rustix::process::geteuid();
    UnixStream::connect(path)
        .ok()
        .and_then(|conn| served_by(&conn).ok())
        .is_some_and(|uid| uid == me || uid.is_root())
}

pub fn run(args: StatusArgs) -> Result<()> {
    let path = socket_path(&args.mountpoint);
    let not_mounted = |e: std::io::Error| {
        Error::Refused(format!(
            "{} is not a kmsfs mount of this user, or its daemon does not answer ({e})",
            args.mountpoint.display()
        ))
    };
    let conn = UnixStream::connect(&path).map_err(not_mounted)?;
    let server = served_by(&conn).map_err(|e| {
        Error::io(
            format!("cannot tell who serves {}", path.display()),
            e.into(),
        )
    })?;
    let me = rustix::process::geteuid();
    if server != me && !server.is_root() {
        return Err(Error::Refused(format!(
            "{} is served by uid {}, not by this user (uid {}) or root: not reading its answer",
            path.display(),
            server.as_raw(),
            me.as_raw()
        )));
    }
    let answer = read_answer(&conn).map_err(not_mounted)?.ok_or_else(|| {
        Error::Refused(format!(
            "the daemon's answer is longer than {} KiB: not reading it",
            MAX_ANSWER / 1024
        ))
    })?;
    let text = String::from_utf8_lossy(&answer);
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Refused(format!("the daemon's answer is not JSON: {e}")))?;
    if args.json {
        println!("{}", json_without_controls(&v));
        return Ok(());
    }
    println!(
        "{} on {} (volume {}, pid {}, up {} s{})",
        show(&v["backing"]),
        show(&v["mountpoint"]),
        show(&v["volume"]),
        show(&v["pid"]),
        show(&v["uptime_s"]),
        if v["read_only"] == true {
            ", read-only"
        } else {
            ""
        }
    );
    let k = &v["key_cache"];
    println!(
        "key cache: {} entries, {} hits, {} misses ({} coalesced), {} evicted, {} expired",
        show(&k["entries"]),
        show(&k["hits"]),
        show(&k["misses"]),
        show(&k["coalesced"]),
        show(&k["evictions"]),
        show(&k["expirations"])
    );
    println!("key service calls:");
    if let Some(calls) = v["kms_calls"].as_object() {
        for (op, s) in calls {
            println!(
                "  {:<16} {:>8} requests {:>6} failed {:>6} retried  mean {:.2} ms",
                escape_controls(op),
                show(&s["requests"]),
                show(&s["failures"]),
                show(&s["retries"]),
                s["mean_latency_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "inodes the kernel holds: {}; memory: {} KiB resident (peak {} KiB)",
        show(&v["inodes"]),
        show(&v["memory"]["rss_kib"]),
        show(&v["memory"]["peak_rss_kib"])
    );
    if v["unusable_rebind_records"].as_u64().is_some_and(|n| n > 0) {
        println!(
            "rebind records left in place, unread (see kmsfs fsck): {}",
            show(&v["unusable_rebind_records"])
        );
    }
    println!("I/O errors returned: {}", show(&v["io_errors"]));
    Ok(())
}
