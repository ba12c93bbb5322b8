//! The committed test vectors (tests/vectors/, made by `cargo run --example make_vectors`):
//! each file opens, or fails with the reason its manifest names; the good ones re-encode to
//! the same bytes (so the encoder is byte-exact and deterministic given its nonces); and the
//! byte dumps quoted in docs/FORMAT.md are the vectors' real bytes.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kmsfs::core::volume::OpenOptions;
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::format::block::{BlockCipher, Layout, NONCE_LEN};
use kmsfs::format::codec::{hex, unhex};
use kmsfs::format::config::UnverifiedConfig;
use kmsfs::format::context::{CanonicalPath, EncryptionContext};
use kmsfs::format::header::{seal_slot, Header, SlotState};
use kmsfs::format::kdf;
use kmsfs::keys::spec::KeySpec;
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: PathBuf,
    manifest: Value,
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let manifest: Value =
        serde_json::from_str(&fs::read_to_string(format!("{VECTORS}/manifest.json")).unwrap())
            .unwrap();
    let root = dir.path().join("volume");
    copy_dir(Path::new(&format!("{VECTORS}/volume")), &root);
    let key = dir.path().join("master.key");
    fs::write(
        &key,
        unhex(manifest["master_key_hex"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    Fixture {
        _dir: dir,
        root,
        key,
        manifest,
    }
}

impl Fixture {
    fn open(&self) -> Result<Volume, kmsfs::error::Error> {
        Volume::open(
            &self.root,
            &OpenOptions {
                pin: vec![KeySpec::Local(self.key.clone())],
                ..Default::default()
            },
        )
    }
}

fn path(name: &str) -> CanonicalPath {
    CanonicalPath::from_user(Path::new(name)).unwrap()
}

#[test]
fn every_file_vector_opens_or_fails_as_documented() {
    let fx = fixture();
    let vol = fx.open().unwrap();
    let cases = fx.manifest["files"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let result = EncryptedFile::open(&vol, &path(name), false).and_then(|f| f.read_all());
        match case["expect"].as_str().unwrap() {
            "ok" => {
                let want = unhex(case["plaintext_hex"].as_str().unwrap()).unwrap();
                assert_eq!(
                    result.unwrap_or_else(|e| panic!("{name}: {e}")),
                    want,
                    "{name}"
                );
            }
            _ => {
                let want = case["error"].as_str().unwrap();
                let err = result
                    .err()
                    .unwrap_or_else(|| panic!("{name}: opened, but must fail with '{want}'"));
                assert!(
                    err.to_string().contains(want),
                    "{name}: '{err}' does not say '{want}'"
                );
                assert!(
                    err.is_integrity(),
                    "{name}: '{err}' is not reported as an integrity failure"
                );
            }
        }
    }
}

#[test]
fn every_config_vector_is_refused_as_documented() {
    for case in fixture().manifest["configs"].as_array().unwrap() {
        let fx = fixture();
        let name = case["name"].as_str().unwrap();
        fs::copy(
            format!("{VECTORS}/configs/{name}"),
            fx.root.join(".kmsfs/config"),
        )
        .unwrap();
        let err = fx
            .open()
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"));
        let want = case["error"].as_str().unwrap();
        assert!(
            err.to_string().contains(want),
            "{name}: '{err}' does not say '{want}'"
        );
    }
}

#[test]
fn good_vectors_re_encode_byte_for_byte() {
    let fx = fixture();
    let vol = fx.open().unwrap();
    for name in ["good_empty", "good_small", "good_multiblock"] {
        let raw = fs::read(fx.root.join(name)).unwrap();
        let header = Header::parse(&raw).unwrap();
        let pre = &header.preamble;
        assert_eq!(pre.encode(), raw[..64], "{name}: preamble");
        let SlotState::Sealed(content) = &header.slots[0] else {
            panic!("{name}: slot 0")
        };
        assert_eq!(header.slots[1], SlotState::Empty);
        assert!(raw[pre.slot_offset(1) as usize..pre.data_offset() as usize]
            .iter()
            .all(|&b| b == 0));
        let ctx = vol.file_context(&path(name));
        let keys: Vec<_> = content.envelopes.iter().map(|e| &e.key).collect();
        let dek = vol.keyring().unwrap(&keys, &ctx).unwrap();
        let mac_key = vol.header_mac_key(&pre.file_id);
        let slot = seal_slot(pre, content, &mac_key).unwrap();
        assert_eq!(slot, raw[64..64 + pre.slot_size as usize], "{name}: slot 0");
        // Blocks: resealing each with its own nonce reproduces it.
        let cipher = BlockCipher::new(&kdf::content_key(&dek, &pre.file_id), pre.file_id);
        let layout = Layout {
            data_offset: pre.data_offset(),
            block_size: pre.block_size,
        };
        let size = layout.plaintext_len(raw.len() as u64).unwrap();
        let count = layout.block_count(size);
        for i in 0..count {
            let start = layout.block_offset(i) as usize;
            let len = layout.block_plain_len(size, i) + 28;
            let sealed = &raw[start..start + len];
            let mut plain = vec![0u8; len - 28];
            cipher.open(i, i == count - 1, sealed, &mut plain).unwrap();
            let mut again = Vec::new();
            cipher.seal(
                i,
                i == count - 1,
                sealed[..NONCE_LEN].try_into().unwrap(),
                &plain,
                &mut again,
            );
            assert_eq!(again, sealed, "{name}: block {i}");
        }
    }
}

#[test]
fn config_vector_re_encodes_byte_for_byte() {
    let fx = fixture();
    let vol = fx.open().unwrap();
    let raw = fs::read(fx.root.join(".kmsfs/config")).unwrap();
    let claimed = UnverifiedConfig::parse(&raw).unwrap().claimed().clone();
    let ctx = EncryptionContext::for_volume_config(&claimed.volume_id, &claimed.context);
    let keys: Vec<_> = claimed.volume_keys.iter().collect();
    let volume_key = vol.keyring().unwrap(&keys, &ctx).unwrap();
    let again = claimed
        .encode(&kdf::config_mac_key(&volume_key, &claimed.volume_id))
        .unwrap();
    assert_eq!(again, raw);
    assert_eq!(&claimed, vol.config());
}

#[test]
fn local_wrapped_keys_have_the_documented_layout() {
    let fx = fixture();
    let vol = fx.open().unwrap();
    let raw = fs::read(fx.root.join("good_small")).unwrap();
    let header = Header::parse(&raw).unwrap();
    let SlotState::Sealed(content) = &header.slots[0] else {
        panic!()
    };
    let key = &content.envelopes[0].key;
    assert_eq!(key.blob.len(), 97);
    assert_eq!(key.blob[0], 2);
    assert_eq!(key.key_id, format!("local:{}", hex(&key.blob[1..17])));
    assert_eq!(vol.config().trusted_keys[0].id, key.key_id);
}

/// docs/FORMAT.md quotes vector bytes in fenced blocks whose info string is
/// `hex FILE OFFSET LENGTH`; each must match the file.
#[test]
fn format_doc_quotes_real_vector_bytes() {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let mut checked = 0;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(spec) = line.strip_prefix("```hex ") else {
            continue;
        };
        let parts: Vec<&str> = spec.split_whitespace().collect();
        let (file, offset, len): (&str, usize, usize) = (
            parts[0],
            parts[1].parse().unwrap(),
            parts[2].parse().unwrap(),
        );
        let mut quoted = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            // Everything after '#' on a line is annotation.
            quoted.extend(
                l.split('#')
                    .next()
                    .unwrap()
                    .chars()
                    .filter(|c| !c.is_whitespace()),
            );
        }
        let bytes = fs::read(format!("{VECTORS}/{file}")).unwrap();
        assert_eq!(
            quoted,
            hex(&bytes[offset..offset + len]),
            "docs/FORMAT.md block for {file} {offset}+{len}"
        );
        checked += 1;
    }
    assert!(
        checked >= 3,
        "docs/FORMAT.md must quote the vectors ({checked} blocks found)"
    );
}

/// The name vectors (tests/vectors/names.json): each plaintext name encrypts to exactly the
/// stored name recorded (a long one to its hashed entry name and side record), decrypts back,
/// and does not decrypt under another directory's id; docs/FORMAT.md quotes the first.
#[test]
fn name_vectors_encrypt_and_decrypt_as_documented() {
    use kmsfs::format::names::{decrypt, encrypt, side_record_name, NameKey, StoredName};
    let v: Value =
        serde_json::from_str(&fs::read_to_string(format!("{VECTORS}/names.json")).unwrap())
            .unwrap();
    let arr = |k: &str| -> Vec<u8> { unhex(v[k].as_str().unwrap()).unwrap() };
    let key = NameKey::derive(
        &kmsfs::secret::DerivedKey::new(arr("header_key_hex").try_into().unwrap()),
        &arr("volume_id_hex").try_into().unwrap(),
    );
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let cases = v["names"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        let dir_id: [u8; 16] = unhex(&s("dir_id_hex")).unwrap().try_into().unwrap();
        let name = unhex(&s("name_hex")).unwrap();
        let stored = encrypt(&key, &dir_id, &name).unwrap();
        let encrypted = match &stored {
            StoredName::Short(n) => {
                assert_eq!(n, &s("backing"), "{}", s("case"));
                assert!(s("side_record").is_empty());
                n.clone()
            }
            StoredName::Long { backing, encrypted } => {
                assert_eq!(backing, &s("backing"), "{}", s("case"));
                assert_eq!(encrypted, &s("side_record"));
                assert_eq!(
                    &side_record_name(backing, encrypted.as_bytes()).unwrap(),
                    encrypted
                );
                encrypted.clone()
            }
        };
        assert_eq!(decrypt(&key, &dir_id, &encrypted).unwrap(), name);
        let mut other = dir_id;
        other[0] ^= 1;
        assert!(decrypt(&key, &other, &encrypted).is_err());
    }
    // Equal names in two directories are stored differently.
    assert_ne!(cases[0]["backing"], cases[1]["backing"]);
    assert!(
        doc.contains(cases[0]["backing"].as_str().unwrap()),
        "docs/FORMAT.md quotes the short name vector"
    );
}
