//! `kmsfs import`: encrypt data into a new file of a volume without mounting it.

use std::path::PathBuf;

use clap::Args;

use super::{volume_path, VolumeArgs};
use crate::core::file::write_new_file;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// The new file, relative to the volume root (its directory must exist)
    pub path: PathBuf,
    /// Read the plaintext from FILE instead of standard input ('-')
    #[arg(long, value_name = "FILE", default_value = "-")]
    pub from: PathBuf,
}

#[allow(clippy::disallowed_methods)] // --from is the user's file, not the store's
pub fn run(args: ImportArgs) -> Result<()> {
    let path = volume_path(&args.path)?;
    let mut input: Box<dyn std::io::Read> = if args.from.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&args.from)
                .map_err(|e| Error::io(format!("cannot open {}", args.from.display()), e))?,
        )
    };
    let volume = args.volume.open()?;
    // Owned by whoever imports it, readable by them alone (chmod through a mount to share).
    let stored = volume.prepare_entry(&path)?;
    let size = write_new_file(&volume, &stored, &mut input)?;
    println!("wrote {size} bytes to {path}");
    Ok(())
}
