//! Crash soak: rounds of `kill -9` of the daemon at a random moment while fsynced appends,
//! whole-file writes with fsync, file renames, directory renames and a concurrent `kmsfs
//! rewrap` (killed too) run against one volume. After each crash the volume mounts again,
//! every fsynced byte is there at one of the names its file had, and `kmsfs fsck` is clean.
//!
//! `KMSFS_SOAK_ROUNDS` sets the number of rounds (10 here, in CI; `scripts/soak.sh` runs 100),
//! `KMSFS_SOAK_SEED` the seed, printed on failure so a round can be replayed.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mount::{fuse_available, kmsfs, Mount};
use common::pattern;

fn record(i: i64) -> String {
    format!("record {i:08} {}\n", "y".repeat((i % 61) as usize))
}

/// xorshift64*, so a failing round can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Files known durable (written and fsynced, then renamed only after that): the names each
/// may be at, and its content.
type Durable = Arc<Mutex<BTreeMap<u64, (Vec<String>, Vec<u8>)>>>;

fn rewrap(m: &Mount, key: &std::path::Path) -> Child {
    kmsfs()
        .arg("rewrap")
        .arg(&m.backing)
        .arg("--to-key")
        .arg(format!("local:{}", key.display()))
        .arg("--jobs")
        .arg("4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_at_random_moments_loses_no_fsynced_byte_and_fsck_stays_clean() {
    if !fuse_available() {
        return;
    }
    let rounds: u64 = std::env::var("KMSFS_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("KMSFS_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    let mut rng = Rng(seed | 1);
    let mut m = Mount::new(4096, &[]);
    let keys = [m.key.clone(), m.dir.path().join("keys/second.key")];
    for d in ["logs", "data", "dirs/a"] {
        fs::create_dir_all(m.p(d)).unwrap();
    }
    // A directory of fsynced files that renames back and forth during every round.
    for k in 0..40 {
        let mut f = fs::File::create(m.p(&format!("dirs/a/file{k:02}"))).unwrap();
        f.write_all(&pattern(500 + 37 * k, k as u8)).unwrap();
        f.sync_all().unwrap();
    }
    let durable: Durable = Arc::default();
    let mut journals: Vec<(String, i64)> = Vec::new();
    let mut next_file = 0u64;
    let dir_renames = Arc::new(AtomicI64::new(0));

    for round in 0..rounds {
        let context = format!("seed {seed}, round {round}");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicI64::new(-1));
        let journal = format!("logs/journal{round:03}.log");
        let mut workers = Vec::new();
        // Fsynced appends.
        {
            let (path, acked, stop) = (m.p(&journal), acked.clone(), stop.clone());
            workers.push(std::thread::spawn(move || {
                let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) else {
                    return;
                };
                for i in 0.. {
                    if stop.load(Ordering::Relaxed)
                        || f.write_all(record(i).as_bytes()).is_err()
                        || f.sync_data().is_err()
                    {
                        return;
                    }
                    acked.store(i, Ordering::SeqCst);
                }
            }));
        }
        // Whole files written and fsynced, then renamed.
        {
            let (mnt, durable, stop) = (m.mnt.clone(), durable.clone(), stop.clone());
            let first = next_file;
            next_file += 10_000;
            workers.push(std::thread::spawn(move || {
                for id in first.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let name = format!("data/f{id}");
                    let body = pattern(100 + (id as usize * 131) % 20_000, id as u8);
                    let written = fs::File::create(mnt.join(&name)).and_then(|mut f| {
                        f.write_all(&body)?;
                        f.sync_all()
                    });
                    if written.is_err() {
                        return;
                    }
                    let renamed = format!("data/r{id}");
                    durable
                        .lock()
                        .unwrap()
                        .insert(id, (vec![name.clone(), renamed.clone()], body));
                    if fs::rename(mnt.join(&name), mnt.join(&renamed)).is_err() {
                        return;
                    }
                }
            }));
        }
        // Directory renames back and forth.
        {
            let (mnt, stop, renames) = (m.mnt.clone(), stop.clone(), dir_renames.clone());
            workers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (from, to) = if mnt.join("dirs/a").exists() {
                        ("dirs/a", "dirs/b")
                    } else {
                        ("dirs/b", "dirs/a")
                    };
                    if fs::rename(mnt.join(from), mnt.join(to)).is_err() {
                        return;
                    }
                    renames.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut rewrapping = rewrap(&m, &keys[(round % 2) as usize]);
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        m.crash();
        let _ = rewrapping.kill();
        let _ = rewrapping.wait();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        journals.push((journal, acked.load(Ordering::SeqCst)));

        m.start();
        for (journal, acked) in &journals {
            let data = match fs::read(m.p(journal)) {
                Ok(data) => data,
                // Killed before the journal was created.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && *acked < 0 => continue,
                Err(e) => panic!("{context}: {journal} does not read: {e}"),
            };
            let want: String = (0..=*acked).map(record).collect();
            assert!(
                data.len() >= want.len() && &data[..want.len()] == want.as_bytes(),
                "{context}: {journal} lost fsynced records ({} bytes, {} fsynced)",
                data.len(),
                want.len()
            );
        }
        for (id, (names, body)) in durable.lock().unwrap().iter() {
            let found: Vec<_> = names
                .iter()
                .filter_map(|n| fs::read(m.p(n)).ok().map(|d| (n, d)))
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{context}: file {id} at {found:?} of {names:?}"
            );
            assert!(found[0].1 == *body, "{context}: file {id} differs");
        }
        let dir = if m.p("dirs/a").exists() {
            "dirs/a"
        } else {
            "dirs/b"
        };
        for k in 0..40 {
            let got = fs::read(m.p(&format!("{dir}/file{k:02}")))
                .unwrap_or_else(|e| panic!("{context}: {dir}/file{k:02}: {e}"));
            assert!(
                got == pattern(500 + 37 * k, k as u8),
                "{context}: {dir}/file{k:02}"
            );
        }
        m.stop();
        let out = kmsfs()
            .arg("fsck")
            .arg(&m.backing)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{context}: fsck found problems:\n{}{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
        m.start();
    }
    // The rounds did real work: files became durable, the directory moved, journals grew.
    assert!(
        durable.lock().unwrap().len() as u64 > rounds,
        "too few files written"
    );
    assert!(
        dir_renames.load(Ordering::Relaxed) > 0,
        "the directory never moved"
    );
    assert!(
        journals.iter().any(|(_, acked)| *acked > 10),
        "the journals never grew"
    );
}
