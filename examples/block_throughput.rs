//! Measures the format layer's block sealing and opening throughput (AES-256-GCM with the
//! associated data kmsfs uses), to compare with `openssl speed -evp aes-256-gcm` on the same
//! machine. Run: `cargo run --release --example block_throughput [BLOCK_SIZE] [SECONDS]`.
// An example on paths it is given, not a mounted store.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use kmsfs::format::block::BlockCipher;
use kmsfs::secret::DerivedKey;

fn main() {
    let mut args = std::env::args().skip(1);
    let block: usize = args.next().map_or(4096, |s| s.parse().expect("block size"));
    let secs: f64 = args.next().map_or(2.0, |s| s.parse().expect("seconds"));
    let cipher = BlockCipher::new(&DerivedKey::new([7; 32]), [1; 16]);
    let plain = vec![0x5Au8; block];
    let mut sealed = Vec::with_capacity(block + 28);
    let mut out = vec![0u8; block];

    let run = |f: &mut dyn FnMut(u64)| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs_f64(secs) {
            for _ in 0..256 {
                f(n);
                n += 1;
            }
        }
        n as f64 * block as f64 / start.elapsed().as_secs_f64() / 1e6
    };
    let seal = run(&mut |i| {
        sealed.clear();
        cipher.seal(i, false, &[(i & 0xff) as u8; 12], &plain, &mut sealed);
    });
    sealed.clear();
    cipher.seal(0, false, &[1; 12], &plain, &mut sealed);
    let open = run(&mut |_| {
        cipher.open(0, false, &sealed, &mut out).expect("authentic");
    });
    println!("block {block} B: seal {seal:.0} MB/s, open {open:.0} MB/s");
}
