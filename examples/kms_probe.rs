//! Measures a KMS endpoint through kmsfs's AWS provider and keyring: median latency of
//! GenerateDataKey and Decrypt, then throughput and errors at rising concurrency.
//! Run against a local moto server, for example:
//!
//! ```text
//! moto_server -p 5000 &
//! AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 \
//!   AWS_ENDPOINT_URL_KMS=http://127.0.0.1:5000 cargo run --release --example kms_probe -- KEY_ARN
//! ```
// An example on paths it is given, not a mounted store.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::format::context::{CanonicalPath, EncryptionContext};
use kmsfs::keys::aws::{AwsKmsProvider, AwsOptions};
use kmsfs::keys::{KeyProvider, KmsOp};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let key = std::env::args()
        .nth(1)
        .expect("usage: kms_probe KEY_ARN [CALLS]");
    let calls: usize = std::env::args().nth(2).map_or(200, |s| s.parse().unwrap());
    let p = Arc::new(AwsKmsProvider::new(AwsOptions::from_env().unwrap()).unwrap());
    let ctx = |i: usize| {
        let path = CanonicalPath::from_user(Path::new(&format!("dir/file-{i}"))).unwrap();
        EncryptionContext::for_file(&[7; 16], &path, &BTreeMap::new())
    };
    // Warm up connections.
    p.generate_data_key(&key, &ctx(0)).unwrap();
    let mut gdk = Vec::new();
    let mut wrapped = Vec::new();
    for i in 0..calls {
        let t = Instant::now();
        let (_, w) = p.generate_data_key(&key, &ctx(i)).unwrap();
        gdk.push(t.elapsed());
        wrapped.push(w);
    }
    let mut dec = Vec::new();
    for (i, w) in wrapped.iter().enumerate() {
        let t = Instant::now();
        p.decrypt(w, &ctx(i)).unwrap();
        dec.push(t.elapsed());
    }
    println!(
        "{calls} calls each: median GenerateDataKey {:?}, median Decrypt {:?}",
        median(gdk),
        median(dec)
    );

    let wrapped = Arc::new(wrapped);
    for threads in [1usize, 4, 16, 64, 128, 256, 512] {
        let per_thread = (calls / threads).max(4);
        let t0 = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (p, wrapped) = (p.clone(), wrapped.clone());
                std::thread::spawn(move || {
                    let mut errors = BTreeMap::new();
                    for j in 0..per_thread {
                        let i = (t * per_thread + j) % wrapped.len();
                        if let Err(e) = p.decrypt(&wrapped[i], &ctx(i)) {
                            *errors.entry(format!("{}", e.kind)).or_insert(0) += 1;
                        }
                    }
                    errors
                })
            })
            .collect();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for h in handles {
            for (k, v) in h.join().unwrap() {
                *errors.entry(k).or_default() += v;
            }
        }
        let total = threads * per_thread;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{threads:>4} concurrent {}: {total} calls, {:.0} calls/s, errors {errors:?}",
            KmsOp::Decrypt,
            total as f64 / secs
        );
    }
}
