//! `kmsfs cat`: decrypt one file to standard output.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{volume_path, VolumeArgs};
use crate::core::EncryptedFile;
use crate::error::{Error, Result};
use crate::format::header::ObjectKind;

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// The file, relative to the volume root
    pub path: PathBuf,
}

pub fn run(args: CatArgs) -> Result<()> {
    let path = volume_path(&args.path)?;
    let volume = args.volume.open()?;
    let path = volume.stored_path(&path)?;
    let file = EncryptedFile::open(&volume, &path, false)?;
    if file.attrs().kind != ObjectKind::File {
        return Err(Error::Refused(format!(
            "{path} is a {:?}, not a file",
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
