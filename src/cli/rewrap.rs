//! `kmsfs rewrap`: move every file's key envelopes to another key (key rotation), online.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use clap::Args;

use super::VolumeArgs;
use crate::core::rewrap::{all_files, rewrap_files, still_under, Summary};
use crate::error::{Error, Result};
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
    let mut volume = args.volume.open()?;
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
    let old: Vec<String> = volume
        .config()
        .trusted_keys
        .iter()
        .map(|t| t.id.clone())
        .filter(|id| id != &to_id)
        .collect();
    let files = all_files(&volume)?;
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
        retire_blockers = still_under(&volume, &all_files(&volume)?, &old);
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
    if args.json {
        println!(
            "{}",
            json_summary(
                &args,
                &to_id,
                added,
                &summary,
                &calls,
                &retired,
                &retire_blockers,
                seconds
            )
        );
    } else {
        print_summary(
            &args,
            &to_id,
            added,
            &summary,
            &calls,
            &retired,
            &retire_blockers,
            seconds,
        );
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

#[allow(clippy::too_many_arguments)]
fn print_summary(
    args: &RewrapArgs,
    to: &str,
    added: bool,
    s: &Summary,
    calls: &[(KmsOp, u64)],
    retired: &[String],
    blockers: &[(crate::format::context::CanonicalPath, String)],
    seconds: f64,
) {
    let verb = if args.dry_run { "would move" } else { "moved" };
    if added {
        println!("trusted key added: {to} (new files use it)");
    }
    println!(
        "{} files: {} rewrapped ({verb} {} envelopes to {to}), {} already done, {} failed; {:.1} s ({:.0} files/s)",
        s.files,
        s.rewrapped,
        s.envelopes,
        s.already_done,
        s.failures.len(),
        seconds,
        s.files as f64 / seconds.max(1e-9)
    );
    let calls: Vec<String> = calls
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
    for (path, why) in s.failures.iter().chain(blockers) {
        println!("failed: {path}: {why}");
    }
    for id in retired {
        println!("retired key: {id}");
    }
}

#[allow(clippy::too_many_arguments)]
fn json_summary(
    args: &RewrapArgs,
    to: &str,
    added: bool,
    s: &Summary,
    calls: &[(KmsOp, u64)],
    retired: &[String],
    blockers: &[(crate::format::context::CanonicalPath, String)],
    seconds: f64,
) -> String {
    let calls: serde_json::Map<String, serde_json::Value> = calls
        .iter()
        .map(|(op, n)| (op.to_string(), serde_json::json!(n)))
        .collect();
    let failed = |list: &[(crate::format::context::CanonicalPath, String)]| {
        list.iter()
            .map(|(p, why)| serde_json::json!({"path": p.as_str(), "error": why}))
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "dry_run": args.dry_run,
        "to_key": to,
        "key_added": added,
        "files": s.files,
        "rewrapped": s.rewrapped,
        "envelopes": s.envelopes,
        "already_done": s.already_done,
        "failed": failed(&s.failures),
        "retire_blocked_by": failed(blockers),
        "retired_keys": retired,
        "kms_calls": calls,
        "seconds": seconds,
    })
    .to_string()
}
