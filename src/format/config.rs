//! The volume config: what a volume is and which keys it trusts, authenticated.
//!
//! The config names the volume id (bound into every encryption context), the block size, the
//! trusted key-encryption keys (with a locator saying how to reach each), the user's static
//! context pairs, feature flags, and the volume key wrapped under each trusted key. The last
//! 32 bytes are an HMAC-SHA256 over everything before them, under a key derived from the
//! volume key, so an edit by anyone who cannot unwrap the volume key (e.g. adding their own
//! key to the trusted set) is detected at load. Replacing the whole config with one made
//! under an attacker's key cannot be detected this way; `--key` pins the expected key, and
//! without it the host's trust record ([`crate::core::trust`]) holds the volume to its keys.
//! docs/FORMAT.md has the bytes.

use std::collections::BTreeMap;

use super::block::valid_block_size;
use super::codec::{Reader, Writer};
use super::context::validate_static_pair;
use super::envelope::WrappedKey;
use super::header::SUITE_AES256GCM_HKDF_SHA256;
use super::kdf;
use super::FormatError;
use crate::secret::DerivedKey;

pub const MAGIC: &[u8; 8] = b"KMSFSVOL";
pub const VERSION: u16 = 3;
/// Feature flags this version understands. A config naming any other flag is refused, so an
/// older kmsfs never half-understands a volume written by a newer one.
pub const KNOWN_FEATURES: &[&str] = &[FEATURE_PLAINTEXT_NAMES];
/// File names are stored as they are, not encrypted (`init --plaintext-names`).
pub const FEATURE_PLAINTEXT_NAMES: &str = "plaintext-names";
const MAC_LEN: usize = 32;

/// A key the volume trusts: its id, as recorded in envelopes, and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// `local:<fingerprint>` or a KMS key ARN.
    pub id: String,
    /// How to reach the key: `local:/path/to/key` or the KMS key id/ARN/alias given at init.
    pub locator: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    pub volume_id: [u8; 16],
    pub suite: u16,
    pub block_size: u32,
    pub features: Vec<String>,
    /// In preference order: new data keys are generated under the first.
    pub trusted_keys: Vec<TrustedKey>,
    pub context: BTreeMap<String, String>,
    /// The volume key wrapped under each trusted key (context: volume id, purpose, pairs).
    pub volume_keys: Vec<WrappedKey>,
}

impl VolumeConfig {
    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(MAGIC)
            .u16(VERSION)
            .bytes(&self.volume_id)
            .u16(self.suite)
            .u32(self.block_size);
        w.u16(self.features.len() as u16);
        for f in &self.features {
            w.lp16(f.as_bytes());
        }
        w.u16(self.trusted_keys.len() as u16);
        for k in &self.trusted_keys {
            w.lp16(k.id.as_bytes()).lp16(k.locator.as_bytes());
        }
        w.u16(self.context.len() as u16);
        for (k, v) in &self.context {
            w.lp16(k.as_bytes()).lp16(v.as_bytes());
        }
        w.u16(self.volume_keys.len() as u16);
        for k in &self.volume_keys {
            k.encode(&mut w);
        }
        w.into_bytes()
    }

    /// The config file's bytes, MACed under `mac_key` (from `kdf::config_mac_key`).
    pub fn encode(&self, mac_key: &DerivedKey) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        let mut body = self.encode_body();
        let mac = kdf::hmac(mac_key, &[&body]);
        body.extend_from_slice(&mac);
        Ok(body)
    }

    /// The structural rules a config must satisfy, on write as on read.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |s: String| Err(FormatError::InvalidConfig(s));
        if self.suite != SUITE_AES256GCM_HKDF_SHA256 {
            return bad(format!("unknown algorithm suite {}", self.suite));
        }
        if !valid_block_size(self.block_size) {
            return bad(format!("invalid block size {}", self.block_size));
        }
        for f in &self.features {
            if !KNOWN_FEATURES.contains(&f.as_str()) {
                return Err(FormatError::UnknownFeature(f.clone()));
            }
        }
        if self.trusted_keys.is_empty() {
            return bad("no trusted keys".into());
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if k.id.is_empty()
                || k.locator.is_empty()
                || k.id.len() > 2048
                || k.locator.len() > 4096
            {
                return bad("empty or oversized trusted key".into());
            }
            if k.id.starts_with(super::context::RESERVED_PREFIX) {
                return bad(format!("key id {} uses the reserved prefix kmsfs:", k.id));
            }
            if self.trusted_keys[..i].iter().any(|o| o.id == k.id) {
                return bad(format!("key {} is listed twice", k.id));
            }
        }
        for (k, v) in &self.context {
            validate_static_pair(k, v).map_err(FormatError::InvalidConfig)?;
        }
        if self.volume_keys.is_empty() {
            return bad("no wrapped volume key".into());
        }
        for k in &self.volume_keys {
            k.validate().map_err(FormatError::InvalidConfig)?;
            if !self.trusted_keys.iter().any(|t| t.id == k.key_id) {
                return bad(format!(
                    "volume key wrapped under untrusted key {}",
                    k.key_id
                ));
            }
        }
        Ok(())
    }

    /// Whether names are stored in plaintext (else encrypted: see [`super::names`]).
    pub fn plaintext_names(&self) -> bool {
        self.features.iter().any(|f| f == FEATURE_PLAINTEXT_NAMES)
    }

    pub fn is_trusted(&self, key_id: &str) -> bool {
        self.trusted_keys.iter().any(|k| k.id == key_id)
    }
}

/// A config whose structure parsed but whose MAC is not yet checked: reading the trusted keys
/// and the wrapped volume key from it is how one obtains the MAC key.
#[derive(Debug)]
pub struct UnverifiedConfig {
    config: VolumeConfig,
    body: Vec<u8>,
    mac: [u8; MAC_LEN],
}

impl UnverifiedConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let bad = |s: &str| FormatError::InvalidConfig(s.into());
        let trunc = |_| bad("truncated");
        if bytes.len() < MAC_LEN + MAGIC.len() {
            return Err(bad("truncated"));
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut r = Reader::new(body);
        if r.take(8).map_err(trunc)? != MAGIC {
            return Err(bad("bad magic (not a kmsfs volume config)"));
        }
        let version = r.u16().map_err(trunc)?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "volume config",
                version,
            });
        }
        let volume_id = r.array().map_err(trunc)?;
        let suite = r.u16().map_err(trunc)?;
        let block_size = r.u32().map_err(trunc)?;
        let utf8 = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_string)
                .map_err(|_| bad("field is not UTF-8"))
        };
        let mut features = Vec::new();
        for _ in 0..r.u16().map_err(trunc)? {
            features.push(utf8(r.lp16().map_err(trunc)?)?);
        }
        let mut trusted_keys = Vec::new();
        for _ in 0..r.u16().map_err(trunc)? {
            let id = utf8(r.lp16().map_err(trunc)?)?;
            let locator = utf8(r.lp16().map_err(trunc)?)?;
            trusted_keys.push(TrustedKey { id, locator });
        }
        let mut context = BTreeMap::new();
        let mut last_key: Option<String> = None;
        for _ in 0..r.u16().map_err(trunc)? {
            let k = utf8(r.lp16().map_err(trunc)?)?;
            let v = utf8(r.lp16().map_err(trunc)?)?;
            if last_key
                .as_ref()
                .is_some_and(|l| l.as_bytes() >= k.as_bytes())
            {
                return Err(bad("context pairs not in canonical order"));
            }
            last_key = Some(k.clone());
            context.insert(k, v);
        }
        let mut volume_keys = Vec::new();
        for _ in 0..r.u16().map_err(trunc)? {
            volume_keys.push(WrappedKey::decode(&mut r, &|s| bad(s))?);
        }
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        let config = VolumeConfig {
            volume_id,
            suite,
            block_size,
            features,
            trusted_keys,
            context,
            volume_keys,
        };
        config.validate()?;
        Ok(UnverifiedConfig {
            config,
            body: body.to_vec(),
            mac: mac.try_into().expect("32 bytes"),
        })
    }

    /// The unauthenticated contents: only for obtaining the MAC key, or for showing what a
    /// damaged config claims.
    pub fn claimed(&self) -> &VolumeConfig {
        &self.config
    }

    /// Checks the MAC; only a verified config is trusted.
    pub fn verify(self, mac_key: &DerivedKey) -> Result<VolumeConfig, FormatError> {
        if kdf::hmac_verify(mac_key, &[&self.body], &self.mac) {
            Ok(self.config)
        } else {
            Err(FormatError::ConfigAuthFailed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> VolumeConfig {
        let mut context = BTreeMap::new();
        context.insert("tenant_id".to_string(), "clinic-42".to_string());
        VolumeConfig {
            volume_id: [3; 16],
            suite: SUITE_AES256GCM_HKDF_SHA256,
            block_size: 4096,
            features: vec![],
            trusted_keys: vec![TrustedKey {
                id: "local:aa".into(),
                locator: "local:/k".into(),
            }],
            context,
            volume_keys: vec![WrappedKey {
                key_id: "local:aa".into(),
                blob: vec![9; 77],
            }],
        }
    }

    #[test]
    fn round_trip_and_mac() {
        let key = DerivedKey::new([1; 32]);
        let bytes = sample().encode(&key).unwrap();
        let parsed = UnverifiedConfig::parse(&bytes).unwrap();
        assert_eq!(parsed.claimed(), &sample());
        assert_eq!(parsed.verify(&key).unwrap(), sample());
        let parsed = UnverifiedConfig::parse(&bytes).unwrap();
        assert_eq!(
            parsed.verify(&DerivedKey::new([2; 32])),
            Err(FormatError::ConfigAuthFailed)
        );
    }

    #[test]
    fn config_edited_fails_mac() {
        let key = DerivedKey::new([1; 32]);
        let mut bytes = sample().encode(&key).unwrap();
        // Change the block size from 4096 to 8192: still structurally valid.
        bytes[30] = 0x20;
        let parsed = UnverifiedConfig::parse(&bytes).unwrap();
        assert_eq!(parsed.claimed().block_size, 8192);
        assert_eq!(parsed.verify(&key), Err(FormatError::ConfigAuthFailed));
    }

    #[test]
    fn unknown_feature_is_refused() {
        let mut c = sample();
        c.features.push("compressed-blocks".into());
        let body = c.encode_body();
        let mut bytes = body.clone();
        bytes.extend_from_slice(&[0; 32]);
        assert_eq!(
            UnverifiedConfig::parse(&bytes).unwrap_err(),
            FormatError::UnknownFeature("compressed-blocks".into())
        );
    }

    #[test]
    fn truncated_config_is_refused_at_every_length() {
        let bytes = sample().encode(&DerivedKey::new([1; 32])).unwrap();
        for len in 0..bytes.len() {
            assert!(UnverifiedConfig::parse(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn volume_key_under_untrusted_key_is_refused() {
        let mut c = sample();
        c.volume_keys[0].key_id = "local:bb".into();
        assert!(c.encode(&DerivedKey::new([1; 32])).is_err());
    }
}
