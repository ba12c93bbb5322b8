//! `kmsfs status`: what a running mount is doing, asked over a Unix socket the daemon serves.
//!
//! The daemon listens on a socket named after its mount point in a directory only its user can
//! enter (`/run/kmsfs` for root, `$XDG_RUNTIME_DIR/kmsfs` or `/tmp/kmsfs-UID` otherwise); each
//! connection gets one JSON snapshot (key cache, key-service calls by kind with failures,
//! retries and mean latency, I/O errors) and is closed. The socket holds no secret and accepts
//! no command.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

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

fn socket_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/kmsfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("kmsfs"),
        _ => PathBuf::from(format!("/tmp/kmsfs-{uid}")),
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

/// The socket a daemon serves on. Dropping it removes the socket file, unless another daemon
/// has since bound its own at that path (a new mount at the same mount point, started before
/// this daemon finished).
pub struct StatusSocket {
    path: PathBuf,
    identity: (u64, u64),
}

impl StatusSocket {
    fn identity_of(path: &Path) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        if Self::identity_of(&self.path).ok() == Some(self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves snapshots for the mount at `mountpoint` on the socket `path` (from [`socket_path`],
/// computed before mounting: resolving a path through a mount its daemon does not serve yet
/// would hang) until the process ends.
pub fn serve(core: Arc<KmsFs>, mountpoint: &Path, path: &Path) -> Result<StatusSocket> {
    let dir = socket_dir();
    std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::io(format!("cannot prepare {}", dir.display()), e))?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
    let socket = StatusSocket {
        path: path.to_path_buf(),
        identity: StatusSocket::identity_of(path)
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?,
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
        "inodes": core.known_inodes(),
        "memory": { "rss_kib": rss_kib, "peak_rss_kib": peak_rss_kib },
        // SAFETY: PR_GET_DUMPABLE reads a flag of this process.
        "dumpable": unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0,
    })
}

pub fn run(args: StatusArgs) -> Result<()> {
    let path = socket_path(&args.mountpoint);
    let not_mounted = |e: std::io::Error| {
        Error::Refused(format!(
            "{} is not a kmsfs mount of this user, or its daemon does not answer ({e})",
            args.mountpoint.display()
        ))
    };
    let mut conn = UnixStream::connect(&path).map_err(not_mounted)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(not_mounted)?;
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(not_mounted)?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Refused(format!("the daemon's answer is not JSON: {e}")))?;
    println!(
        "{} on {} (volume {}, pid {}, up {} s{})",
        v["backing"].as_str().unwrap_or("?"),
        v["mountpoint"].as_str().unwrap_or("?"),
        v["volume"].as_str().unwrap_or("?"),
        v["pid"],
        v["uptime_s"],
        if v["read_only"] == true {
            ", read-only"
        } else {
            ""
        }
    );
    let k = &v["key_cache"];
    println!(
        "key cache: {} entries, {} hits, {} misses ({} coalesced), {} evicted, {} expired",
        k["entries"], k["hits"], k["misses"], k["coalesced"], k["evictions"], k["expirations"]
    );
    println!("key service calls:");
    if let Some(calls) = v["kms_calls"].as_object() {
        for (op, s) in calls {
            println!(
                "  {op:<16} {:>8} requests {:>6} failed {:>6} retried  mean {:.2} ms",
                s["requests"],
                s["failures"],
                s["retries"],
                s["mean_latency_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "inodes the kernel holds: {}; memory: {} KiB resident (peak {} KiB)",
        v["inodes"], v["memory"]["rss_kib"], v["memory"]["peak_rss_kib"]
    );
    println!("I/O errors returned: {}", v["io_errors"]);
    Ok(())
}
