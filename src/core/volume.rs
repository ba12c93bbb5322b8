//! A volume: a backing directory with an authenticated config and its keyring.
//!
//! `init` creates the config (generating the volume key under every trusted key) and refuses
//! anything but an empty directory; `open` reads the config, reaches the trusted keys, checks
//! any key the operator pinned, unwraps the volume key and only then trusts the config (its
//! MAC). Both validate everything before changing anything on disk, and `init` removes what it
//! created if a later step fails.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backing::{Atime, Backing, MetaDir, MAX_RECORD};
use crate::error::{Error, Result};
use crate::format::block::{valid_block_size, DEFAULT_BLOCK_SIZE};
use crate::format::codec::hex;
use crate::format::config::{TrustedKey, UnverifiedConfig, VolumeConfig};
use crate::format::context::{validate_static_pair, CanonicalPath, EncryptionContext};
use crate::format::envelope::WrappedKey;
use crate::format::header::ObjectKind;
use crate::format::header::SUITE_AES256GCM_HKDF_SHA256;
use crate::format::{kdf, object};
use crate::keys::aws::{AwsKmsProvider, AwsOptions};
use crate::keys::cache::CacheConfig;
use crate::keys::keyring::{
    with_retries, Keyring, RetryPolicy, TrustedProvider, DEFAULT_CONCURRENCY,
};
use crate::keys::local::{LocalKey, LocalProvider};
use crate::keys::spec::KeySpec;
use crate::keys::{KeyProvider, UnavailableKey};
use crate::secret::DataKey;

use super::trust::{describe_change, Record, RecordedKey, TrustStore};

/// Directory at the backing root holding kmsfs's own files; hidden from the mount.
pub use crate::backing::META_DIR;
pub const CONFIG_NAME: &str = "config";
/// Prefix of kmsfs's temporary files (an import in progress), in any directory.
pub use crate::backing::TEMP_PREFIX;

/// Wraps each provider a volume uses (tests inject faults or latency this way).
pub type ProviderWrapper = Arc<dyn Fn(Arc<dyn KeyProvider>) -> Arc<dyn KeyProvider> + Send + Sync>;

/// How a volume reaches and uses its keys.
#[derive(Clone)]
pub struct KeyOptions {
    pub cache: CacheConfig,
    pub retry: RetryPolicy,
    pub concurrency: usize,
    pub wrap_provider: Option<ProviderWrapper>,
    pub aws: AwsOptions,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            cache: CacheConfig::default(),
            retry: RetryPolicy::default(),
            concurrency: DEFAULT_CONCURRENCY,
            wrap_provider: None,
            aws: AwsOptions::default(),
        }
    }
}

pub struct InitOptions {
    /// Trusted keys in preference order; empty means "create a local key file".
    pub keys: Vec<KeySpec>,
    pub context: BTreeMap<String, String>,
    pub block_size: u32,
    pub key_options: KeyOptions,
    /// The state directory to record the new volume's trusted keys in (see [`super::trust`]);
    /// None: record nothing.
    pub record: Option<PathBuf>,
    /// Store names as they are (`init --plaintext-names`) rather than encrypted.
    pub plaintext_names: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            keys: Vec::new(),
            context: BTreeMap::new(),
            block_size: DEFAULT_BLOCK_SIZE,
            key_options: KeyOptions::default(),
            record: None,
            plaintext_names: false,
        }
    }
}

/// Whether an open consults this host's record of the volume's trusted keys
/// ([`super::trust`]). Pinned keys (`--key`) take its place: with a pin the record is neither
/// consulted nor created (but one that exists is kept up to date by `rewrap`).
#[derive(Default, Clone, Debug)]
pub enum HostRecord {
    /// Neither consult nor write a record (library use, tests).
    #[default]
    Off,
    /// Reach only the recorded keys before the MAC is checked and refuse a config whose
    /// trusted keys differ from the record; with no record yet, record them (trust on first
    /// use). The state directory.
    Check(PathBuf),
    /// `kmsfs trust`: authenticate the config through the recorded (or pinned) keys, then
    /// record the keys it trusts now.
    Approve(PathBuf),
}

#[derive(Default, Clone)]
pub struct OpenOptions {
    /// Keys the operator expects (`--key`): the volume key must be unwrapped through one of
    /// them, the key new data keys are generated under must be one of them, and the volume
    /// must trust each; a local one also says where its key file is now.
    pub pin: Vec<KeySpec>,
    pub key_options: KeyOptions,
    pub record: HostRecord,
}

/// What `init` did, for the command to report.
#[derive(Debug)]
pub struct InitReport {
    pub volume: Volume,
    /// The local key file `init` created, if it created one.
    pub created_key_files: Vec<PathBuf>,
}

pub struct Volume {
    root: PathBuf,
    /// Every syscall on the backing store goes through this.
    backing: Arc<Backing>,
    config: VolumeConfig,
    keyring: Keyring,
    /// Root of the files' header MAC keys (docs/FORMAT.md, "Header slots").
    header_key: crate::secret::DerivedKey,
    /// The key of the kind tags (see [`crate::format::kind_tag`]).
    kind_tag_key: crate::secret::DerivedKey,
    /// The key names are encrypted under; None with plaintext names (see [`super::names`]).
    name_key: Option<crate::format::names::NameKey>,
    /// For rewriting the config when the trusted keys change.
    config_mac_key: crate::secret::DerivedKey,
    key_options: KeyOptions,
    /// The host's trust record this volume keeps up to date when its keys change (rewrap).
    record: Option<TrustStore>,
    /// What opening it did to the host's record, for `kmsfs trust` to report.
    record_note: Option<String>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Volume({}, {})",
            self.root.display(),
            hex(&self.config.volume_id)
        )
    }
}

fn config_path(root: &Path) -> PathBuf {
    root.join(META_DIR).join(CONFIG_NAME)
}

/// The user's configuration directory for kmsfs (`$XDG_CONFIG_HOME/kmsfs` or
/// `~/.config/kmsfs`).
pub fn user_config_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(Error::Usage(
                    "cannot find a config directory for the key file: set HOME or XDG_CONFIG_HOME, or pass --key local:PATH".into(),
                ))
            }
        },
    };
    Ok(base.join("kmsfs"))
}

/// An absolute, symlink-resolved form of `path` even if its last components do not exist yet.
#[allow(clippy::disallowed_methods)] // key and root paths: the operator's, not the store's
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while fs::symlink_metadata(&existing).is_err() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    Ok(out
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect())
}

#[allow(clippy::disallowed_methods)] // the backing root itself: the operator's path
fn check_backing_dir(root: &Path) -> Result<()> {
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Refused(format!(
            "{} is not a directory",
            root.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Refused(format!(
            "backing directory {} does not exist",
            root.display()
        ))),
        Err(e) => Err(Error::io(format!("cannot access {}", root.display()), e)),
    }
}

/// Builds the providers a volume's keys need: local key files directly, and one shared AWS
/// KMS provider (created only if a KMS key is used) for every KMS key.
struct Providers<'a> {
    options: &'a KeyOptions,
    aws: Option<Arc<AwsKmsProvider>>,
}

impl<'a> Providers<'a> {
    fn new(options: &'a KeyOptions) -> Self {
        Providers { options, aws: None }
    }

    fn aws(&mut self) -> Result<Arc<AwsKmsProvider>> {
        if self.aws.is_none() {
            let provider = AwsKmsProvider::new(self.options.aws.clone()).map_err(Error::Refused)?;
            self.aws = Some(Arc::new(provider));
        }
        Ok(self.aws.clone().expect("just set"))
    }

    /// The ARN of a KMS key named any way KMS accepts.
    fn describe(&mut self, key: &str) -> Result<String> {
        let aws = self.aws()?;
        let policy = self.options.retry;
        with_retries(&policy, Instant::now() + policy.deadline, |_| {
            aws.describe(key)
        })
        .map_err(Error::KeyService)
    }

    fn wrap(&self, provider: Arc<dyn KeyProvider>) -> Arc<dyn KeyProvider> {
        match &self.options.wrap_provider {
            Some(wrap) => wrap(provider),
            None => provider,
        }
    }

    fn keyring(&self, keys: Vec<(String, Arc<dyn KeyProvider>)>) -> Result<Keyring> {
        let trusted = keys
            .into_iter()
            .map(|(key_id, provider)| TrustedProvider {
                key_id,
                provider: self.wrap(provider),
            })
            .collect();
        self.keyring_of(trusted)
    }

    /// A keyring of providers already wrapped.
    fn keyring_of(&self, trusted: Vec<TrustedProvider>) -> Result<Keyring> {
        let o = self.options;
        let keyring = Keyring::new(trusted, o.cache, o.retry, o.concurrency)
            .map_err(|e| Error::io("cannot allocate the key cache", e))?;
        if !keyring.cache_stats().locked && o.cache.max_entries > 0 {
            tracing::warn!(
                "could not mlock the key cache (raise RLIMIT_MEMLOCK); keys may be swapped"
            );
        }
        Ok(keyring)
    }
}

/// A key `init` will trust, once decided.
enum Planned {
    /// A local key file, and whether it already exists.
    Local(PathBuf, bool),
    /// A KMS key: its ARN and how the user named it.
    Kms { arn: String, locator: String },
}

impl Volume {
    /// Creates a new volume in the empty directory `root`.
    #[allow(clippy::disallowed_methods)] // key files it makes: outside the store
    pub fn init(root: &Path, options: InitOptions) -> Result<InitReport> {
        check_backing_dir(root)?;
        let backing = open_backing(root)?;
        let entries = backing
            .list_dir(&CanonicalPath::root(), Atime::Keep)
            .map_err(|e| Error::io(format!("cannot read {}", root.display()), e))?;
        if !entries.is_empty() {
            let what = if entries.iter().any(|e| e.name == META_DIR) {
                "is already a kmsfs volume"
            } else {
                "is not empty"
            };
            return Err(Error::Refused(format!(
                "{} {what}; init needs an empty directory",
                root.display()
            )));
        }
        if !valid_block_size(options.block_size) {
            return Err(Error::Usage(format!(
                "invalid block size {}: use a power of two from 512 to 1048576",
                options.block_size
            )));
        }
        for (k, v) in &options.context {
            validate_static_pair(k, v).map_err(|e| Error::Usage(format!("bad --context: {e}")))?;
        }
        let mut volume_id = [0u8; 16];
        getrandom::getrandom(&mut volume_id).expect("the OS random number generator failed");
        let root_abs =
            resolve(root).map_err(|e| Error::io("cannot resolve the backing directory", e))?;
        let mut providers = Providers::new(&options.key_options);

        // Decide every key before touching anything.
        let specs = if options.keys.is_empty() {
            let dir = user_config_dir()?.join("keys");
            vec![(
                KeySpec::Local(dir.join(format!("{}.key", hex(&volume_id)))),
                true,
            )]
        } else {
            options.keys.iter().cloned().map(|k| (k, false)).collect()
        };
        let mut plan = Vec::new();
        for (spec, default) in specs {
            match spec {
                KeySpec::Kms(id) => {
                    let arn = providers.describe(&id)?;
                    plan.push(Planned::Kms { arn, locator: id });
                }
                KeySpec::Local(path) => {
                    let abs =
                        resolve(&path).map_err(|e| Error::io("cannot resolve the key path", e))?;
                    if abs.starts_with(&root_abs) {
                        return Err(Error::Usage(format!(
                            "key file {} is inside the backing directory; keep keys outside what you store or back up",
                            abs.display()
                        )));
                    }
                    let exists = abs.exists();
                    if default && exists {
                        return Err(Error::Refused(format!(
                            "key file {} already exists",
                            abs.display()
                        )));
                    }
                    plan.push(Planned::Local(abs, exists));
                }
            }
        }
        // Load existing key files first (a bad one must not leave new key files behind).
        let mut loaded = Vec::new();
        for planned in &plan {
            loaded.push(match planned {
                Planned::Local(path, true) => Some(LocalKey::load(path).map_err(Error::KeyFile)?),
                _ => None,
            });
        }
        let mut created = Vec::new();
        let result = (|| {
            let mut trusted_keys = Vec::new();
            let mut keys: Vec<(String, Arc<dyn KeyProvider>)> = Vec::new();
            for (planned, key) in plan.iter().zip(loaded) {
                let (trusted, provider): (TrustedKey, Arc<dyn KeyProvider>) = match planned {
                    Planned::Kms { arn, locator } => (
                        TrustedKey {
                            id: arn.clone(),
                            locator: locator.clone(),
                        },
                        providers.aws()?,
                    ),
                    Planned::Local(path, _) => {
                        let key = match key {
                            Some(k) => k,
                            None => {
                                let k = LocalKey::create(path).map_err(Error::KeyFile)?;
                                created.push(path.clone());
                                k
                            }
                        };
                        let trusted = TrustedKey {
                            id: key.id().to_string(),
                            locator: format!("local:{}", key.path().display()),
                        };
                        (trusted, Arc::new(LocalProvider::new([key])))
                    }
                };
                if trusted_keys.iter().any(|t: &TrustedKey| t.id == trusted.id) {
                    return Err(Error::Usage(format!("key {} is given twice", trusted.id)));
                }
                keys.push((trusted.id.clone(), provider));
                trusted_keys.push(trusted);
            }
            let keyring = providers.keyring(keys)?;
            let ctx = EncryptionContext::for_volume_config(&volume_id, &options.context);
            let (volume_key, volume_keys) = keyring
                .generate(&ctx)
                .map_err(|e| Error::key(root.display(), e))?;
            let config = VolumeConfig {
                volume_id,
                suite: SUITE_AES256GCM_HKDF_SHA256,
                block_size: options.block_size,
                features: if options.plaintext_names {
                    vec![crate::format::config::FEATURE_PLAINTEXT_NAMES.to_string()]
                } else {
                    Vec::new()
                },
                trusted_keys,
                context: options.context.clone(),
                volume_keys,
            };
            let bytes = config
                .encode(&kdf::config_mac_key(&volume_key, &volume_id))
                .map_err(|e| Error::format(root.display(), e))?;
            write_config(&backing, &bytes)?;
            let record = options.record.as_deref().map(TrustStore::new);
            if let Some(store) = &record {
                store.put(&record_of(&config, &root_abs, &[]))?;
            }
            let mut volume = Volume {
                root: root.to_path_buf(),
                backing: backing.clone(),
                name_key: name_key(&config, &volume_key),
                header_key: kdf::volume_header_key(&volume_key, &volume_id),
                kind_tag_key: kind_tag_key(&volume_key, &volume_id),
                config_mac_key: kdf::config_mac_key(&volume_key, &volume_id),
                key_options: options.key_options.clone(),
                config,
                keyring,
                record,
                record_note: None,
            };
            crate::core::file::write_root_record(&volume)?;
            volume.follow_key_changes(None);
            Ok(volume)
        })();
        match result {
            Ok(volume) => Ok(InitReport {
                volume,
                created_key_files: created,
            }),
            Err(e) => {
                for path in &created {
                    let _ = fs::remove_file(path);
                }
                remove_new_meta_dir(&backing);
                Err(e)
            }
        }
    }

    /// Opens an existing volume, authenticating its config.
    pub fn open(root: &Path, options: &OpenOptions) -> Result<Volume> {
        check_backing_dir(root)?;
        let backing = open_backing(root)?;
        let cfg_path = config_path(root);
        let not_a_volume = || {
            Error::Refused(format!(
                "{} is not a kmsfs volume (no {META_DIR}/{CONFIG_NAME}); create one with 'kmsfs init'",
                root.display()
            ))
        };
        let meta_dir = backing
            .meta_dir(META_DIR, false)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => not_a_volume(),
                _ => Error::Refused(e.to_string()),
            })?;
        let bytes = meta_dir
            .read(CONFIG_NAME, MAX_RECORD)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => not_a_volume(),
                _ => Error::io(format!("cannot read {}", cfg_path.display()), e),
            })?;
        let shown = cfg_path.display().to_string();
        check_config_permissions(&meta_dir)?;
        let unverified = UnverifiedConfig::parse(&bytes).map_err(|e| Error::format(&shown, e))?;
        let claimed = unverified.claimed();
        let root_abs =
            resolve(root).map_err(|e| Error::io("cannot resolve the backing directory", e))?;
        let mut providers = Providers::new(&options.key_options);
        let not_trusted = |what: &str, id: &str| {
            Error::KeyPin(format!(
                "{} is not protected by the key {what} ({id}); it trusts {}",
                root.display(),
                trusted_list(claimed)
            ))
        };
        let (store, approve) = match &options.record {
            HostRecord::Off => (None, false),
            HostRecord::Check(dir) => (Some(TrustStore::new(dir)), false),
            HostRecord::Approve(dir) => (Some(TrustStore::new(dir)), true),
        };
        let pinned = !options.pin.is_empty();

        // The keys that may be reached before the MAC is checked: the pinned ones; else the
        // ones this host recorded; else (no record yet: trust on first use, or no record kept)
        // the ones the config names. Each with the key file it was read from, if local.
        let mut gate: Vec<(String, Arc<dyn KeyProvider>, Option<PathBuf>)> = Vec::new();
        let mut unreachable: Vec<String> = Vec::new();
        let mut unavailable = |reason: String| -> Arc<dyn KeyProvider> {
            unreachable.push(reason.clone());
            Arc::new(UnavailableKey { reason })
        };
        let mut recorded: Option<Record> = None;
        let mut landed_change = false;
        if pinned {
            for pin in &options.pin {
                match pin {
                    KeySpec::Local(path) => {
                        let key = load_local(path, &root_abs).map_err(|e| match e {
                            LocalLoad::Inside(m) => Error::Usage(m),
                            LocalLoad::Failed(m) => Error::KeyFile(m),
                        })?;
                        if !claimed.is_trusted(key.id()) {
                            return Err(not_trusted(&format!("in {}", path.display()), key.id()));
                        }
                        let path = key.path().to_path_buf();
                        gate.push((
                            key.id().to_string(),
                            Arc::new(LocalProvider::new([key])),
                            Some(path),
                        ));
                    }
                    KeySpec::Kms(name) => {
                        // The key's ARN as KMS resolves it: never a locator the config
                        // (anyone who can write the store) wrote.
                        let arn = providers.describe(name)?;
                        if !claimed.is_trusted(&arn) {
                            return Err(not_trusted(name, &arn));
                        }
                        gate.push((arn, providers.aws()?, None));
                    }
                }
            }
        } else if let Some(store) = &store {
            recorded = store.get(&claimed.volume_id)?;
            if recorded.is_none() {
                if let Some(other) = store.other_at(&root_abs, &claimed.volume_id)? {
                    if !approve {
                        return Err(Error::KeyPin(format!(
                            "{}: it holds volume {}, not the volume {} this host recorded there; if you replaced the volume, approve it with 'kmsfs trust {}'",
                            root.display(),
                            hex(&claimed.volume_id),
                            hex(&other.volume_id),
                            root.display()
                        )));
                    }
                    recorded = Some(other);
                }
            }
            let now: Vec<&str> = claimed.trusted_keys.iter().map(|t| t.id.as_str()).collect();
            if let Some(landed) = recorded.as_ref().and_then(|r| r.landed(&now)) {
                // This host's own change, cut short before its record followed: it follows now.
                recorded = Some(landed);
                landed_change = true;
            }
            if let Some(rec) = &recorded {
                let change = describe_change(&rec.key_ids(), &now);
                if !approve && !change.is_empty() {
                    return Err(Error::KeyPin(format!(
                        "{}: its trusted keys changed since this host recorded them ({change}); if you made this change, approve it with 'kmsfs trust {}'",
                        root.display(),
                        root.display()
                    )));
                }
                for k in &rec.keys {
                    let provider: Arc<dyn KeyProvider> = match &k.path {
                        Some(path) => match load_local(path, &root_abs) {
                            Ok(key) if key.id() == k.id => Arc::new(LocalProvider::new([key])),
                            Ok(key) => unavailable(format!(
                                "key file {} holds {}, not {}",
                                path.display(),
                                key.id(),
                                k.id
                            )),
                            Err(LocalLoad::Inside(reason) | LocalLoad::Failed(reason)) => {
                                unavailable(reason)
                            }
                        },
                        None => providers.aws()?,
                    };
                    gate.push((k.id.clone(), provider, k.path.clone()));
                }
            }
        }
        if gate.is_empty() {
            for t in &claimed.trusted_keys {
                let provider = match reach_key(t, &mut providers, &root_abs)? {
                    Ok(p) => p,
                    Err(reason) => unavailable(reason),
                };
                gate.push((t.id.clone(), provider, locator_path(&t.locator)));
            }
        }
        if unreachable.len() == gate.len() {
            return Err(Error::KeyFile(format!(
                "{} (pass --key local:PATH if it moved)",
                unreachable[0]
            )));
        }
        let gate_ids: Vec<String> = gate.iter().map(|(id, _, _)| id.clone()).collect();
        let candidates: Vec<_> = claimed
            .volume_keys
            .iter()
            .filter(|w| gate_ids.contains(&w.key_id))
            .collect();
        if candidates.is_empty() && pinned {
            // A pin the config merely lists: the volume key is not wrapped under it.
            return Err(Error::KeyPin(format!(
                "{} is not protected by the key {} ({}): its volume key is not wrapped under it; it trusts {}",
                root.display(),
                options.pin[0].locator(),
                gate_ids.join(", "),
                trusted_list(claimed)
            )));
        }
        if candidates.is_empty() && recorded.is_some() {
            return Err(Error::KeyPin(format!(
                "{}: none of the keys this host recorded for it opens its config; approve it with 'kmsfs trust {} --key KEY' naming a key it is wrapped under",
                root.display(),
                root.display()
            )));
        }
        let reachable: Vec<TrustedProvider> = gate
            .iter()
            .map(|(id, p, _)| TrustedProvider {
                key_id: id.clone(),
                provider: providers.wrap(p.clone()),
            })
            .collect();
        let keyring = providers.keyring_of(reachable.clone())?;
        let ctx = EncryptionContext::for_volume_config(&claimed.volume_id, &claimed.context);
        let volume_key = keyring.unwrap(&candidates, &ctx).map_err(|e| {
            if e.kind.is_integrity() {
                Error::format(&shown, crate::format::FormatError::ConfigAuthFailed)
            } else {
                Error::key(&shown, e)
            }
        })?;
        let volume_id = claimed.volume_id;
        let config = unverified
            .verify(&kdf::config_mac_key(&volume_key, &volume_id))
            .map_err(|e| Error::format(&shown, e))?;

        // Authenticated. Under a pin, new data keys must be generated under a pinned key.
        let first = &config.trusted_keys[0].id;
        if pinned && !gate_ids.contains(first) {
            return Err(Error::KeyPin(format!(
                "{}: new files would get their keys from {first}, which is not pinned; pin it too (--key), or make a pinned key the first with 'kmsfs rewrap --to-key'",
                root.display()
            )));
        }
        // The other trusted keys, now that the config naming them is authentic.
        let mut keys = Vec::new();
        for t in &config.trusted_keys {
            let provider = match reachable.iter().find(|k| k.key_id == t.id) {
                Some(k) => k.provider.clone(),
                None => match reach_key(t, &mut providers, &root_abs)? {
                    Ok(p) => providers.wrap(p),
                    Err(reason) => providers.wrap(Arc::new(UnavailableKey { reason })),
                },
            };
            keys.push(TrustedProvider {
                key_id: t.id.clone(),
                provider,
            });
        }
        keyring.set_keys(keys);

        // This host's record.
        let mut record_note = None;
        let mut record = None;
        if let Some(store) = store {
            let known: Vec<(String, PathBuf)> = gate
                .iter()
                .filter_map(|(id, _, p)| p.clone().map(|p| (id.clone(), p)))
                .collect();
            let now = record_of(&config, &root_abs, &known);
            if approve {
                // Under a pin the record was not consulted: what it held, for the report.
                let previous = match recorded.clone() {
                    Some(r) => Some(r),
                    None => match store.get(&volume_id)? {
                        Some(r) => Some(r),
                        None => store.other_at(&root_abs, &volume_id)?,
                    },
                };
                let before = previous.as_ref().map(|r| r.key_ids()).unwrap_or_default();
                let change = describe_change(&before, &now.key_ids());
                record_note = Some(match (&previous, change.is_empty()) {
                    (None, _) => format!("recorded its trusted keys: {}", now.key_ids().join(", ")),
                    (Some(r), _) if r.volume_id != volume_id => format!(
                        "recorded volume {} in place of volume {}: trusted keys {}",
                        hex(&volume_id),
                        hex(&r.volume_id),
                        now.key_ids().join(", ")
                    ),
                    (Some(_), true) => "its trusted keys are as recorded; nothing changed".into(),
                    (Some(_), false) => format!("approved: {change}"),
                });
                store.put(&now)?;
                record = Some(store);
            } else if !pinned {
                match &recorded {
                    None => {
                        store.put(&now)?;
                        tracing::warn!(
                            "{}: trusting its keys on first use on this host ({}); later changes need 'kmsfs trust'",
                            root.display(),
                            now.key_ids().join(", ")
                        );
                    }
                    // Moved: the record follows it, so another volume put at the old path
                    // is not trusted on first use there.
                    // And a change that did not land (killed before the config was written)
                    // leaves nothing trusted beyond what the config says.
                    Some(r) if r.backing != root_abs || landed_change || !r.next.is_empty() => {
                        store.put(&now)?
                    }
                    Some(_) => {}
                }
                record = Some(store);
            } else if store.get(&volume_id)?.is_some() {
                record = Some(store);
            }
        }

        let mut volume = Volume {
            root: root.to_path_buf(),
            backing,
            name_key: name_key(&config, &volume_key),
            header_key: kdf::volume_header_key(&volume_key, &volume_id),
            kind_tag_key: kind_tag_key(&volume_key, &volume_id),
            config_mac_key: kdf::config_mac_key(&volume_key, &volume_id),
            key_options: options.key_options.clone(),
            config,
            keyring,
            record,
            record_note,
        };
        let pins = pinned.then_some(gate_ids);
        volume.follow_key_changes(pins);
        Ok(volume)
    }

    /// Lets the keyring pick up trusted keys that change on disk while the volume is open (a
    /// `kmsfs rewrap` beside a mount): when the config file changes (checked at most once a
    /// second, on creates), or a key it does not know turns up, it re-reads the config, authenticates it with the volume key it already
    /// holds, and reaches any new key (reusing providers of keys it had).
    ///
    /// A config that changed on the store is followed only if it passes what `open` checked:
    /// under a pin (`pins`, the pinned key ids), its first key (new data keys) must be pinned;
    /// with this host's record, its keys must be the recorded ones (a `rewrap` on this host
    /// updates the record, and is followed once it has). Otherwise it is logged and the keys
    /// stay as they were until a remount: an older, authentic config put back on the store
    /// while mounted does not send new data keys to a key since retired.
    fn follow_key_changes(&mut self, pins: Option<Vec<String>>) {
        let record = self.record.clone();
        let volume_id = self.config.volume_id;
        let acceptable = move |config: &VolumeConfig| -> std::result::Result<(), String> {
            let first = &config.trusted_keys[0].id;
            if let Some(pins) = &pins {
                if !pins.contains(first) {
                    return Err(format!(
                        "new files would get their keys from {first}, which this mount did not pin"
                    ));
                }
                return Ok(());
            }
            if let Some(store) = &record {
                let recorded = store.get(&volume_id).map_err(|e| e.to_string())?;
                let now: Vec<&str> = config.trusted_keys.iter().map(|t| t.id.as_str()).collect();
                match recorded {
                    Some(r) if describe_change(&r.key_ids(), &now).is_empty() => {}
                    Some(r) => {
                        return Err(format!(
                            "they differ from this host's record ({}); approve with 'kmsfs trust' and remount",
                            describe_change(&r.key_ids(), &now)
                        ))
                    }
                    None => return Err("this host has no record of the volume".into()),
                }
            }
            Ok(())
        };
        let refused = std::sync::Mutex::new(None);
        let root = self.root.clone();
        let backing = self.backing.clone();
        let mac_key = crate::secret::DerivedKey::new(*self.config_mac_key.expose());
        let options = self.key_options.clone();
        let root_abs = resolve(&root).unwrap_or_else(|_| root.clone());
        // The last check: when, and what the config looked like. Every create asks, so the
        // config is looked at no more than once a second unless a key is missing.
        let seen = std::sync::Mutex::new((Instant::now(), config_stamp(&backing)));
        self.keyring
            .set_reload(Box::new(move |force, current: &[TrustedProvider]| {
                {
                    let mut seen = seen.lock().unwrap();
                    if !force && seen.0.elapsed() < std::time::Duration::from_secs(1) {
                        return None;
                    }
                    let stamp = config_stamp(&backing);
                    let unchanged = seen.1 == stamp;
                    *seen = (Instant::now(), stamp);
                    if !force && unchanged {
                        return None;
                    }
                }
                let shown = config_path(&root).display().to_string();
                let config = read_config(&backing)
                    .map_err(|e| e.to_string())
                    .and_then(|b| UnverifiedConfig::parse(&b).map_err(|e| e.to_string()))
                    .and_then(|u| u.verify(&mac_key).map_err(|e| e.to_string()));
                let config = match config {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("not reloading the trusted keys from {shown}: {e}");
                        return None;
                    }
                };
                if let Err(why) = acceptable(&config) {
                    // Logged once per config seen; looked at again next time (the record may
                    // catch up: a rewrap writes the config, then the record).
                    let stamp = config_stamp(&backing);
                    if std::mem::replace(&mut *refused.lock().unwrap(), stamp) != stamp {
                        tracing::warn!("not following the trusted keys changed in {shown}: {why}");
                    }
                    seen.lock().unwrap().1 = None;
                    return None;
                }
                let mut providers = Providers::new(&options);
                let mut keys = Vec::new();
                for t in &config.trusted_keys {
                    if let Some(had) = current.iter().find(|k| k.key_id == t.id) {
                        keys.push(had.clone());
                        continue;
                    }
                    match reach_key(t, &mut providers, &root_abs) {
                        Ok(Ok(p)) => keys.push(TrustedProvider {
                            key_id: t.id.clone(),
                            provider: providers.wrap(p),
                        }),
                        Ok(Err(e)) | Err(Error::KeyFile(e)) => {
                            tracing::warn!("cannot reach the newly trusted key {}: {e}", t.id)
                        }
                        Err(e) => {
                            tracing::warn!("cannot reach the newly trusted key {}: {e}", t.id)
                        }
                    }
                }
                let same = keys.len() == current.len()
                    && keys.iter().zip(current).all(|(a, b)| a.key_id == b.key_id);
                (!same && !keys.is_empty()).then_some(keys)
            }));
    }

    /// Makes `spec` the volume's first trusted key (new files are generated under it): wraps
    /// the volume key under it (`ReEncrypt` where the provider can, else `Decrypt` +
    /// `Encrypt`) and rewrites the config. A local key file that does not exist is created.
    /// Returns the key's id and whether the key is new to the volume.
    #[allow(clippy::disallowed_methods)] // a key file: outside the store
    pub fn add_trusted_key(&mut self, spec: &KeySpec) -> Result<(String, bool)> {
        let mut providers = Providers::new(&self.key_options);
        let (trusted, provider): (TrustedKey, Arc<dyn KeyProvider>) = match spec {
            KeySpec::Kms(name) => {
                let arn = providers.describe(name)?;
                (
                    TrustedKey {
                        id: arn,
                        locator: spec.locator(),
                    },
                    providers.aws()?,
                )
            }
            KeySpec::Local(path) => {
                let abs = resolve(path).map_err(|e| Error::io("cannot resolve the key path", e))?;
                let root_abs = resolve(&self.root)
                    .map_err(|e| Error::io("cannot resolve the backing directory", e))?;
                if abs.starts_with(&root_abs) {
                    return Err(Error::Usage(format!(
                        "key file {} is inside the backing directory; keep keys outside what you store or back up",
                        abs.display()
                    )));
                }
                let key = if abs.exists() {
                    LocalKey::load(&abs)
                } else {
                    LocalKey::create(&abs)
                }
                .map_err(Error::KeyFile)?;
                (
                    TrustedKey {
                        id: key.id().to_string(),
                        locator: format!("local:{}", key.path().display()),
                    },
                    Arc::new(LocalProvider::new([key])),
                )
            }
        };
        let id = trusted.id.clone();
        let is_new = !self.config.is_trusted(&id);
        if !is_new && self.config.trusted_keys[0].id == id {
            return Ok((id, false));
        }
        let provider = providers.wrap(provider);
        self.keyring.add_first(TrustedProvider {
            key_id: id.clone(),
            provider,
        });
        let mut config = self.config.clone();
        if is_new {
            let ctx = EncryptionContext::for_volume_config(&config.volume_id, &config.context);
            let mut last_err = None;
            let mut wrapped = None;
            for vk in &config.volume_keys {
                match self.keyring.rewrap(vk, &ctx, &id, &ctx) {
                    Ok(w) => {
                        wrapped = Some(w);
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            let Some(wrapped) = wrapped else {
                self.keyring.remove(&id);
                return Err(Error::key(
                    self.root.display(),
                    last_err.expect("a config has a volume key"),
                ));
            };
            config.volume_keys.insert(0, wrapped);
        }
        config.trusted_keys.retain(|t| t.id != id);
        config.trusted_keys.insert(0, trusted);
        self.save_config(config)?;
        Ok((id, is_new))
    }

    /// The trusted keys other than `keep` (what a rewrap to `keep` moves away from).
    pub fn other_trusted_keys(&self, keep: &str) -> Vec<String> {
        self.config
            .trusted_keys
            .iter()
            .map(|t| t.id.clone())
            .filter(|id| id != keep)
            .collect()
    }

    /// Stops trusting the keys `ids` and drops the volume key's envelopes under them. The
    /// caller checks first that no file needs them; at least one key must stay.
    pub fn retire_keys(&mut self, ids: &[String]) -> Result<()> {
        let mut config = self.config.clone();
        config.trusted_keys.retain(|t| !ids.contains(&t.id));
        config.volume_keys.retain(|k| !ids.contains(&k.key_id));
        if config.trusted_keys.is_empty() || config.volume_keys.is_empty() {
            return Err(Error::Refused(
                "a volume must keep at least one trusted key".into(),
            ));
        }
        self.save_config(config)?;
        for id in ids {
            self.keyring.remove(id);
        }
        Ok(())
    }

    fn save_config(&mut self, config: VolumeConfig) -> Result<()> {
        let bytes = config
            .encode(&self.config_mac_key)
            .map_err(|e| Error::format(self.root.display(), e))?;
        let Some(store) = &self.record else {
            write_config(&self.backing, &bytes)?;
            self.config = config;
            return Ok(());
        };
        // The change is the operator's own: this host's record follows it. It first names the
        // keys the change moves to, so a crash before it follows the config leaves a volume
        // this host still opens (see `Record::landed`).
        let root_abs = resolve(&self.root)
            .map_err(|e| Error::io("cannot resolve the backing directory", e))?;
        let before = store.get(&self.config.volume_id)?;
        let known: Vec<(String, PathBuf)> = before
            .iter()
            .flat_map(|r| &r.keys)
            .filter_map(|k| k.path.clone().map(|p| (k.id.clone(), p)))
            .collect();
        if let Some(before) = &before {
            let mut ahead = before.clone();
            ahead.next = record_of(&config, &root_abs, &known).keys;
            store.put(&ahead)?;
        }
        if let Err(e) = write_config(&self.backing, &bytes) {
            // The change did not land: nor does the host trust what it moved to.
            if let Some(before) = &before {
                let _ = store.put(before);
            }
            return Err(e);
        }
        self.config = config;
        store.put(&record_of(&self.config, &root_abs, &known))?;
        Ok(())
    }

    /// What opening the volume did to this host's trust record (`kmsfs trust` prints it).
    pub fn record_note(&self) -> Option<&str> {
        self.record_note.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The key that MACs the header slots of the file `file_id`.
    /// The key names are encrypted under (None: plaintext names).
    pub fn name_key(&self) -> Option<&crate::format::names::NameKey> {
        self.name_key.as_ref()
    }

    pub fn header_mac_key(&self, file_id: &[u8; 16]) -> crate::secret::DerivedKey {
        kdf::header_mac_key(&self.header_key, file_id)
    }

    /// The tag that tells a listing the kind of the object of `kind` at `path` without its
    /// header (see [`crate::format::kind_tag`]).
    pub fn kind_tag(
        &self,
        path: &CanonicalPath,
        kind: ObjectKind,
    ) -> [u8; crate::format::kind_tag::LEN] {
        crate::format::kind_tag::tag(&self.kind_tag_key, path, kind)
    }

    /// The kind a backing file's tag `value` tells for `path`, if it verifies there.
    pub fn tagged_kind(&self, path: &CanonicalPath, value: &[u8]) -> Option<ObjectKind> {
        crate::format::kind_tag::verify(&self.kind_tag_key, path, value)
    }

    /// Tags the backing file `file`, which holds an object of `kind` at `path`, so that a
    /// listing tells its kind without reading its header. Best effort: a store that keeps no
    /// user extended attributes keeps no tags, and its listings read headers.
    pub fn tag_kind(&self, file: &fs::File, path: &CanonicalPath, kind: ObjectKind) {
        let tag = self.kind_tag(path, kind);
        if let Err(e) = crate::backing::open::set_xattr(file, crate::format::kind_tag::XATTR, &tag)
        {
            tracing::debug!("{path}: no kind tag kept: {e}");
        }
    }

    /// The key that MACs the volume's rebind records (see [`super::journal`]).
    pub fn rebind_record_mac_key(&self) -> crate::secret::DerivedKey {
        kdf::rebind_record_mac_key(&self.header_key, &self.config.volume_id)
    }

    pub fn id_hex(&self) -> String {
        hex(&self.config.volume_id)
    }

    /// A random data key for an object that is not a file (a symlink, a directory record, ...)
    /// at `path`, wrapped under the volume: no key call (see [`crate::format::object`]).
    pub fn object_data_key(&self, path: &CanonicalPath) -> (DataKey, Vec<WrappedKey>) {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut bytes[..]).expect("the OS random number generator failed");
        let dek = DataKey::from_bytes(&bytes);
        let wrapped = object::wrap_random(&self.header_key, &dek, &self.file_context(path));
        (dek, vec![wrapped])
    }

    /// Unwraps the data key of an object of `kind` at `path` from `candidates` (envelopes for
    /// that path): through the key service for a file, under the volume for anything else.
    pub fn unwrap_data_key(
        &self,
        kind: ObjectKind,
        candidates: &[&WrappedKey],
        path: &CanonicalPath,
        ctx: &EncryptionContext,
    ) -> Result<DataKey> {
        if kind.uses_key_service() {
            return self
                .keyring()
                .unwrap(candidates, ctx)
                .map_err(|e| Error::key(path, e));
        }
        candidates
            .iter()
            .find_map(|w| object::unwrap(&self.header_key, w, ctx))
            .ok_or_else(|| Error::Moved {
                path: path.to_string(),
                bound: "another path or volume (its volume-wrapped key does not open here)".into(),
            })
    }

    /// `key` (wrapped for `from`) wrapped for `to` instead: a `ReEncrypt` for a key-service
    /// key, a local unwrap and wrap for a volume-wrapped one.
    pub fn rewrap_for_path(
        &self,
        key: &WrappedKey,
        from: &CanonicalPath,
        to: &CanonicalPath,
    ) -> Result<WrappedKey> {
        let (from_ctx, to_ctx) = (self.file_context(from), self.file_context(to));
        if key.key_id == object::OBJECT_KEY_ID {
            let dek =
                object::unwrap(&self.header_key, key, &from_ctx).ok_or_else(|| Error::Moved {
                    path: from.to_string(),
                    bound: "another path or volume".into(),
                })?;
            return Ok(object::wrap_random(&self.header_key, &dek, &to_ctx));
        }
        self.keyring()
            .rewrap(key, &from_ctx, &key.key_id, &to_ctx)
            .map_err(|e| Error::key(from, e))
    }

    /// The encryption context of the file at `path`.
    pub fn file_context(&self, path: &CanonicalPath) -> EncryptionContext {
        EncryptionContext::for_file(&self.config.volume_id, path, &self.config.context)
    }

    /// Objects (regular backing files: files, symlinks, special files and directory
    /// records) at and beneath `path` (the whole volume from the root), as paths; kmsfs's
    /// other names are skipped. Sorted. Directories are listed without following
    /// symlinks, so a symlink planted in the store is neither a file nor a way out.
    pub fn files_beneath(&self, path: &CanonicalPath) -> Result<Vec<CanonicalPath>> {
        use std::os::unix::ffi::OsStrExt;
        let mut out = Vec::new();
        let mut stack = vec![path.clone()];
        while let Some(dir) = stack.pop() {
            let read = |e| Error::io(format!("cannot read {dir}"), e);
            for entry in self.backing.list_dir(&dir, Atime::Keep).map_err(read)? {
                let name = entry.name;
                let record = name.as_bytes() == object::DIR_RECORD.as_bytes();
                if self.is_own_name(name.as_bytes(), dir.is_root()) && !record {
                    continue;
                }
                let child = dir
                    .join(name.as_bytes())
                    .map_err(|e| Error::format(&dir, e))?;
                let kind = match entry.kind {
                    libc::DT_UNKNOWN => {
                        let m = self
                            .backing
                            .metadata(&child)
                            .map_err(|e| Error::io(format!("cannot stat {child}"), e))?;
                        if m.is_dir() {
                            libc::DT_DIR
                        } else if m.is_file() {
                            libc::DT_REG
                        } else {
                            libc::DT_UNKNOWN
                        }
                    }
                    k => k,
                };
                if kind == libc::DT_DIR {
                    stack.push(child);
                } else if kind == libc::DT_REG {
                    out.push(child);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The backing store, through which every syscall on it is made.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The backing store, shared (for what outlives a borrow of the volume).
    pub fn backing_shared(&self) -> Arc<Backing> {
        self.backing.clone()
    }
}

/// The kind tag key of a volume (docs/FORMAT.md "Kind tags").
fn kind_tag_key(volume_key: &DataKey, volume_id: &[u8; 16]) -> crate::secret::DerivedKey {
    kdf::kind_tag_key(&kdf::volume_header_key(volume_key, volume_id), volume_id)
}

/// The name key of the volume `config` describes, if its names are encrypted.
fn name_key(config: &VolumeConfig, volume_key: &DataKey) -> Option<crate::format::names::NameKey> {
    (!config.plaintext_names()).then(|| {
        crate::format::names::NameKey::derive(
            &kdf::volume_header_key(volume_key, &config.volume_id),
            &config.volume_id,
        )
    })
}

fn trusted_list(config: &VolumeConfig) -> String {
    config
        .trusted_keys
        .iter()
        .map(|k| k.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a backing-store name is kmsfs's own, never a user file: the volume's `.kmsfs`
/// directory at the root, and temporary files and directory records anywhere.
pub fn is_reserved_name(name: &[u8], in_root: bool) -> bool {
    (in_root && name == META_DIR.as_bytes())
        || name.starts_with(TEMP_PREFIX.as_bytes())
        || name == object::DIR_RECORD.as_bytes()
}

/// How a trusted key is reached, from its locator in an authenticated config (or, for trust
/// on first use, the config as found): its provider, or why it cannot be (a missing key file
/// is not fatal while another key works). A KMS key is reached by its id (ARN).
fn reach_key(
    t: &TrustedKey,
    providers: &mut Providers,
    root_abs: &Path,
) -> Result<std::result::Result<Arc<dyn KeyProvider>, String>> {
    Ok(match KeySpec::parse(&t.locator) {
        Ok(KeySpec::Kms(_)) => Ok(providers.aws()?),
        Ok(KeySpec::Local(path)) => match load_local(&path, root_abs) {
            Ok(k) if k.id() == t.id => {
                Ok(Arc::new(LocalProvider::new([k])) as Arc<dyn KeyProvider>)
            }
            Ok(k) => Err(format!(
                "key file {} holds {}, not {}",
                path.display(),
                k.id(),
                t.id
            )),
            Err(LocalLoad::Inside(e) | LocalLoad::Failed(e)) => Err(e),
        },
        Err(reason) => Err(reason),
    })
}

/// Why a local key file was not loaded.
enum LocalLoad {
    /// It lies inside the backing directory (where whoever writes the store could put one).
    Inside(String),
    Failed(String),
}

/// Loads a local key file, refusing one inside the backing directory `root_abs` (both paths
/// resolved).
fn load_local(path: &Path, root_abs: &Path) -> std::result::Result<LocalKey, LocalLoad> {
    let abs = resolve(path)
        .map_err(|e| LocalLoad::Failed(format!("cannot resolve {}: {e}", path.display())))?;
    if abs.starts_with(root_abs) {
        return Err(LocalLoad::Inside(format!(
            "key file {} is inside the backing directory {}; keep keys outside what you store or back up",
            abs.display(),
            root_abs.display()
        )));
    }
    LocalKey::load(&abs).map_err(LocalLoad::Failed)
}

/// The key file a `local:` locator names.
fn locator_path(locator: &str) -> Option<PathBuf> {
    match KeySpec::parse(locator) {
        Ok(KeySpec::Local(path)) => Some(path),
        _ => None,
    }
}

/// This host's record of `config`'s trusted keys at `root_abs`: local keys with the file they
/// were read from (`known`), else the one their locator names.
fn record_of(config: &VolumeConfig, root_abs: &Path, known: &[(String, PathBuf)]) -> Record {
    Record {
        volume_id: config.volume_id,
        backing: root_abs.to_path_buf(),
        keys: config
            .trusted_keys
            .iter()
            .map(|t| RecordedKey {
                id: t.id.clone(),
                path: known
                    .iter()
                    .find(|(id, _)| id == &t.id)
                    .map(|(_, p)| p.clone())
                    .or_else(|| locator_path(&t.locator))
                    .map(|p| resolve(&p).unwrap_or(p)),
            })
            .collect(),
        next: Vec::new(),
    }
}

/// The config names the keys the volume trusts. Its MAC stops edits, but not someone else
/// putting back an older, authentic config (one that still trusts a retired key), so it must
/// be writable only by its owner.
fn check_config_permissions(meta_dir: &MetaDir) -> Result<()> {
    let shown = meta_dir.shown().join(CONFIG_NAME);
    let meta = meta_dir
        .metadata(CONFIG_NAME)
        .map_err(|e| Error::io(format!("cannot stat {}", shown.display()), e))?;
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(Error::Refused(format!(
            "{} is writable by group or others (mode {:o}); run 'chmod go-w' on it",
            shown.display(),
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

/// Opens the backing root (every later syscall on the store goes through it).
fn open_backing(root: &Path) -> Result<Arc<Backing>> {
    Backing::open(root)
        .map(Arc::new)
        .map_err(|e| Error::io(format!("cannot open {}", root.display()), e))
}

fn read_config(backing: &Backing) -> std::io::Result<Vec<u8>> {
    backing
        .meta_dir(META_DIR, false)?
        .read(CONFIG_NAME, MAX_RECORD)
}

/// The config file's modification time and length, to notice a rewrite cheaply.
fn config_stamp(backing: &Backing) -> Option<(std::time::SystemTime, u64)> {
    let m = backing
        .meta_dir(META_DIR, false)
        .ok()?
        .metadata(CONFIG_NAME)
        .ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Writes the config atomically: temporary file, fsync, rename, fsync of the directory.
fn write_config(backing: &Backing, bytes: &[u8]) -> Result<()> {
    let shown = backing.root_path().join(META_DIR);
    let io = |what: &str, e| Error::io(format!("{what} {}", shown.display()), e);
    let dir = backing
        .meta_dir(META_DIR, true)
        .map_err(|e| io("cannot use", e))?;
    dir.write_atomic(CONFIG_NAME, bytes)
        .map_err(|e| io("cannot write in", e))
}

/// Undoes a failed `init`: the config and kmsfs's directory, never anything they point to.
fn remove_new_meta_dir(backing: &Backing) {
    if let Ok(p) = CanonicalPath::root().join(object::DIR_RECORD.as_bytes()) {
        let _ = backing.unlink(&p, None);
    }
    if let Ok(dir) = backing.meta_dir(META_DIR, false) {
        for name in dir.list().unwrap_or_default() {
            if let Some(name) = name.to_str() {
                let _ = dir.unlink(name);
            }
        }
    }
    if let Ok(p) = CanonicalPath::root().join(META_DIR.as_bytes()) {
        let _ = backing.rmdir(&p, None);
    }
}
