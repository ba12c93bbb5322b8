//! `kmsfs decode`: the plaintext path of a stored path (from CloudTrail's `kmsfs:path`, or as
//! fsck shows a path that does not decrypt).

use clap::Args;

use super::{printable, VolumeArgs};
use crate::core::names::NameCache;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// A stored path, as the encryption context names it: /Xk2…/bQ9…
    #[arg(value_name = "STORED-PATH")]
    pub stored: String,
    /// The other way: STORED-PATH is a path as users know it; print where it is (or would
    /// be) stored (its directory must exist), e.g. to put a restored file there for `adopt`
    #[arg(long)]
    pub reverse: bool,
}

pub fn run(args: DecodeArgs) -> Result<()> {
    if args.reverse {
        let plain = super::volume_path(std::path::Path::new(&args.stored))?;
        let volume = args.volume.open()?;
        let parent = plain
            .parent()
            .unwrap_or_else(crate::format::context::CanonicalPath::root);
        let name = plain.to_relative_path();
        let name = name
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let dir = volume
            .stored_path(&parent)
            .map_err(|e| super::shown_error(&volume, &parent, e))?;
        let child = volume.stored_child(&dir, None, name)?;
        println!("{}", printable(child.path.as_str()));
        if let Some(side) = child.side {
            // A long name needs its side record too, before its entry appears.
            volume.put_side_record(&side)?;
        }
        return Ok(());
    }
    // A path copied from a listing of the store may lack the leading '/'.
    let stored = if args.stored.starts_with('/') {
        args.stored.clone()
    } else {
        format!("/{}", args.stored)
    };
    if let Err(e) = crate::format::context::CanonicalPath::from_encoded(&stored) {
        return Err(Error::Usage(format!("not a stored path: {e}")));
    }
    let volume = args.volume.open()?;
    match crate::core::audit::decode(&volume, &mut NameCache::default(), &stored) {
        Ok(plain) => {
            println!("{}", printable(plain.as_str()));
            Ok(())
        }
        Err(why) => Err(Error::Refused(format!(
            "{}: does not decode: {}",
            printable(&stored),
            printable(&why)
        ))),
    }
}
