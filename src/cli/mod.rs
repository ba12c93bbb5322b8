//! The command line: one module per command, all sharing these definitions.
//!
//! Commands return [`crate::error::Error`]; `main` prints it as one line and exits with its
//! code, so every command fails the same way.

pub mod adopt;
pub mod audit;
pub mod cat;
pub mod completions;
pub mod decode;
pub mod export;
pub mod fsck;
pub mod import;
pub mod info;
pub mod init;
pub mod mount;
pub mod mount_helper;
pub mod rewrap;
pub mod status;
pub mod trust;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::core::volume::{is_reserved_name, HostRecord, KeyOptions, OpenOptions, Volume};
use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::keys::aws::AwsOptions;
use crate::keys::spec::KeySpec;

#[derive(Debug, Parser)]
#[command(
    name = "kmsfs",
    version,
    about = "A directory encrypted at rest with AWS KMS envelope encryption",
    long_about = "kmsfs keeps a directory encrypted at rest: every file has its own data key, \
wrapped by a key-encryption key (AWS KMS or a local master key file) under an encryption \
context naming the volume and the file's path."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new volume in an empty backing directory
    Init(init::InitArgs),
    /// Show a volume's settings, or one file's header
    Info(info::InfoArgs),
    /// Decrypt one file to standard output
    Cat(cat::CatArgs),
    /// Encrypt standard input (or a file) into a new file of the volume
    Import(import::ImportArgs),
    /// Mount the plaintext view of a volume (FUSE)
    Mount(mount::MountArgs),
    /// Unmount a kmsfs mount
    Umount(mount::UmountArgs),
    /// Move every file's key envelopes to another key (rotation), safe beside a live mount
    Rewrap(rewrap::RewrapArgs),
    /// Check every file of a volume (and tidy stale envelopes with --repair)
    Fsck(fsck::FsckArgs),
    /// Accept a file moved on the backing store: rebind its key to where it is now
    Adopt(adopt::AdoptArgs),
    /// Decrypt a volume (or a subtree) to a directory, or to a tar stream with -
    Export(export::ExportArgs),
    /// Show CloudTrail's KMS events of a volume with the plaintext paths they were for
    Audit(audit::AuditArgs),
    /// Print the plaintext path of a stored path (as CloudTrail or fsck shows it)
    Decode(decode::DecodeArgs),
    /// Approve a volume's trusted keys as they are now (after a change kmsfs refused)
    Trust(trust::TrustArgs),
    /// Show a running mount's key cache, key-service calls and errors
    Status(status::StatusArgs),
    /// Print a shell completion script (bash, zsh, fish, ...)
    Completions(completions::CompletionsArgs),
}

/// Options shared by commands that open an existing volume.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// The backing directory (the ciphertext store)
    pub backing: PathBuf,
    /// Pin KEY: the volume key must open through it and new files get their keys from it
    /// (local:PATH also locates a moved key file). Without --key: the keys this host recorded
    #[arg(long = "key", value_name = "KEY")]
    pub keys: Vec<String>,
}

impl VolumeArgs {
    /// How to open the volume: the pinned keys, else this host's trust record.
    pub fn open_options(&self, key_options: KeyOptions) -> Result<OpenOptions> {
        let pin: Vec<KeySpec> = self
            .keys
            .iter()
            .map(|k| KeySpec::parse(k).map_err(Error::Usage))
            .collect::<Result<_>>()?;
        let record = match crate::core::trust::state_dir() {
            Ok(dir) => HostRecord::Check(dir),
            // A pin needs no record (rewrap updates one only if it exists).
            Err(_) if !pin.is_empty() => HostRecord::Off,
            Err(e) => return Err(e),
        };
        Ok(OpenOptions {
            pin,
            key_options,
            record,
        })
    }

    /// Opens the volume to read it, registered with its locks (a mount running alone turns
    /// to locking; see `crate::backing::Presence`) if the store lets this user: a reader
    /// that cannot register is warned that what it reads may be changing.
    pub fn open(&self) -> Result<Volume> {
        let volume = Volume::open(&self.backing, &self.open_options(key_options()?)?)?;
        if let Err(e) = volume.backing().register() {
            tracing::warn!(
                "cannot register with the store's locks ({e}): a file a mount is writing \
                 now may fail to read"
            );
        }
        Ok(volume)
    }

    /// Opens the volume to change it: registered with its locks, or refused.
    pub fn open_to_write(&self) -> Result<Volume> {
        let volume = Volume::open(&self.backing, &self.open_options(key_options()?)?)?;
        volume
            .backing()
            .register()
            .map_err(|e| Error::Refused(format!("cannot register with the store's locks: {e}")))?;
        Ok(volume)
    }
}

/// Key options from the environment (AWS endpoint overrides and timeouts).
pub fn key_options() -> Result<KeyOptions> {
    let aws = AwsOptions::from_env().map_err(Error::Usage)?;
    Ok(KeyOptions {
        aws,
        wrap_provider: injected_faults()?,
        ..Default::default()
    })
}

/// Test and benchmark hooks, never for production: `KMSFS_INJECT_KMS_LATENCY_MS` adds that
/// much latency to every key-service call (what a remote KMS costs, scripts/bench.sh);
/// `KMSFS_INJECT_KMS_FAULTS` (see [`Faults::parse`]) throttles, times out or takes down a share
/// of calls (tests/kms_faults.rs); `KMSFS_INJECT_KMS_HANG=MS:TEXT` holds each call whose
/// encryption context mentions TEXT (a stored path) for MS milliseconds.
fn injected_faults() -> Result<Option<crate::core::volume::ProviderWrapper>> {
    use crate::keys::fault::{Faults, FaultyProvider};
    let latency = std::env::var("KMSFS_INJECT_KMS_LATENCY_MS").ok();
    let faults = std::env::var("KMSFS_INJECT_KMS_FAULTS").ok();
    let hang = std::env::var("KMSFS_INJECT_KMS_HANG").ok();
    if latency.is_none() && faults.is_none() && hang.is_none() {
        return Ok(None);
    }
    let mut f = match &faults {
        Some(spec) => Faults::parse(spec)
            .map_err(|e| Error::Usage(format!("KMSFS_INJECT_KMS_FAULTS: {e}")))?,
        None => Faults::default(),
    };
    if let Some(ms) = latency {
        let ms: u64 = ms.parse().map_err(|_| {
            Error::Usage(format!(
                "KMSFS_INJECT_KMS_LATENCY_MS must be a number of milliseconds, not '{ms}'"
            ))
        })?;
        f.latency = std::time::Duration::from_millis(ms);
    }
    if let Some(spec) = hang {
        let parsed = spec
            .split_once(':')
            .and_then(|(ms, text)| Some((ms.parse::<u64>().ok()?, text)));
        let Some((ms, text)) = parsed.filter(|(_, text)| !text.is_empty()) else {
            return Err(Error::Usage(format!(
                "KMSFS_INJECT_KMS_HANG must be MILLISECONDS:TEXT, not '{spec}'"
            )));
        };
        f.hang = Some((text.to_string(), std::time::Duration::from_millis(ms)));
    }
    tracing::warn!("key-service faults injected for testing: {f:?}");
    Ok(Some(std::sync::Arc::new(move |inner| {
        let faulty = FaultyProvider::new(inner, 1);
        faulty.set(None, f.clone());
        std::sync::Arc::new(faulty) as std::sync::Arc<dyn crate::keys::KeyProvider>
    })))
}

/// Parses a PATH argument (relative to the volume root) and refuses kmsfs's own names.
pub fn volume_path(path: &Path) -> Result<CanonicalPath> {
    let canonical = CanonicalPath::from_user(path).map_err(|e| Error::Usage(e.to_string()))?;
    if canonical.is_root() {
        return Err(Error::Usage(format!(
            "'{}' names the volume root, not a file",
            path.display()
        )));
    }
    let rel = canonical.to_relative_path();
    if rel
        .iter()
        .enumerate()
        .any(|(i, c)| is_reserved_name(c.as_encoded_bytes(), i == 0))
    {
        return Err(Error::Usage(format!(
            "'{}' is a name kmsfs reserves for itself",
            path.display()
        )));
    }
    Ok(canonical)
}

/// `e`, an error about the user's path `plain` (found on the store, or not), as the user
/// knows it: each stored path along `plain` (as far as it can be worked out) named by its
/// plaintext path, and where a file is bound instead, that path's plaintext where it decrypts.
pub fn shown_error(volume: &Volume, plain: &CanonicalPath, e: Error) -> Error {
    if !volume.encrypted_names() {
        return e;
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    let (mut stored, mut shown) = (CanonicalPath::root(), CanonicalPath::root());
    for name in plain.to_relative_path().iter() {
        let name = name.as_encoded_bytes();
        match (volume.stored_child(&stored, None, name), shown.join(name)) {
            (Ok(child), Ok(s)) => {
                (stored, shown) = (child.path, s);
                pairs.push((stored.to_string(), shown.to_string()));
            }
            _ => break,
        }
    }
    crate::core::export::with_user_paths(volume, e, &pairs)
}

/// `s` for a terminal or a line-based log: control characters and the Unicode format
/// characters that reorder text shown as `\u{..}` escapes, so a file name (or anything else
/// read from the store or an untrusted input) can neither break a line nor disguise one.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
            {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => init::run(args),
        Command::Info(args) => info::run(args),
        Command::Cat(args) => cat::run(args),
        Command::Import(args) => import::run(args),
        Command::Mount(args) => mount::run(args),
        Command::Umount(args) => mount::umount(args),
        Command::Rewrap(args) => rewrap::run(args),
        Command::Fsck(args) => fsck::run(args),
        Command::Adopt(args) => adopt::run(args),
        Command::Export(args) => export::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Decode(args) => decode::run(args),
        Command::Status(args) => status::run(args),
        Command::Trust(args) => trust::run(args),
        Command::Completions(args) => completions::run(args),
    }
}
