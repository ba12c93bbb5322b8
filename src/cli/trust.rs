//! `kmsfs trust`: approve a volume's trusted keys as they are now, in this host's record.

use clap::Args;

use super::VolumeArgs;
use crate::core::trust::state_dir;
use crate::core::volume::{HostRecord, Volume};
use crate::error::Result;

#[derive(Debug, Args)]
pub struct TrustArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
}

/// The config must still open through a key this host recorded (or one pinned with --key)
/// and authenticate; then the keys it trusts now are recorded.
pub fn run(args: TrustArgs) -> Result<()> {
    let dir = state_dir()?;
    let mut options = args.volume.open_options(super::key_options()?)?;
    options.record = HostRecord::Approve(dir.clone());
    let volume = Volume::open(&args.volume.backing, &options)?;
    println!(
        "{} (volume {}): {}",
        args.volume.backing.display(),
        volume.id_hex(),
        volume.record_note().unwrap_or("recorded")
    );
    println!(
        "recorded in {}",
        dir.join("volumes").join(volume.id_hex()).display()
    );
    Ok(())
}
