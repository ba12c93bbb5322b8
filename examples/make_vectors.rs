//! Regenerates the test vectors in tests/vectors/ (run: `cargo run --example make_vectors`).
//!
//! Each vector is a backing file made by the real code and then damaged the way the attack it
//! is named after would damage it. Nonces and ids are random, so regenerating changes every
//! byte; tests/vectors.rs checks the committed vectors, and docs/FORMAT.md quotes some bytes.
// An example on paths it is given, not a mounted store.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kmsfs::core::file::{encode_object, write_new_file};
use kmsfs::core::volume::{InitOptions, OpenOptions};
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::format::codec::hex;
use kmsfs::format::context::CanonicalPath;
use kmsfs::format::header::{
    seal_slot, slot_checksum, Attrs as ObjectAttrs, Header, ObjectKind, Preamble, SlotState,
};
use kmsfs::keys::spec::KeySpec;

const BLOCK: u32 = 512;
pub const MASTER: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};

fn key_file(dir: &Path, name: &str, bytes: [u8; 32]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn volume(root: &Path, key: &Path) -> Volume {
    fs::create_dir_all(root).unwrap();
    let mut context = std::collections::BTreeMap::new();
    context.insert("tenant".to_string(), "vectors".to_string());
    let opts = InitOptions {
        keys: vec![KeySpec::Local(key.into())],
        context,
        block_size: BLOCK,
        // The file vectors are named after their defects; names/ has the name vectors.
        plaintext_names: true,
        ..Default::default()
    };
    Volume::init(root, opts).unwrap().volume
}

fn p(name: &str) -> CanonicalPath {
    CanonicalPath::from_user(Path::new(name)).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

struct Out {
    vol: Volume,
    root: PathBuf,
    cases: Vec<String>,
}

impl Out {
    fn file(&self, name: &str, data: &[u8]) -> Vec<u8> {
        write_new_file(&self.vol, &p(name), &mut &data[..]).unwrap();
        fs::read(self.root.join(name)).unwrap()
    }

    fn put(&self, name: &str, bytes: &[u8]) {
        fs::write(self.root.join(name), bytes).unwrap();
    }

    fn case(&mut self, name: &str, expect: &str, detail: &str) {
        let field = if expect == "ok" {
            "plaintext_hex"
        } else {
            "error"
        };
        self.cases.push(format!(
            "    {{\"name\": \"{name}\", \"expect\": \"{expect}\", \"{field}\": \"{detail}\"}}"
        ));
    }
}

fn fix_checksum(raw: &mut [u8], slot: usize) {
    let pre = Preamble::decode(raw).unwrap();
    let (size, start) = (pre.slot_size as usize, pre.slot_offset(slot) as usize);
    let sum = slot_checksum(
        raw[..64].try_into().unwrap(),
        &raw[start..start + size - 16],
    );
    raw[start + size - 16..start + size].copy_from_slice(&sum);
}

/// Re-MACs slot `slot` under `vol`'s header key: what an insider who holds the volume key
/// (anyone who can mount it) can do, so only the key service or the commitment stands.
fn remac(vol: &Volume, raw: &mut [u8], slot: usize) {
    fix_checksum(raw, slot);
    let header = Header::parse(raw).unwrap();
    let SlotState::Sealed(content) = &header.slots[slot] else {
        panic!("slot {slot} is not sealed")
    };
    let pre = &header.preamble;
    let sealed = seal_slot(pre, content, &vol.header_mac_key(&pre.file_id)).unwrap();
    let start = pre.slot_offset(slot) as usize;
    raw[start..start + sealed.len()].copy_from_slice(&sealed);
}

/// Name vectors (docs/FORMAT.md, "Names"): a fixed volume header key and volume id, and for
/// each case the directory id, the plaintext name and what is stored.
fn name_vectors() -> String {
    use kmsfs::format::names::{encrypt, NameKey, StoredName};
    let header_key = [0x42u8; 32];
    let volume_id = [0x11u8; 16];
    let key = NameKey::derive(&kmsfs::secret::DerivedKey::new(header_key), &volume_id);
    let cases: [(&str, [u8; 16], Vec<u8>); 5] = [
        ("short", [0xd1; 16], b"patient-4711-hiv.pdf".to_vec()),
        (
            "same_name_other_dir",
            [0xd2; 16],
            b"patient-4711-hiv.pdf".to_vec(),
        ),
        (
            "sixteen_bytes_pad_a_block",
            [0xd1; 16],
            b"0123456789abcdef".to_vec(),
        ),
        ("not_utf8", [0xd1; 16], vec![0xff, 0xfe, b'x']),
        ("long", [0xd1; 16], vec![b'L'; 200]),
    ];
    let mut out = Vec::new();
    for (case, dir_id, name) in cases {
        let (backing, side) = match encrypt(&key, &dir_id, &name).unwrap() {
            StoredName::Short(s) => (s, String::new()),
            StoredName::Long { backing, encrypted } => (backing, encrypted),
        };
        out.push(format!(
            "    {{\"case\": \"{case}\", \"dir_id_hex\": \"{}\", \"name_hex\": \"{}\", \"backing\": \"{backing}\", \"side_record\": \"{side}\"}}",
            hex(&dir_id),
            hex(&name)
        ));
    }
    format!(
        "{{\n  \"header_key_hex\": \"{}\",\n  \"volume_id_hex\": \"{}\",\n  \"names\": [\n{}\n  ]\n}}\n",
        hex(&header_key),
        hex(&volume_id),
        out.join(",\n")
    )
}

fn main() {
    let out_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "tests/vectors".into()),
    );
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path(), "master.key", MASTER);
    let mut other_key_bytes = MASTER;
    other_key_bytes.iter_mut().for_each(|b| *b += 32);
    let other_key = key_file(tmp.path(), "other.key", other_key_bytes);
    let root = out_dir.join("volume");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let vol = volume(&root, &key);
    let mut o = Out {
        vol,
        root: root.clone(),
        cases: Vec::new(),
    };
    let small = b"hello, kmsfs\n".to_vec();
    let multi = pattern(2 * BLOCK as usize + 276);
    let sb = BLOCK as usize + 28;

    o.file("good_empty", b"");
    o.case("good_empty", "ok", "");
    o.file("good_small", &small);
    o.case("good_small", "ok", &hex(&small));
    let good_multi = o.file("good_multiblock", &multi);
    o.case("good_multiblock", "ok", &hex(&multi));
    let off = Preamble::decode(&good_multi).unwrap().data_offset() as usize;

    let mut raw = o.file("block_reordered", &multi);
    let b0 = raw[off..off + sb].to_vec();
    raw.copy_within(off + sb..off + 2 * sb, off);
    raw[off + sb..off + 2 * sb].copy_from_slice(&b0);
    o.put("block_reordered", &raw);
    o.case(
        "block_reordered",
        "error",
        "authentication failed at block 0",
    );

    let mut raw = o.file("block_duplicated", &multi);
    raw.copy_within(off..off + sb, off + sb);
    o.put("block_duplicated", &raw);
    o.case(
        "block_duplicated",
        "error",
        "authentication failed at block 1",
    );

    let mut raw = o.file("block_dropped", &multi);
    raw.drain(off + sb..off + 2 * sb);
    o.put("block_dropped", &raw);
    o.case("block_dropped", "error", "authentication failed at block 1");

    let mut raw = o.file("block_from_other_file", &multi);
    raw[off + sb..off + 2 * sb].copy_from_slice(&good_multi[off + sb..off + 2 * sb]);
    o.put("block_from_other_file", &raw);
    o.case(
        "block_from_other_file",
        "error",
        "authentication failed at block 1",
    );

    let raw = o.file("truncated_at_block_boundary", &multi);
    o.put("truncated_at_block_boundary", &raw[..off + 2 * sb]);
    o.case(
        "truncated_at_block_boundary",
        "error",
        "authentication failed at block 1",
    );

    let raw = o.file("truncated_inside_block", &multi);
    o.put("truncated_inside_block", &raw[..raw.len() - 10]);
    o.case(
        "truncated_inside_block",
        "error",
        "authentication failed at block 2",
    );

    let raw = o.file("truncated_to_header", b"");
    o.put("truncated_to_header", &raw[..off]);
    o.case("truncated_to_header", "error", "invalid ciphertext length");

    let mut raw = o.file("bit_flip_in_block", &multi);
    raw[off + sb + 100] ^= 0x04;
    o.put("bit_flip_in_block", &raw);
    o.case(
        "bit_flip_in_block",
        "error",
        "authentication failed at block 1",
    );

    let mut raw = o.file("header_from_other_file", &multi);
    raw.truncate(off);
    raw.extend_from_slice(&good_multi[off..]);
    o.put("header_from_other_file", &raw);
    o.case(
        "header_from_other_file",
        "error",
        "authentication failed at block 0",
    );

    let mut raw = o.file("bad_commitment", &small);
    raw[40] ^= 0x80;
    remac(&o.vol, &mut raw, 0);
    o.put("bad_commitment", &raw);
    o.case("bad_commitment", "error", "key commitment mismatch");

    // A mode edited on the store (0600 to 0666), checksum fixed: the slot MAC covers it.
    let mut raw = o.file("mode_rewritten_unmaced", &small);
    assert_eq!(raw[77..79], [0x01, 0x80]);
    raw[78] = 0xb6;
    fix_checksum(&mut raw, 0);
    o.put("mode_rewritten_unmaced", &raw);
    o.case(
        "mode_rewritten_unmaced",
        "error",
        "header authentication failed",
    );

    // A symlink: an object whose content is its target, keyed under the volume.
    let target = b"good_small";
    let link = ObjectAttrs {
        kind: ObjectKind::Symlink,
        mode: 0o777,
        uid: 0,
        gid: 0,
        rdev: 0,
    };
    let bytes = encode_object(&o.vol, &p("good_symlink"), link, target).unwrap();
    o.put("good_symlink", &bytes);
    o.case("good_symlink", "ok", &hex(target));

    // A header of format version 1 (before attributes were authenticated).
    let mut raw = o.file("version_1_header", &small);
    raw[5] = 1;
    o.put("version_1_header", &raw);
    o.case(
        "version_1_header",
        "error",
        "header of format version 1, which this kmsfs does not read",
    );

    let mut raw = o.file("slot_generation_forged", &small);
    raw[64 + 7] = 9;
    fix_checksum(&mut raw, 0);
    o.put("slot_generation_forged", &raw);
    o.case(
        "slot_generation_forged",
        "error",
        "header authentication failed",
    );

    for (name, tear_both) in [("torn_slot_falls_back", false), ("both_slots_torn", true)] {
        o.file(name, &small);
        let mut f = EncryptedFile::open(&o.vol, &p(name), true).unwrap();
        let envs = f.envelopes().to_vec();
        f.replace_envelopes(envs).unwrap();
        drop(f);
        let mut raw = fs::read(root.join(name)).unwrap();
        let pre = Preamble::decode(&raw).unwrap();
        raw[pre.slot_offset(1) as usize + 20] ^= 1;
        if tear_both {
            raw[pre.slot_offset(0) as usize + 20] ^= 1;
        }
        o.put(name, &raw);
    }
    o.case("torn_slot_falls_back", "ok", &hex(&small));
    o.case("both_slots_torn", "error", "no valid slot");

    o.file("original_name", &small);
    fs::rename(root.join("original_name"), root.join("moved_file")).unwrap();
    o.case("moved_file", "error", "bound to /original_name");

    // An envelope's path rewritten to the file's new name (checksum fixed, as anyone can).
    let rewritten = |o: &Out, name: &str| {
        let decoy = "x".repeat(name.len());
        let mut raw = o.file(&decoy, &small);
        let at = raw
            .windows(decoy.len())
            .position(|w| w == decoy.as_bytes())
            .unwrap();
        raw[at..at + name.len()].copy_from_slice(name.as_bytes());
        fix_checksum(&mut raw, 0);
        fs::remove_file(root.join(&decoy)).unwrap();
        raw
    };
    // Without the volume key the slot MAC gives it away...
    let raw = rewritten(&o, "path_rewritten_unmaced");
    o.put("path_rewritten_unmaced", &raw);
    o.case(
        "path_rewritten_unmaced",
        "error",
        "header authentication failed",
    );
    // ...and with it, the key service refuses the context.
    let name = "envelope_path_rewritten";
    let mut raw = rewritten(&o, name);
    remac(&o.vol, &mut raw, 0);
    o.put(name, &raw);
    o.case(name, "error", "context mismatch: Decrypt");

    // Same master key, another volume id.
    let other_vol = volume(&tmp.path().join("other_volume"), &key);
    write_new_file(&other_vol, &p("copied_from_other_volume"), &mut &small[..]).unwrap();
    let copied = fs::read(tmp.path().join("other_volume/copied_from_other_volume")).unwrap();
    o.put("copied_from_other_volume", &copied);
    o.case(
        "copied_from_other_volume",
        "error",
        "header authentication failed",
    );
    write_new_file(&other_vol, &p("copied_and_remaced"), &mut &small[..]).unwrap();
    let mut copied = fs::read(tmp.path().join("other_volume/copied_and_remaced")).unwrap();
    remac(&o.vol, &mut copied, 0);
    o.put("copied_and_remaced", &copied);
    o.case("copied_and_remaced", "error", "context mismatch: Decrypt");

    let rogue = volume(&tmp.path().join("rogue"), &other_key);
    write_new_file(&rogue, &p("untrusted_key"), &mut &small[..]).unwrap();
    let mut raw = fs::read(tmp.path().join("rogue/untrusted_key")).unwrap();
    remac(&o.vol, &mut raw, 0);
    o.put("untrusted_key", &raw);
    o.case("untrusted_key", "error", "untrusted key: Decrypt");

    // Config vectors.
    let configs = out_dir.join("configs");
    fs::create_dir_all(&configs).unwrap();
    let good_cfg = fs::read(root.join(".kmsfs/config")).unwrap();
    let mut edited = good_cfg.clone();
    edited[30] = 0x04; // block size 512 -> 1024
    fs::write(configs.join("config_edited"), &edited).unwrap();
    fs::write(
        configs.join("config_truncated"),
        &good_cfg[..good_cfg.len() - 1],
    )
    .unwrap();
    // The vector volume has one feature (plaintext-names); a second, unknown one goes first.
    let mut flagged = good_cfg[..32].to_vec();
    assert_eq!(&good_cfg[32..34], &[0, 1]);
    flagged.extend_from_slice(&[0, 2, 0, 17]);
    flagged.extend_from_slice(b"compressed-blocks");
    flagged.extend_from_slice(&good_cfg[34..]);
    fs::write(configs.join("config_unknown_feature"), &flagged).unwrap();
    fs::copy(
        tmp.path().join("rogue/.kmsfs/config"),
        configs.join("config_under_other_key"),
    )
    .unwrap();

    // Check every vector opens (or fails) as the manifest says before writing it.
    let reopened = Volume::open(
        &root,
        &OpenOptions {
            pin: vec![KeySpec::Local(key.clone())],
            ..Default::default()
        },
    );
    assert!(reopened.is_ok());
    let manifest = format!(
        "{{\n  \"master_key_hex\": \"{}\",\n  \"other_key_hex\": \"{}\",\n  \"block_size\": {BLOCK},\n  \"files\": [\n{}\n  ],\n  \"configs\": [\n    {{\"name\": \"config_edited\", \"error\": \"volume config authentication failed\"}},\n    {{\"name\": \"config_truncated\", \"error\": \"invalid volume config: truncated\"}},\n    {{\"name\": \"config_unknown_feature\", \"error\": \"unknown feature flag 'compressed-blocks'\"}},\n    {{\"name\": \"config_under_other_key\", \"error\": \"is not protected by the key\"}}\n  ]\n}}\n",
        hex(&MASTER),
        hex(&other_key_bytes),
        o.cases.join(",\n")
    );
    fs::write(out_dir.join("manifest.json"), manifest).unwrap();
    fs::write(out_dir.join("names.json"), name_vectors()).unwrap();
    // The root directory's record is not a vector, and its reserved name would keep this
    // repository's tree off a kmsfs mount with plaintext names (the tests copy it there).
    fs::remove_file(root.join(".kmsfs-dir")).unwrap();
    // The config records where the key file was; point it nowhere useful on purpose: tests
    // pin the key with --key local:PATH, as an operator whose key file moved would.
    println!(
        "wrote {} file vectors to {}",
        o.cases.len(),
        out_dir.display()
    );
}
