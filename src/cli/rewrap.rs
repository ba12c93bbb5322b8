//! `kmsfs rewrap`: move every file's key envelopes to another key (key rotation), online.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use clap::Args;

use super::VolumeArgs;
use crate::core::rewrap::{rewrap_files, still_under, Summary};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::keys::spec::KeySpec;
use crate::keys::KmsOp;

#[derive(Debug, Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// The key to move every file to (local:PATH, created if missing, or a KMS key)
    #[arg(long = "to-key", value_name = "KEY")]
    pub to_key: String,
    /// Files rewrapped at once (key calls are also bounded by the volume's KMS concurrency)
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub jobs: usize,
    /// Count what would move; change nothing and call no key service for files
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on standard output
    #[arg(long)]
    pub json: bool,
    /// After a run with no failures, stop trusting every other key (checks both header slots
    /// of every file first)
    #[arg(long)]
    pub retire_old: bool,
}

pub fn run(args: RewrapArgs) -> Result<()> {
    let to = KeySpec::parse(&args.to_key).map_err(Error::Usage)?;
    if args.jobs == 0 {
        return Err(Error::Usage("--jobs must be at least 1".into()));
    }
    let started = Instant::now();
    let mut volume = args.volume.open_to_write()?;
    let (to_id, added) = if args.dry_run {
        (
            volume
                .config()
                .trusted_keys
                .iter()
                .find(|t| t.locator == to.locator() || t.id == args.to_key)
                .map(|t| t.id.clone())
                .unwrap_or_else(|| args.to_key.clone()),
            false,
        )
    } else {
        volume.add_trusted_key(&to)?
    };
    let old = volume.other_trusted_keys(&to_id);
    // Files only: every other object's key is wrapped under the volume, not a trusted key.
    let mut files = volume.files_beneath(&CanonicalPath::root())?;
    files.retain(|p| !crate::core::file::is_dir_record(p));
    let terminal = std::io::stderr().is_terminal() && !args.json;
    let total = files.len();
    let shown = std::sync::atomic::AtomicU64::new(0);
    let progress = |done: usize| {
        if !terminal {
            return;
        }
        // At most ~10 redraws a second.
        let now = started.elapsed().as_millis() as u64 / 100;
        if shown.swap(now, std::sync::atomic::Ordering::Relaxed) != now || done == total {
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(width);
            eprint!(
                "\rrewrap [{}{}] {done}/{total} files",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
        }
    };
    let summary = rewrap_files(
        &volume,
        &files,
        &old,
        &to_id,
        args.jobs,
        args.dry_run,
        &progress,
    );
    if terminal {
        eprintln!();
    }
    let mut retired = Vec::new();
    let mut retire_blockers = Vec::new();
    if args.retire_old && !args.dry_run && summary.failures.is_empty() && !old.is_empty() {
        retire_blockers = still_under(
            &volume,
            &volume.files_beneath(&CanonicalPath::root())?,
            &old,
        );
        if retire_blockers.is_empty() {
            volume.retire_keys(&old)?;
            retired = old.clone();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let ring = volume.keyring();
    let calls: Vec<(KmsOp, u64)> = KmsOp::ALL
        .iter()
        .map(|&op| (op, ring.op_stats(op).requests))
        .collect();
    // Files named as the user knows them, not by their stored paths.
    let mut names = crate::core::names::NameCache::default();
    let mut shown = |list: &[(CanonicalPath, String)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(p, why)| {
                (
                    crate::core::fsck::user_path(&volume, &mut names, p),
                    crate::core::fsck::user_text(&volume, &mut names, why),
                )
            })
            .collect()
    };
    let (failed, blockers) = (shown(&summary.failures), shown(&retire_blockers));
    let outcome = Outcome {
        dry_run: args.dry_run,
        to: &to_id,
        added,
        summary: &summary,
        calls: &calls,
        retired: &retired,
        failed: &failed,
        blockers: &blockers,
        seconds,
    };
    if args.json {
        println!("{}", outcome.json());
    } else {
        outcome.print();
    }
    if !summary.failures.is_empty() {
        return Err(Error::Refused(format!(
            "{} of {} files could not be rewrapped (listed above); run rewrap again to retry them",
            summary.failures.len(),
            summary.files
        )));
    }
    if !retire_blockers.is_empty() {
        return Err(Error::Refused(format!(
            "not retiring the old keys: {} files still need them (listed above)",
            retire_blockers.len()
        )));
    }
    Ok(())
}

/// What one run did, for the summary.
struct Outcome<'a> {
    dry_run: bool,
    to: &'a str,
    added: bool,
    summary: &'a Summary,
    calls: &'a [(KmsOp, u64)],
    retired: &'a [String],
    /// (path, why) of each file that failed, and of each that blocks retiring.
    failed: &'a [(String, String)],
    blockers: &'a [(String, String)],
    seconds: f64,
}

impl Outcome<'_> {
    fn print(&self) {
        let (s, to) = (self.summary, self.to);
        let verb = if self.dry_run { "would move" } else { "moved" };
        if self.added {
            println!("trusted key added: {to} (new files use it)");
        }
        println!(
            "{} files: {} rewrapped ({verb} {} envelopes to {to}), {} already done, {} failed; {:.1} s ({:.0} files/s)",
            s.files,
            s.rewrapped,
            s.envelopes,
            s.already_done,
            s.failures.len(),
            self.seconds,
            s.files as f64 / self.seconds.max(1e-9)
        );
        let calls: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        println!(
            "key service calls: {}",
            if calls.is_empty() {
                "none".to_string()
            } else {
                calls.join(", ")
            }
        );
        for (path, why) in self.failed.iter().chain(self.blockers) {
            println!("failed: {path}: {why}");
        }
        for id in self.retired {
            println!("retired key: {id}");
        }
    }

    fn json(&self) -> String {
        let s = self.summary;
        let calls: serde_json::Map<String, serde_json::Value> = self
            .calls
            .iter()
            .map(|(op, n)| (op.to_string(), serde_json::json!(n)))
            .collect();
        let failed = |list: &[(String, String)]| {
            list.iter()
                .map(|(p, why)| serde_json::json!({"path": p, "error": why}))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "dry_run": self.dry_run,
            "to_key": self.to,
            "key_added": self.added,
            "files": s.files,
            "rewrapped": s.rewrapped,
            "envelopes": s.envelopes,
            "already_done": s.already_done,
            "failed": failed(self.failed),
            "retire_blocked_by": failed(self.blockers),
            "retired_keys": self.retired,
            "kms_calls": calls,
            "seconds": self.seconds,
        })
        .to_string()
    }
}
