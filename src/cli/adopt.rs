//! `kmsfs adopt`: accept a file moved on the backing store, deliberately and on the record.

use std::path::PathBuf;

use clap::Args;

use super::{volume_path, VolumeArgs};
use crate::error::Result;

#[derive(Debug, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Where the file is now, relative to the volume root
    pub path: PathBuf,
    /// The path the file was bound to (where it was written)
    #[arg(long = "from", value_name = "OLD_PATH")]
    pub from: PathBuf,
}

pub fn run(args: AdoptArgs) -> Result<()> {
    let path = volume_path(&args.path)?;
    let from = volume_path(&args.from)?;
    let volume = args.volume.open_to_write()?;
    // Errors name both paths as the user does, not by their stored paths.
    let shown = |e| super::shown_error(&volume, &from, super::shown_error(&volume, &path, e));
    let moved = volume
        .stored_path(&path)
        .and_then(|stored| Ok((stored, volume.stored_path(&from)?)))
        .and_then(|(stored, stored_from)| crate::core::adopt::adopt(&volume, &stored, &stored_from))
        .map_err(shown)?;
    tracing::info!(path = %path, from = %from, envelopes = moved, "adopted");
    println!(
        "adopted {path} (was bound to {from}): {moved} envelope(s) re-encrypted to its new path"
    );
    Ok(())
}
