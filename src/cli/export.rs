//! `kmsfs export`: decrypt a volume, or a subtree, to a directory or a tar stream.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::{volume_path, VolumeArgs};
use crate::core::export::{export, Destination, ExportOptions, ExportSummary};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// A new or empty directory, or - for a tar stream on standard output
    pub dest: PathBuf,
    /// Export only this file or directory (relative to the volume root)
    #[arg(long, value_name = "PATH")]
    pub subtree: Option<PathBuf>,
    /// Give entries the owners recorded on the store (attacker-controlled metadata); without
    /// it they belong to the user running export
    #[arg(long)]
    pub same_owner: bool,
    /// Recreate device nodes found on the store; without it they are skipped and reported
    #[arg(long)]
    pub devices: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let subtree = match &args.subtree {
        Some(p) => volume_path(p)?,
        None => CanonicalPath::root(),
    };
    let to_stdout = args.dest.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        return Err(Error::Usage(
            "refusing to write a tar stream to a terminal; redirect it or name a directory".into(),
        ));
    }
    let volume = args.volume.open()?;
    // Errors name the subtree as the user does (those beneath it are named so by export).
    let plain = subtree;
    let shown = |e| super::shown_error(&volume, &plain, e);
    let subtree = volume.stored_path(&plain).map_err(shown)?;
    let dest = if to_stdout {
        Destination::Tar(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout().lock(),
        )))
    } else {
        Destination::Dir(args.dest.clone())
    };
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let last = std::cell::Cell::new(0u128);
    let progress = |s: &ExportSummary| {
        let now = started.elapsed().as_millis() / 200;
        if terminal && last.replace(now) != now {
            eprint!("\rexport: {} files, {} MB", s.files, s.bytes / 1_000_000);
        }
    };
    let options = ExportOptions {
        same_owner: args.same_owner,
        devices: args.devices,
    };
    let summary = export(&volume, &subtree, dest, options, &progress).map_err(shown)?;
    if terminal {
        eprint!("\r");
    }
    let secs = started.elapsed().as_secs_f64();
    let mut line = format!(
        "exported {} files ({} bytes), {} directories, {} hard links, {} symlinks, {} special files in {:.1} s; {} failed",
        summary.files,
        summary.bytes,
        summary.dirs,
        summary.links,
        summary.symlinks,
        summary.special,
        secs,
        summary.failures.len()
    );
    if !summary.skipped.is_empty() {
        line.push_str(&format!(", {} device nodes skipped", summary.skipped.len()));
    }
    // With a tar stream on stdout, the report goes to stderr.
    for (path, what) in &summary.skipped {
        // The name is the store's: a newline in it must not make a line of its own.
        let path: String = path.as_str().chars().flat_map(char::escape_debug).collect();
        eprintln!("skipped: {path}: a {what} (not recreated without --devices)");
    }
    for (_, why) in &summary.failures {
        eprintln!("not exported: {why}");
    }
    if to_stdout {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    if !summary.failures.is_empty() {
        return Err(Error::Integrity(format!(
            "{} files could not be exported (listed above)",
            summary.failures.len()
        )));
    }
    Ok(())
}
