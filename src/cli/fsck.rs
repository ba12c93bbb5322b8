//! `kmsfs fsck`: check every file of a volume; exit 0 only when it is clean.

use clap::Args;

use super::VolumeArgs;
use crate::core::fsck;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct FsckArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Also decrypt every block of every file (reads all data)
    #[arg(long)]
    pub deep: bool,
    /// Drop stale envelopes (names a file no longer has) and finished rebind records; never
    /// touches data
    #[arg(long)]
    pub repair: bool,
    /// Print the report as one JSON object on standard output
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FsckArgs) -> Result<()> {
    let volume = if args.repair {
        args.volume.open_to_write()?
    } else {
        args.volume.open()?
    };
    let started = std::time::Instant::now();
    let report = fsck::check(&volume, args.deep, args.repair)?;
    let open_problems = report.problems.iter().filter(|p| !p.repaired).count();
    if args.json {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "path": p.path, "kind": p.kind, "detail": p.detail, "repaired": p.repaired
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "files": report.files,
                "deep": args.deep,
                "clean": report.clean(),
                "problems": problems,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        for p in &report.problems {
            let fixed = if p.repaired { " [repaired]" } else { "" };
            println!("{}: {}: {}{fixed}", p.path, p.kind, p.detail);
        }
        println!(
            "{} files checked{}: {}",
            report.files,
            if args.deep { " (every block)" } else { "" },
            if open_problems == 0 {
                "clean".to_string()
            } else {
                format!("{open_problems} problems")
            }
        );
    }
    if open_problems > 0 {
        return Err(Error::Integrity(format!(
            "{open_problems} problems found in {} (listed above)",
            volume.root().display()
        )));
    }
    Ok(())
}
