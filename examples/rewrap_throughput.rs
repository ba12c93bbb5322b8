//! Measures `rewrap` throughput (files/s) on a volume of local-key files, with optional
//! injected key-service latency, at several job counts. Run:
//! `cargo run --release --example rewrap_throughput [FILES] [LATENCY_MS] [JOBS,JOBS,...]`.
//!
//! Each file is rewrapped from key A to key B and then back, so every measurement moves the
//! same N envelopes. Between two local key files a rewrap is a Decrypt and an Encrypt (with
//! KMS keys it is one ReEncrypt), each paying the injected latency.
// An example on paths it is given, not a mounted store.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::core::file::write_new_file;
use kmsfs::core::rewrap::rewrap_files;
use kmsfs::core::volume::{InitOptions, KeyOptions, OpenOptions, ProviderWrapper};
use kmsfs::core::Volume;
use kmsfs::format::context::CanonicalPath;
use kmsfs::keys::fault::{Faults, FaultyProvider};
use kmsfs::keys::spec::KeySpec;
use kmsfs::keys::KeyProvider;

fn main() {
    let mut args = std::env::args().skip(1);
    let files: usize = args.next().map_or(10_000, |s| s.parse().expect("files"));
    let latency_ms: u64 = args.next().map_or(0, |s| s.parse().expect("latency"));
    let jobs: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "8,32".into())
        .split(',')
        .map(|s| s.parse().expect("jobs"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (backing, key_a, key_b) = (
        dir.path().join("backing"),
        dir.path().join("a.key"),
        dir.path().join("b.key"),
    );
    std::fs::create_dir(&backing).unwrap();
    let init = Volume::init(
        &backing,
        InitOptions {
            keys: vec![KeySpec::Local(key_a.clone())],
            ..Default::default()
        },
    )
    .unwrap();
    let t0 = Instant::now();
    for i in 0..files {
        if i % 1000 == 0 {
            std::fs::create_dir(backing.join(format!("d{}", i / 1000))).unwrap();
        }
        let p = CanonicalPath::from_encoded(&format!("/d{}/f{i}", i / 1000)).unwrap();
        write_new_file(&init.volume, &p, &mut &b"some file content"[..]).unwrap();
    }
    eprintln!(
        "created {files} files in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    drop(init);

    let latency = Duration::from_millis(latency_ms);
    let slow: ProviderWrapper = Arc::new(move |inner| {
        let f = FaultyProvider::new(inner, 1);
        f.set(
            None,
            Faults {
                latency,
                ..Default::default()
            },
        );
        Arc::new(f) as Arc<dyn KeyProvider>
    });
    let options = OpenOptions {
        key_options: KeyOptions {
            wrap_provider: Some(slow),
            concurrency: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut to = (key_b, key_a);
    for &j in &jobs {
        let mut vol = Volume::open(&backing, &options).unwrap();
        let (to_id, _) = vol.add_trusted_key(&KeySpec::Local(to.0.clone())).unwrap();
        let old = vol.other_trusted_keys(&to_id);
        let list = vol.files_beneath(&CanonicalPath::root()).unwrap();
        let t = Instant::now();
        let s = rewrap_files(&vol, &list, &old, &to_id, j, false, &|_| {});
        let secs = t.elapsed().as_secs_f64();
        assert!(s.failures.is_empty(), "{:?}", &s.failures[..1]);
        assert_eq!(s.rewrapped, files);
        vol.retire_keys(&old).unwrap();
        println!(
            "latency {latency_ms} ms, jobs {j}: {files} files in {secs:.2} s = {:.0} files/s",
            files as f64 / secs
        );
        to = (to.1, to.0);
    }
}
