//! Model-based random test: the same random sequence of operations (write at random offsets,
//! read, truncate, rename, link, unlink, fsync, remount) on a kmsfs mount and on a plain
//! directory, compared byte for byte after every step. The seed is printed on failure; set
//! KMSFS_MODEL_SEED to replay one, KMSFS_MODEL_STEPS for longer runs.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::mount::{fuse_available, Mount};
use common::pattern;

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Short names, and long ones (stored under a hashed name and a side record when encrypted).
const NAMES: [&str; 8] = [
    "a",
    "b",
    "c",
    "d/x",
    "d/y",
    "e/z",
    "LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL",
    "d/MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM",
];

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let p = |n: &str| root.join(n);
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    match op {
        Op::Write {
            name,
            offset,
            len,
            seed,
        } => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(name))
                .map_err(errno)?;
            f.write_all_at(&pattern(*len, *seed), *offset)
                .map_err(errno)
        }
        Op::Truncate { name, size } => {
            let f = OpenOptions::new()
                .write(true)
                .open(p(name))
                .map_err(errno)?;
            f.set_len(*size).map_err(errno)
        }
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map_err(errno),
        Op::Link { from, to } => fs::hard_link(p(from), p(to)).map_err(errno),
        Op::Unlink { name } => fs::remove_file(p(name)).map_err(errno),
        Op::Fsync { name } => {
            let f = OpenOptions::new()
                .write(true)
                .open(p(name))
                .map_err(errno)?;
            f.sync_all().map_err(errno)
        }
        Op::Remount => Ok(()),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        name: &'static str,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        name: &'static str,
        size: u64,
    },
    Rename {
        from: &'static str,
        to: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Unlink {
        name: &'static str,
    },
    Fsync {
        name: &'static str,
    },
    Remount,
}

fn random_op(rng: &mut Rng) -> Op {
    let name = |rng: &mut Rng| NAMES[rng.next(NAMES.len() as u64) as usize];
    match rng.next(100) {
        0..=44 => Op::Write {
            name: name(rng),
            offset: rng.next(12_000),
            len: rng.next(5_000) as usize,
            seed: rng.next(256) as u8,
        },
        45..=54 => Op::Truncate {
            name: name(rng),
            size: rng.next(14_000),
        },
        55..=69 => Op::Rename {
            from: name(rng),
            to: name(rng),
        },
        70..=76 => Op::Link {
            from: name(rng),
            to: name(rng),
        },
        77..=86 => Op::Unlink { name: name(rng) },
        87..=96 => Op::Fsync { name: name(rng) },
        _ => Op::Remount,
    }
}

fn snapshot(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    NAMES
        .iter()
        .map(|n| (n.to_string(), fs::read(root.join(n)).ok()))
        .collect()
}

fn run(seed: u64, steps: usize) {
    let mut m = Mount::new(512, &[]);
    let plain_dir = tempfile::tempdir().unwrap();
    let plain: PathBuf = plain_dir.path().to_path_buf();
    for root in [&m.mnt, &plain] {
        fs::create_dir_all(root.join("d")).unwrap();
        fs::create_dir_all(root.join("e")).unwrap();
    }
    let mut rng = Rng(seed | 1);
    let mut history = Vec::new();
    for step in 0..steps {
        let op = random_op(&mut rng);
        history.push(op.clone());
        if let Op::Remount = op {
            m.remount();
        }
        let got = apply(&m.mnt, &op);
        // The one permitted difference: kmsfs caps the names of a file (docs/SEMANTICS.md).
        if let (Op::Link { from, .. }, Err(libc::EMLINK)) = (&op, &got) {
            let names =
                std::os::unix::fs::MetadataExt::nlink(&fs::metadata(plain.join(from)).unwrap());
            assert!(
                names as usize >= kmsfs::core::fs::MAX_LINKS,
                "seed {seed} step {step}: EMLINK at {names} names"
            );
            continue;
        }
        let want = apply(&plain, &op);
        let recent: Vec<_> = history.iter().rev().take(8).collect();
        assert_eq!(
            got, want,
            "seed {seed} step {step}: {op:?} gave a different result; last ops {recent:?}"
        );
        let (want, got) = (snapshot(&plain), snapshot(&m.mnt));
        if got != want {
            let diff: Vec<_> = want
                .iter()
                .zip(&got)
                .filter(|(w, g)| w != g)
                .map(|(w, g)| {
                    (
                        w.0.clone(),
                        w.1.as_ref().map(Vec::len),
                        g.1.as_ref().map(Vec::len),
                    )
                })
                .collect();
            panic!("seed {seed} step {step}: after {op:?} contents differ (name, plain len, kmsfs len): {diff:?}; last ops {recent:?}");
        }
    }
}

#[test]
fn random_operations_match_a_plain_directory() {
    if !fuse_available() {
        return;
    }
    let steps: usize = std::env::var("KMSFS_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let seeds: Vec<u64> = match std::env::var("KMSFS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            vec![1, 2, now]
        }
    };
    for seed in seeds {
        eprintln!("model test seed {seed} ({steps} steps)");
        run(seed, steps);
    }
}
