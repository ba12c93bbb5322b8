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
    let volume = args.volume.open()?;
    let (stored, stored_from) = (volume.stored_path(&path)?, volume.stored_path(&from)?);
    let moved = crate::core::adopt::adopt(&volume, &stored, &stored_from)?;
    tracing::info!(path = %path, from = %from, envelopes = moved, "adopted");
    println!(
        "adopted {path} (was bound to {from}): {moved} envelope(s) re-encrypted to its new path"
    );
    Ok(())
}
