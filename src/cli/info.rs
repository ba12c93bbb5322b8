//! `kmsfs info`: a volume's settings, or what one file's header says. Never key material.

use std::path::PathBuf;

use clap::Args;

use super::{shown_error, volume_path, VolumeArgs};
use crate::core::file::read_header;
use crate::core::{EncryptedFile, Volume};
use crate::error::Result;
use crate::format::block::Layout;
use crate::format::codec::hex;
use crate::format::context::CanonicalPath;
use crate::format::header::SlotState;

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// A file, relative to the volume root
    pub path: Option<PathBuf>,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let path = args.path.as_deref().map(volume_path).transpose()?;
    let volume = args.volume.open()?;
    match path {
        None => {
            print_volume(&volume);
            Ok(())
        }
        // Errors name the file as the user does, not by its stored path.
        Some(plain) => file_info(&volume, &plain).map_err(|e| shown_error(&volume, &plain, e)),
    }
}

fn file_info(volume: &Volume, plain: &CanonicalPath) -> Result<()> {
    let path = volume.stored_path(plain)?;
    let file = crate::core::file::open_backing(volume, &path, false)?;
    let (header, len) = read_header(&file, &path)?;
    let preamble = &header.preamble;
    let layout = Layout {
        data_offset: preamble.data_offset(),
        block_size: preamble.block_size,
    };
    println!("path:        {plain}");
    if &path != plain {
        println!("stored as:   {path}");
    }
    println!(
        "backing:     {}",
        volume.root().join(path.to_relative_path()).display()
    );
    match layout.plaintext_len(len) {
        Ok(size) => println!(
            "size:        {size} bytes in {} blocks of {} (backing file {len} bytes)",
            layout.block_count(size),
            preamble.block_size
        ),
        Err(e) => println!("size:        unknown: {e}"),
    }
    println!("file id:     {}", hex(&preamble.file_id));
    println!(
        "header:      {} bytes (two slots of {})",
        preamble.data_offset(),
        preamble.slot_size
    );
    for (i, slot) in header.slots.iter().enumerate() {
        match slot {
            SlotState::Empty => println!("slot {i}:      empty"),
            SlotState::Damaged(why) => println!("slot {i}:      damaged: {why}"),
            SlotState::Sealed(c) => {
                println!(
                    "slot {i}:      generation {}, {} envelope(s), {:?} mode {:04o} owner {}:{}",
                    c.generation,
                    c.envelopes.len(),
                    c.attrs.kind,
                    c.attrs.mode,
                    c.attrs.uid,
                    c.attrs.gid
                );
                for e in &c.envelopes {
                    let here = if e.path == path {
                        ""
                    } else {
                        "  (another path)"
                    };
                    // The path as the user knows it, where it decrypts.
                    println!(
                        "  key {} bound to {}{here}",
                        e.key.key_id,
                        volume.shown_path(&e.path)
                    );
                }
            }
        }
    }
    // Authenticate: unwrap through the keyring, check commitment and slot MAC.
    let opened = EncryptedFile::from_file(volume, &path, file)?;
    println!(
        "status:      authenticated (slot generation {})",
        opened.generation()
    );
    Ok(())
}

fn print_volume(volume: &Volume) {
    let c = volume.config();
    println!("volume:      {}", volume.id_hex());
    println!("backing:     {}", volume.root().display());
    println!("block size:  {}", c.block_size);
    println!(
        "suite:       {} (AES-256-GCM blocks, HKDF-SHA256, key commitment)",
        c.suite
    );
    let features = if c.features.is_empty() {
        "none".to_string()
    } else {
        c.features.join(", ")
    };
    println!("features:    {features}");
    let names = if volume.encrypted_names() {
        "encrypted (AES-SIV, per-directory)"
    } else {
        "plaintext"
    };
    println!("names:       {names}");
    println!("trusted keys (new files use the first):");
    for k in &c.trusted_keys {
        println!("  {}  {}", k.id, k.locator);
    }
    if c.context.is_empty() {
        println!("context:     none besides kmsfs:volume and kmsfs:path");
    } else {
        println!("context:");
        for (k, v) in &c.context {
            println!("  {k}={v}");
        }
    }
    println!("config:      authenticated");
}
