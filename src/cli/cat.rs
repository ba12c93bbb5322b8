//! `kmsfs cat`: decrypt one file to standard output.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{shown_error, volume_path, VolumeArgs};
use crate::core::{EncryptedFile, Volume};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::header::ObjectKind;

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// The file, relative to the volume root
    pub path: PathBuf,
}

pub fn run(args: CatArgs) -> Result<()> {
    let plain = volume_path(&args.path)?;
    let volume = args.volume.open()?;
    // Errors name the file as the user does, not by its stored path.
    cat(&volume, &plain).map_err(|e| shown_error(&volume, &plain, e))
}

fn cat(volume: &Volume, plain: &CanonicalPath) -> Result<()> {
    let path = volume.stored_path(plain)?;
    let file = EncryptedFile::open(volume, &path, false)?;
    if file.attrs().kind != ObjectKind::File {
        return Err(Error::Refused(format!(
            "{plain} is a {:?}, not a file",
            file.attrs().kind
        )));
    }
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    loop {
        // Every byte written has been authenticated; a bad block stops the stream there.
        let n = file.read_at(offset, &mut buf)?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(Error::io("cannot write to standard output", e)),
        }
        offset += n as u64;
    }
    if file.size() == 0 {
        file.verify_all()?;
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("cannot write to standard output", e))
        }
        _ => Ok(()),
    }
}
