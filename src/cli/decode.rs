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
}

pub fn run(args: DecodeArgs) -> Result<()> {
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
