//! `kmsfs import`: encrypt data into a new file of a volume without mounting it.

use std::path::PathBuf;

use clap::Args;

use super::{shown_error, volume_path, VolumeArgs};
use crate::core::file::write_new_file;
use crate::core::Volume;
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;

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
    let volume = args.volume.open_to_write()?;
    // Owned by whoever imports it, readable by them alone (chmod through a mount to share).
    // Errors name the file as the user does, not by its stored path.
    let size = import(&volume, &path, &mut input).map_err(|e| shown_error(&volume, &path, e))?;
    println!("wrote {size} bytes to {path}");
    Ok(())
}

fn import(volume: &Volume, path: &CanonicalPath, input: &mut dyn std::io::Read) -> Result<u64> {
    // The parent is looked up first, one directory at a time: one that is missing is named as
    // such (with encrypted names, not as a record that cannot be opened for its id).
    let parent = path.parent().unwrap_or_else(CanonicalPath::root);
    let mut dir = CanonicalPath::root();
    for name in parent.to_relative_path().iter() {
        let child = volume.stored_child(&dir, None, name.as_encoded_bytes())?;
        if !volume
            .backing()
            .metadata(&child.path)
            .is_ok_and(|m| m.is_dir())
        {
            return Err(Error::Refused(format!(
                "the parent directory of {path} does not exist"
            )));
        }
        dir = child.path;
    }
    let stored = volume.prepare_entry(path)?;
    write_new_file(volume, &stored, input)
}
