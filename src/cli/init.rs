//! `kmsfs init`: create a volume.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::core::volume::{InitOptions, Volume};
use crate::error::{Error, Result};
use crate::format::block::DEFAULT_BLOCK_SIZE;
use crate::keys::spec::KeySpec;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The backing directory: must exist and be empty
    pub backing: PathBuf,
    /// A key to trust, in preference order: a KMS key id, ARN or alias/NAME, or local:PATH
    /// (created if missing). Default: a new local key file under the user's config directory
    #[arg(long = "key", value_name = "KEY")]
    pub keys: Vec<String>,
    /// A static encryption context pair bound into every key wrap (repeatable)
    #[arg(long = "context", value_name = "K=V")]
    pub context: Vec<String>,
    /// Plaintext bytes per block: a power of two from 512 to 1M (suffixes K, M)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BLOCK_SIZE, value_parser = parse_size)]
    pub block_size: u32,
    /// Store file names as they are instead of encrypted (they then show on the backing
    /// store, in its backups and in the key service's audit log)
    #[arg(long)]
    pub plaintext_names: bool,
}

fn parse_size(s: &str) -> Result<u32, String> {
    let (digits, mult) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1024),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1024 * 1024),
            None => (s, 1),
        },
    };
    digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 4096, 4K, 1M)"))
}

pub fn parse_context(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("bad --context '{pair}': expected KEY=VALUE")))?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Error::Usage(format!(
                "bad --context: key '{k}' given twice"
            )));
        }
    }
    Ok(map)
}

pub fn run(args: InitArgs) -> Result<()> {
    let keys = args
        .keys
        .iter()
        .map(|k| KeySpec::parse(k).map_err(Error::Usage))
        .collect::<Result<Vec<_>>>()?;
    // Every volume made here is recorded (with --key, if a state directory can be found).
    let record = match crate::core::trust::state_dir() {
        Ok(dir) => Some(dir),
        Err(_) if !keys.is_empty() => None,
        Err(e) => return Err(e),
    };
    let options = InitOptions {
        record,
        keys,
        context: parse_context(&args.context)?,
        block_size: args.block_size,
        key_options: super::key_options()?,
        plaintext_names: args.plaintext_names,
    };
    let report = Volume::init(&args.backing, options)?;
    let vol = &report.volume;
    println!(
        "initialized kmsfs volume {} in {}",
        vol.id_hex(),
        args.backing.display()
    );
    println!("  block size: {}", vol.config().block_size);
    let names = if vol.encrypted_names() {
        "encrypted (AES-SIV)"
    } else {
        "plaintext"
    };
    println!("  names: {names}");
    for k in &vol.config().trusted_keys {
        println!("  trusted key: {} ({})", k.id, k.locator);
    }
    for (k, v) in &vol.config().context {
        println!("  context: {k}={v}");
    }
    for path in &report.created_key_files {
        println!(
            "created key file {} (mode 0600): back it up; without it the volume cannot be read",
            path.display()
        );
    }
    Ok(())
}
