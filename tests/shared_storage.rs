//! Several mounts of one backing store, as hosts sharing a network filesystem would have:
//! what one mount does must never leave a file another cannot authenticate, nor lose what
//! was fsynced. Each test mounts the store two or three times (`--cache-timeout 0`, so each
//! mount sees the others' changes at once); with `KMSFS_TEST_SHARED_ROOTS` (scripts/test.sh
//! sets up GlusterFS, scripts/gluster.sh) each mount reaches the store through its own
//! GlusterFS client, so the same tests run on a real distributed filesystem.
// Tests play the operator: they look at the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mount::{fuse_available, kmsfs, Mount, Shared};
use common::pattern;

const NO_CACHE: &[&str] = &["--cache-timeout", "0"];

/// `kmsfs fsck --deep` of the store: every file authenticates, nothing stale.
fn assert_fsck_clean(m: &Mount) {
    let out = kmsfs()
        .arg("fsck")
        .arg(&m.backing)
        .arg("--deep")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck --deep: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn open_handles_keep_working_across_another_mounts_rename_and_unlink() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("f"), pattern(10_000, 1)).unwrap();
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s[0].p("f"))
        .unwrap();
    // Another mount renames it: the handle reads, writes and syncs as before.
    fs::rename(s[1].p("f"), s[1].p("g")).unwrap();
    assert_eq!(errno(fs::metadata(s[0].p("f"))), Some(libc::ENOENT));
    let mut buf = vec![0u8; 10_000];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(10_000, 1));
    held.write_all_at(b"written after the rename", 20_000)
        .unwrap();
    held.sync_all().unwrap();
    assert_eq!(held.metadata().unwrap().len(), 20_024);
    let seen = fs::read(s[1].p("g")).unwrap();
    assert_eq!(seen.len(), 20_024);
    assert_eq!(&seen[20_000..], b"written after the rename");
    assert_eq!(&seen[..10_000], &pattern(10_000, 1)[..]);
    // Opened again here under its new name, with the old handle still open.
    let again = fs::read(s[0].p("g")).unwrap();
    assert_eq!(again, seen);
    // Another mount unlinks it: the handle still reads and writes the file it holds.
    fs::remove_file(s[1].p("g")).unwrap();
    assert_eq!(errno(fs::metadata(s[0].p("g"))), Some(libc::ENOENT));
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(10_000, 1));
    held.write_all_at(b"and after the unlink", 0).unwrap();
    held.sync_all().unwrap();
    let mut head = [0u8; 20];
    held.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"and after the unlink");
    drop(held);
    assert_fsck_clean(&s[0]);
}

/// Appends from every mount at once, and the case: disjoint blocks of one file, some
/// past its end, written from two mounts at once. Each extend moves the final-block flag; it
/// must end on exactly one block, with every acknowledged byte in place.
#[test]
fn appends_and_extends_from_several_mounts_keep_every_byte_and_one_final_block() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(3, 4096, NO_CACHE);
    fs::write(s[0].p("log"), b"").unwrap();
    let record = |mount: usize, i: usize| format!("<{mount}:{i:04}:{}>\n", "x".repeat(37 + i % 50));
    std::thread::scope(|scope| {
        for (n, m) in s.mounts.iter().enumerate() {
            let path = m.p("log");
            scope.spawn(move || {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                for i in 0..300 {
                    f.write_all(record(n, i).as_bytes()).unwrap();
                    if i % 50 == 49 {
                        f.sync_all().unwrap();
                    }
                }
                f.sync_all().unwrap();
            });
        }
    });
    for m in &s.mounts {
        let log = String::from_utf8(fs::read(m.p("log")).unwrap()).unwrap();
        let mut got: Vec<&str> = log.split_inclusive('\n').collect();
        got.sort();
        let mut want: Vec<String> = (0..3)
            .flat_map(|n| (0..300).map(move |i| record(n, i)))
            .collect();
        want.sort();
        assert!(
            got == want,
            "every append, once, through {}: {} records, {} expected; {:?}",
            m.mnt.display(),
            got.len(),
            want.len(),
            got.iter()
                .filter(|r| !want.iter().any(|w| w == *r))
                .take(3)
                .collect::<Vec<_>>()
        );
    }

    // A pre-sized 1 MiB file; mount 0 writes the even 4 KiB blocks of 1.5 MiB, mount 1 the
    // odd ones (so each extends past the other's end), each fsyncing as it goes.
    let block = |i: usize| pattern(4096, (i % 251) as u8);
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(s[0].p("big"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::thread::scope(|scope| {
        for (n, m) in s.mounts[..2].iter().enumerate() {
            let path = m.p("big");
            scope.spawn(move || {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                for i in (n..384).step_by(2) {
                    f.write_all_at(&block(i), (i * 4096) as u64).unwrap();
                    if i % 16 < 2 {
                        f.sync_data().unwrap();
                    }
                }
                f.sync_all().unwrap();
            });
        }
    });
    let got = fs::read(s[2].p("big")).unwrap();
    assert_eq!(got.len(), 384 * 4096);
    for i in 0..384 {
        assert!(got[i * 4096..(i + 1) * 4096] == block(i)[..], "block {i}");
    }
    assert_fsck_clean(&s[0]);
}

#[test]
fn creates_links_and_renames_from_three_mounts_in_one_directory() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(3, 4096, NO_CACHE);
    fs::create_dir(s[0].p("d")).unwrap();
    fs::write(s[0].p("d/shared"), b"one file, many names").unwrap();
    std::thread::scope(|scope| {
        for (n, m) in s.mounts.iter().enumerate() {
            scope.spawn(move || {
                for i in 0..40 {
                    let name = m.p(&format!("d/m{n}-{i}"));
                    fs::write(&name, pattern(100 + i, n as u8)).unwrap();
                    if i % 4 == 0 {
                        // Renamed back and forth, and linked (a cap of names per file may
                        // refuse a link: never anything else).
                        let other = m.p(&format!("d/m{n}-{i}.moved"));
                        fs::rename(&name, &other).unwrap();
                        fs::rename(&other, &name).unwrap();
                        let link = m.p(&format!("d/link{n}"));
                        let _ = fs::remove_file(&link);
                        match fs::hard_link(m.p("d/shared"), &link) {
                            Ok(()) => {}
                            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EMLINK), "{e}"),
                        }
                    }
                }
            });
        }
    });
    for m in &s.mounts {
        for n in 0..3 {
            for i in 0..40 {
                let got = fs::read(m.p(&format!("d/m{n}-{i}"))).unwrap();
                assert_eq!(got, pattern(100 + i, n as u8), "m{n}-{i}");
            }
        }
        assert_eq!(fs::read(m.p("d/shared")).unwrap(), b"one file, many names");
        let listed = fs::read_dir(m.p("d")).unwrap().count();
        assert!((121..=124).contains(&listed), "{listed} entries");
    }
    assert_fsck_clean(&s[0]);
}

#[test]
fn a_directory_renamed_under_a_writer_on_another_mount_keeps_its_data() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::create_dir(s[0].p("a")).unwrap();
    for i in 0..20 {
        fs::write(s[0].p(&format!("a/f{i}")), pattern(5000, i as u8)).unwrap();
    }
    // Mount 1 holds every file open and writes to each; mount 0 renames their directory
    // back and forth meanwhile (each rename rebinds every file beneath it).
    let held: Vec<fs::File> = (0..20)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(s[1].p(&format!("a/f{i}")))
                .unwrap()
        })
        .collect();
    std::thread::scope(|scope| {
        let m0 = &s[0];
        scope.spawn(move || {
            for round in 0..10 {
                let (from, to) = if round % 2 == 0 {
                    ("a", "b")
                } else {
                    ("b", "a")
                };
                fs::rename(m0.p(from), m0.p(to)).unwrap();
            }
        });
        for round in 0..5u64 {
            for (i, f) in held.iter().enumerate() {
                f.write_all_at(&pattern(3000, (i as u64 + round) as u8), round * 1000)
                    .unwrap();
            }
        }
        for f in &held {
            f.sync_all().unwrap();
        }
    });
    drop(held);
    for i in 0..20usize {
        let mut want = pattern(5000, i as u8);
        for round in 0..5usize {
            let data = pattern(3000, (i + round) as u8);
            let end = round * 1000 + 3000;
            if want.len() < end {
                want.resize(end, 0);
            }
            want[round * 1000..end].copy_from_slice(&data);
        }
        for m in &s.mounts {
            assert_eq!(fs::read(m.p(&format!("a/f{i}"))).unwrap(), want, "f{i}");
        }
    }
    assert_fsck_clean(&s[0]);
}

#[test]
fn a_truncation_by_another_mount_never_leaves_a_file_that_fails() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("f"), pattern(50_000, 3)).unwrap();
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s[0].p("f"))
        .unwrap();
    // Cut shorter elsewhere: the handle sees the new length and writes past it.
    OpenOptions::new()
        .write(true)
        .open(s[1].p("f"))
        .unwrap()
        .set_len(10_000)
        .unwrap();
    let mut buf = vec![0u8; 50_000];
    let n = held.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, 10_000);
    assert_eq!(&buf[..n], &pattern(10_000, 3)[..]);
    held.write_all_at(b"tail", 12_000).unwrap();
    held.sync_all().unwrap();
    let seen = fs::read(s[1].p("f")).unwrap();
    assert_eq!(seen.len(), 12_004);
    assert_eq!(&seen[12_000..], b"tail");
    // Truncated to zero elsewhere (a new file id and key): the handle reads and writes the
    // file as it is now, as a local file's handles do after a truncation.
    fs::write(s[1].p("f"), b"the other mount's new content").unwrap();
    held.write_all_at(b"THE", 0).unwrap();
    held.sync_all().unwrap();
    drop(held);
    assert_eq!(
        fs::read(s[1].p("f")).unwrap(),
        b"THE other mount's new content"
    );
    assert_fsck_clean(&s[0]);
}

/// Mount 0's key service made slow (1.5 s a call), then `name` created there with a write:
/// the handle, and whether the create returned before its key (the moving average learned the
/// service is slow from a first create).
fn create_late_on_a_slow_mount(s: &mut Shared, name: &str) -> (fs::File, bool) {
    s[0].stop();
    s[0].set_env("KMSFS_INJECT_KMS_LATENCY_MS", "1500");
    s[0].start();
    fs::write(s[0].p("warm"), b"w").unwrap();
    let started = Instant::now();
    let mut f = fs::File::create(s[0].p(name)).unwrap();
    f.write_all(b"written before the key came").unwrap();
    (f, started.elapsed() < Duration::from_millis(1000))
}

/// A create on a mount whose key service is slow returns before the file's key arrives (see
/// docs/SEMANTICS.md); until it has, the file is not there for another mount (ENOENT: nothing
/// authenticates it yet), and afterwards it is, with what was written.
#[test]
fn a_file_whose_key_has_not_arrived_shows_elsewhere_once_it_has() {
    if !fuse_available() {
        return;
    }
    let mut s = Shared::new(2, 4096, NO_CACHE);
    let (f, pending) = create_late_on_a_slow_mount(&mut s, "late");
    let meanwhile = fs::read(s[1].p("late"));
    drop(f);
    if pending {
        let e = meanwhile.expect_err("no content before the key arrives");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fs::read(s[1].p("late")) {
            Ok(data) if !data.is_empty() => {
                assert_eq!(data, b"written before the key came");
                break;
            }
            _ => assert!(Instant::now() < deadline, "the key never arrived"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pending,
        "the create waited for its key: nothing was pending"
    );
    assert_fsck_clean(&s[1]);
}

/// A mount starting while another is part way through a rename (its rebind record live)
/// must not tidy that rename's half-done names: every file opens at its new name after.
#[test]
fn a_mount_starting_beside_a_rename_in_progress_leaves_it_alone() {
    if !fuse_available() {
        return;
    }
    let mut s = Shared::new(1, 4096, NO_CACHE);
    fs::create_dir(s[0].p("a")).unwrap();
    for i in 0..12 {
        fs::write(s[0].p(&format!("a/f{i}")), pattern(100, i as u8)).unwrap();
    }
    s[0].stop();
    // The rename's key calls come before it records itself: it is held part way instead.
    s[0].set_env("KMSFS_INJECT_REBIND_PAUSE_MS", "4000");
    s[0].set_extra(&["--cache-timeout", "0"]);
    s[0].start();
    let pending = s[0].backing.join(".kmsfs/pending");
    let records = || fs::read_dir(&pending).map(|d| d.count()).unwrap_or(0);
    let mnt = s[0].mnt.clone();
    let renamer = std::thread::spawn(move || fs::rename(mnt.join("a"), mnt.join("b")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while records() == 0 {
        assert!(
            Instant::now() < deadline,
            "the rename never recorded itself"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The control: the rename is under way (its record is there) as the second mount starts.
    let second = s[0].another();
    // Its start waited for the rename (the volume's namespace lock), and tidied nothing of it.
    renamer.join().unwrap().unwrap();
    for m in [&s[0], &second] {
        for i in 0..12 {
            assert_eq!(
                fs::read(m.p(&format!("b/f{i}"))).unwrap(),
                pattern(100, i as u8)
            );
        }
    }
    drop(second);
    assert_eq!(records(), 0);
    assert_fsck_clean(&s[0]);
}

/// `kmsfs rewrap` and `kmsfs fsck --repair` while two mounts write and rename.
#[test]
fn rewrap_and_fsck_repair_beside_live_mounts_lose_nothing() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    for i in 0..60 {
        fs::write(s[0].p(&format!("f{i}")), pattern(200 + i, 0)).unwrap();
    }
    let new_key = s[0].dir.path().join("keys/new.key");
    let expected = std::thread::scope(|scope| {
        let workers: Vec<_> = s
            .mounts
            .iter()
            .enumerate()
            .map(|(n, m)| {
                scope.spawn(move || {
                    let mut expected = BTreeMap::new();
                    for round in 0..4 {
                        for i in (n..60).step_by(2) {
                            let (from, to) = (m.p(&format!("f{i}")), m.p(&format!("g{i}")));
                            let data = pattern(300 + i + round, round as u8 + 1);
                            fs::write(&from, &data).unwrap();
                            fs::rename(&from, &to).unwrap();
                            fs::rename(&to, &from).unwrap();
                            expected.insert(i, data);
                        }
                    }
                    expected
                })
            })
            .collect();
        for _ in 0..2 {
            let out = kmsfs()
                .arg("fsck")
                .arg(&s[0].backing)
                .arg("--repair")
                .output()
                .unwrap();
            // Problems may be reported (a rename in progress looks stale): what counts is
            // that nothing it repairs breaks a file.
            let report = String::from_utf8_lossy(&out.stdout);
            eprintln!("fsck --repair beside the mounts:\n{report}");
            assert!(
                out.status.code().is_some_and(|c| c != 2),
                "{report}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = kmsfs()
            .arg("rewrap")
            .arg(&s[0].backing)
            .arg("--to-key")
            .arg(format!("local:{}", new_key.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut expected = BTreeMap::new();
        for w in workers {
            expected.extend(w.join().unwrap());
        }
        expected
    });
    for m in &s.mounts {
        for i in 0..60 {
            assert_eq!(
                fs::read(m.p(&format!("f{i}"))).unwrap(),
                expected[&i],
                "f{i}"
            );
        }
    }
    assert_fsck_clean(&s[0]);
}

// The model: random operations through random mounts, checked against a plain directory.

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

const NAMES: [&str; 7] = ["a", "b", "c", "d/x", "d/y", "e/z", "e/w"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        name: &'static str,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Append {
        name: &'static str,
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
    RenameDir,
}

fn random_op(rng: &mut Rng) -> Op {
    let name = |rng: &mut Rng| NAMES[rng.next(NAMES.len() as u64) as usize];
    match rng.next(100) {
        0..=34 => Op::Write {
            name: name(rng),
            offset: rng.next(20_000),
            len: rng.next(6_000) as usize,
            seed: rng.next(256) as u8,
        },
        35..=49 => Op::Append {
            name: name(rng),
            len: rng.next(3_000) as usize,
            seed: rng.next(256) as u8,
        },
        50..=59 => Op::Truncate {
            name: name(rng),
            size: rng.next(22_000),
        },
        60..=74 => Op::Rename {
            from: name(rng),
            to: name(rng),
        },
        75..=81 => Op::Link {
            from: name(rng),
            to: name(rng),
        },
        82..=93 => Op::Unlink { name: name(rng) },
        _ => Op::RenameDir,
    }
}

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
        Op::Append { name, len, seed } => {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(p(name))
                .map_err(errno)?;
            f.write_all(&pattern(*len, *seed)).map_err(errno)
        }
        Op::Truncate { name, size } => OpenOptions::new()
            .write(true)
            .open(p(name))
            .and_then(|f| f.set_len(*size))
            .map_err(errno),
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map_err(errno),
        Op::Link { from, to } => fs::hard_link(p(from), p(to)).map_err(errno),
        Op::Unlink { name } => fs::remove_file(p(name)).map_err(errno),
        // e and d trade places (through a third name), with everything in them.
        Op::RenameDir => fs::rename(p("d"), p("t"))
            .and_then(|_| fs::rename(p("e"), p("d")))
            .and_then(|_| fs::rename(p("t"), p("e")))
            .map_err(errno),
    }
}

fn snapshot(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    NAMES
        .iter()
        .map(|n| (n.to_string(), fs::read(root.join(n)).ok()))
        .collect()
}

/// One round: a few operations, each through a random mount and on the reference, in turn;
/// then every mount appends to a log of its own and to one they share, all at once.
fn round(s: &Shared, plain: &Path, rng: &mut Rng, seed: u64, r: usize, history: &mut Vec<String>) {
    for _ in 0..12 {
        let op = random_op(rng);
        let through = rng.next(s.mounts.len() as u64) as usize;
        history.push(format!("{through}: {op:?}"));
        let got = apply(&s[through].mnt, &op);
        // The documented limit: a file has at most a few names.
        if let (Op::Link { .. }, Err(libc::EMLINK)) = (&op, &got) {
            continue;
        }
        let want = apply(plain, &op);
        let recent: Vec<_> = history.iter().rev().take(8).collect();
        assert_eq!(
            got, want,
            "seed {seed} round {r}: {op:?} through mount {through}; last {recent:?}"
        );
    }
    let lines = |n: usize, r: usize| -> Vec<String> {
        (0..20)
            .map(|i| format!("{n} {r} {i} {}\n", "y".repeat(i * 7)))
            .collect()
    };
    std::thread::scope(|scope| {
        for (n, m) in s.mounts.iter().enumerate() {
            scope.spawn(move || {
                let mut own = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(m.p(&format!("log{n}")))
                    .unwrap();
                let mut shared = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(m.p("shared-log"))
                    .unwrap();
                for line in lines(n, r) {
                    own.write_all(line.as_bytes()).unwrap();
                    shared.write_all(line.as_bytes()).unwrap();
                }
                shared.sync_all().unwrap();
            });
        }
    });
    for n in 0..s.mounts.len() {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(plain.join(format!("log{n}")))
            .unwrap();
        f.write_all(lines(n, r).concat().as_bytes()).unwrap();
    }
    // Every mount agrees with the reference, and the shared log holds every line once.
    let want = snapshot(plain);
    for (i, m) in s.mounts.iter().enumerate() {
        let got = snapshot(&m.mnt);
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
            panic!("seed {seed} round {r}: mount {i} differs (name, want len, got len): {diff:?}; history {:?}", &history[history.len().saturating_sub(12)..]);
        }
        for n in 0..s.mounts.len() {
            let mut got = String::new();
            fs::File::open(m.p(&format!("log{n}")))
                .unwrap()
                .read_to_string(&mut got)
                .unwrap();
            assert_eq!(
                got,
                fs::read_to_string(plain.join(format!("log{n}"))).unwrap()
            );
        }
        let log = fs::read_to_string(m.p("shared-log")).unwrap();
        let mut got: Vec<&str> = log.split_inclusive('\n').collect();
        got.sort();
        let mut all: Vec<String> = (0..=r)
            .flat_map(|r| (0..s.mounts.len()).flat_map(move |n| lines(n, r)))
            .collect();
        all.sort();
        assert_eq!(
            got, all,
            "seed {seed} round {r}: the shared log through mount {i}"
        );
    }
}

#[test]
fn random_operations_through_three_mounts_match_a_reference() {
    if !fuse_available() {
        return;
    }
    let rounds: usize = std::env::var("KMSFS_MODEL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let seed: u64 = std::env::var("KMSFS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("shared model seed {seed} ({rounds} rounds of 12 operations and 3 x 20 appends)");
    let s = Shared::new(3, 512, NO_CACHE);
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = plain_dir.path();
    for root in [s[0].mnt.as_path(), plain] {
        fs::create_dir(root.join("d")).unwrap();
        fs::create_dir(root.join("e")).unwrap();
    }
    let mut rng = Rng(seed | 1);
    let mut history = Vec::new();
    for r in 0..rounds {
        round(&s, plain, &mut rng, seed, r, &mut history);
    }
    assert_fsck_clean(&s[0]);
}

/// Header rewrites from two mounts at once: one chmods a file over and over while the other
/// renames it back and forth (each rename rewrites the header twice). Neither undoes the
/// other: the last mode set is the one in force, and the file opens at its last name.
#[test]
fn header_rewrites_from_two_mounts_never_undo_each_other() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("f"), pattern(5000, 4)).unwrap();
    let modes = [0o600, 0o640, 0o604, 0o644];
    std::thread::scope(|scope| {
        let m1 = &s[1];
        scope.spawn(move || {
            for _ in 0..40 {
                fs::rename(m1.p("f"), m1.p("g")).unwrap();
                fs::rename(m1.p("g"), m1.p("f")).unwrap();
            }
        });
        let m0 = &s[0];
        for i in 0..120 {
            let mode = modes[i % modes.len()];
            // The file is at f or g at any moment; a chmod by the name it just left fails
            // with ENOENT, and is tried at the other.
            let done = ["f", "g", "f", "g"]
                .iter()
                .any(|n| fs::set_permissions(m0.p(n), fs::Permissions::from_mode(mode)).is_ok());
            assert!(done, "chmod {i} found the file at neither name");
        }
    });
    // The last chmod wins, on both mounts, and the content is intact.
    for m in &s.mounts {
        let meta = fs::metadata(m.p("f")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, modes[119 % modes.len()]);
        assert_eq!(fs::read(m.p("f")).unwrap(), pattern(5000, 4));
    }
    assert_fsck_clean(&s[0]);
}

// Found by the red team (each failed before its fix).

/// A mode changed on one mount shows on another that holds the file open (the kernel checks
/// permissions against what `stat` reports there): revoking access works everywhere.
#[test]
fn a_chmod_shows_on_a_mount_holding_the_file_open() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("f"), b"secret").unwrap();
    fs::set_permissions(s[0].p("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let held = fs::File::open(s[1].p("f")).unwrap();
    assert_eq!(
        fs::metadata(s[1].p("f")).unwrap().permissions().mode() & 0o777,
        0o644
    );
    fs::set_permissions(s[0].p("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(s[1].p("f")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(held.metadata().unwrap().permissions().mode() & 0o777, 0o600);
}

/// Truncations to zero (renewals) of files held open on one mount while another renames
/// their directory: every file ends up at its new name with what was fsynced after the
/// truncation.
#[test]
fn renewals_on_one_mount_during_a_directory_rename_on_another_keep_every_file() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::create_dir(s[0].p("p")).unwrap();
    for i in 0..60 {
        fs::write(s[0].p(&format!("p/f{i}")), pattern(2000, i as u8)).unwrap();
    }
    let held: Vec<fs::File> = (0..60)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(s[0].p(&format!("p/f{i}")))
                .unwrap()
        })
        .collect();
    std::thread::scope(|scope| {
        let m1 = &s[1];
        scope.spawn(move || fs::rename(m1.p("p"), m1.p("q")).unwrap());
        for (i, f) in held.iter().enumerate() {
            f.set_len(0).unwrap();
            f.write_all_at(format!("after the truncation {i}").as_bytes(), 0)
                .unwrap();
            f.sync_all().unwrap();
        }
    });
    drop(held);
    for m in &s.mounts {
        for i in 0..60 {
            assert_eq!(
                fs::read(m.p(&format!("q/f{i}"))).unwrap(),
                format!("after the truncation {i}").as_bytes(),
                "q/f{i}"
            );
        }
    }
    assert_fsck_clean(&s[0]);
}

/// Files created in a directory on one mount while another mount renames that directory
/// (and back): each create either fails or lands where it can be read, never unreadable.
#[test]
fn creates_in_a_directory_another_mount_is_renaming_stay_readable() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::create_dir(s[0].p("d")).unwrap();
    for i in 0..100 {
        fs::write(s[0].p(&format!("d/old{i}")), b"old").unwrap();
    }
    let made = std::thread::scope(|scope| {
        let m1 = &s[1];
        scope.spawn(move || {
            for round in 0..10 {
                let (from, to) = if round % 2 == 0 {
                    ("d", "e")
                } else {
                    ("e", "d")
                };
                fs::rename(m1.p(from), m1.p(to)).unwrap();
            }
        });
        let mut made = Vec::new();
        for k in 0..200 {
            for dir in ["d", "e"] {
                let name = format!("{dir}/new{k}");
                if let Ok(mut f) = fs::File::create(s[0].p(&name)) {
                    if f.write_all(name.as_bytes())
                        .and_then(|_| f.sync_all())
                        .is_ok()
                    {
                        made.push(k);
                    }
                    break;
                }
            }
        }
        made
    });
    assert!(!made.is_empty());
    for k in made {
        let (d, e) = (s[0].p(&format!("d/new{k}")), s[0].p(&format!("e/new{k}")));
        let got = fs::read(&d).or_else(|_| fs::read(&e)).unwrap();
        assert!(got.ends_with(format!("new{k}").as_bytes()), "new{k}");
    }
    assert_fsck_clean(&s[0]);
}

/// Renames among the same names on two mounts at once, and unlink-and-create of those names:
/// no file is left bound to another name than it has.
#[test]
fn racing_renames_and_recreates_on_two_mounts_leave_every_file_readable() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    for n in ["a", "b", "x"] {
        fs::write(s[0].p(n), n.as_bytes()).unwrap();
    }
    std::thread::scope(|scope| {
        let (m0, m1) = (&s[0], &s[1]);
        scope.spawn(move || {
            for _ in 0..150 {
                let _ = fs::rename(m0.p("a"), m0.p("b"));
                let _ = fs::rename(m0.p("b"), m0.p("a"));
            }
        });
        scope.spawn(move || {
            for i in 0..150 {
                let _ = fs::rename(m1.p("x"), m1.p(if i % 2 == 0 { "a" } else { "b" }));
                let _ = fs::remove_file(m1.p("b"));
                let _ = fs::write(m1.p("x"), b"x again");
            }
        });
    });
    for m in &s.mounts {
        for n in ["a", "b", "x"] {
            match fs::read(m.p(n)) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{n}: {e}"),
            }
        }
    }
    assert_fsck_clean(&s[0]);
}

/// A handle on one mount keeps working for chmod, truncate and stat after another mount
/// renamed its file, and after another mount renewed it a new open works at once.
#[test]
fn a_held_handle_changes_its_file_after_another_mount_renamed_it() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("a"), pattern(9000, 2)).unwrap();
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s[0].p("a"))
        .unwrap();
    fs::rename(s[1].p("a"), s[1].p("b")).unwrap();
    held.set_len(5).unwrap();
    held.set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    fs::set_permissions(s[0].p("b"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::read(s[1].p("b")).unwrap(), &pattern(9000, 2)[..5]);
    assert_eq!(
        fs::metadata(s[1].p("b")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Renewed by the other mount: this mount's new opens and changes use the new file.
    fs::write(s[1].p("b"), b"renewed").unwrap();
    fs::set_permissions(s[0].p("b"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(fs::read(s[0].p("b")).unwrap(), b"renewed");
    OpenOptions::new()
        .write(true)
        .open(s[0].p("b"))
        .unwrap()
        .set_len(3)
        .unwrap();
    assert_eq!(fs::read(s[1].p("b")).unwrap(), b"ren");
    drop(held);
    assert_fsck_clean(&s[0]);
}

/// Readers on one mount while another truncates and rewrites a file over and over: each read
/// sees some whole version, or an empty file; never an error. fsck beside them finds nothing.
#[test]
fn readers_during_another_mounts_truncations_see_whole_versions() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    fs::write(s[0].p("f"), b"version 0000").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (m0, stop) = (&s[0], &stop);
        scope.spawn(move || {
            for i in 1..300 {
                fs::write(m0.p("f"), format!("version {i:04}")).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut reads = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let got = fs::read(s[1].p("f")).unwrap();
            assert!(
                got.is_empty() || (got.len() == 12 && got.starts_with(b"version ")),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            reads += 1;
        }
        assert!(reads > 10, "{reads} reads");
    });
    assert_fsck_clean(&s[0]);
}

/// A mount that is the only one runs without locks; another mount coming while it writes
/// makes it finish what is under way and lock from then on, and the two then append to one
/// file with nothing lost (the log lines are the control: the first did run alone).
#[test]
fn the_only_mount_runs_unlocked_until_another_comes() {
    if !fuse_available() {
        return;
    }
    let mut first = Mount::new(4096, &["--cache-timeout", "0"]);
    first.set_env("RUST_LOG", "kmsfs=info");
    first.remount();
    assert!(
        first.log().contains("the only mount of this store"),
        "{}",
        first.log()
    );
    let record = |m: usize, i: usize| format!("{m}:{i:05}\n");
    fs::write(first.p("log"), b"").unwrap();
    let second = std::thread::scope(|scope| {
        let path = first.p("log");
        let writer = scope.spawn(move || {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            for i in 0..3000 {
                f.write_all(record(0, i).as_bytes()).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let second = first.another();
        let mut f = OpenOptions::new()
            .append(true)
            .open(second.p("log"))
            .unwrap();
        for i in 0..1000 {
            f.write_all(record(1, i).as_bytes()).unwrap();
        }
        writer.join().unwrap();
        second
    });
    assert!(
        first.log().contains("another process uses this store now"),
        "{}",
        first.log()
    );
    let log = String::from_utf8(fs::read(second.p("log")).unwrap()).unwrap();
    let mut got: Vec<&str> = log.split_inclusive('\n').collect();
    got.sort();
    let mut want: Vec<String> = (0..3000).map(|i| record(0, i)).collect();
    want.extend((0..1000).map(|i| record(1, i)));
    want.sort();
    assert!(
        got == want,
        "{} records, {} expected",
        got.len(),
        want.len()
    );
    drop(second);
    assert_fsck_clean(&first);
}

/// `open(O_CREAT)` without `O_EXCL` of a name another mount is creating (its key not there
/// yet) opens that file once it is; with `O_EXCL` it exists. An empty backing file a stopped
/// mount left (nothing authenticates it, nothing was in it) does not keep the name taken.
#[test]
fn a_create_of_a_name_being_created_elsewhere_or_left_unfinished_succeeds() {
    if !fuse_available() {
        return;
    }
    let mut s = Shared::new(2, 4096, NO_CACHE);
    let (f, pending) = create_late_on_a_slow_mount(&mut s, "late");
    let mut opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(s[1].p("late"))
        .expect("O_CREAT of a name being created elsewhere opens it");
    let mut seen = Vec::new();
    opened.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, b"written before the key came");
    let excl = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(s[1].p("late"));
    assert_eq!(errno(excl), Some(libc::EEXIST));
    drop(f);
    assert!(
        pending,
        "the create waited for its key: nothing was pending"
    );

    // A create a crash cut short: an empty backing file, no header.
    for (name, excl) in [("left", false), ("left-excl", true)] {
        fs::File::create(s[0].b(name)).unwrap();
        assert_eq!(errno(fs::metadata(s[1].p(name))), Some(libc::ENOENT));
        let mut made = OpenOptions::new()
            .write(true)
            .create(true)
            .create_new(excl)
            .truncate(false)
            .open(s[1].p(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        made.write_all(b"made anew").unwrap();
        // On a loaded machine even the local provider can be slow enough for this create to
        // return before its key (docs/SEMANTICS.md): until then the other mount shows no
        // file. fsync waits for the key and the data.
        made.sync_all().unwrap();
        drop(made);
        assert_eq!(fs::read(s[0].p(name)).unwrap(), b"made anew");
    }
    assert_fsck_clean(&s[1]);
}

/// A directory renamed on one mount while another mount is creating a file in it, that
/// file's key not there yet: the rename waits for it (until then its header would bind the
/// old path) and moves it with the rest, other changes of names going on meanwhile. An empty
/// file a crash left in it (no header, no envelope to move) moves as it is: it used to fail
/// the rename with EIO.
#[test]
fn a_directory_rename_waits_for_a_create_under_way_in_it_and_moves_what_a_crash_left() {
    if !fuse_available() {
        return;
    }
    let mut s = Shared::new(2, 4096, NO_CACHE);
    fs::create_dir(s[0].p("d")).unwrap();
    fs::write(s[0].p("d/before"), b"before").unwrap();
    fs::File::create(s[0].b("d/left")).unwrap();
    let (f, pending) = create_late_on_a_slow_mount(&mut s, "d/late");
    // While it waits, other changes of names go on: it does not hold the volume's lock.
    let (renamed, meanwhile) = std::thread::scope(|scope| {
        let rename = scope.spawn(|| fs::rename(s[1].p("d"), s[1].p("e")));
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        // (On the other mount: this one's kernel holds the directory the rename is in, and
        // a lookup there waits for it.)
        fs::write(s[0].p("meanwhile"), b"m").unwrap();
        let took = started.elapsed();
        assert!(
            !rename.is_finished(),
            "the rename did not wait (the key came within {:?})",
            started.elapsed()
        );
        (rename.join().unwrap(), took)
    });
    renamed.expect("the rename waits for the create under way");
    assert!(
        meanwhile < Duration::from_millis(500),
        "a create on the other mount waited {meanwhile:?} for the rename"
    );
    drop(f);
    for m in [&s[1], &s[0]] {
        assert_eq!(
            fs::read(m.p("e/late")).unwrap(),
            b"written before the key came"
        );
        assert_eq!(fs::read(m.p("e/before")).unwrap(), b"before");
        assert_eq!(errno(fs::metadata(m.p("e/left"))), Some(libc::ENOENT));
        assert_eq!(errno(fs::metadata(m.p("d"))), Some(libc::ENOENT));
    }
    assert!(
        pending,
        "the create waited for its key: nothing was pending"
    );
}

/// `ftruncate(fd, 0)` renews the file (a new key); on a file whose names are all gone
/// (unlinked, or replaced by a rename, here or on another mount) it still does, and the
/// handle goes on writing.
#[test]
fn truncating_an_open_file_whose_names_are_gone_renews_it() {
    if !fuse_available() {
        return;
    }
    let s = Shared::new(2, 4096, NO_CACHE);
    type Gone = fn(&Shared, &str);
    let cases: [(&str, Gone); 4] = [
        ("unlinked-here", |s, n| fs::remove_file(s[0].p(n)).unwrap()),
        ("unlinked-there", |s, n| fs::remove_file(s[1].p(n)).unwrap()),
        ("replaced-here", |s, n| {
            fs::write(s[0].p("other"), b"other").unwrap();
            fs::rename(s[0].p("other"), s[0].p(n)).unwrap();
        }),
        ("replaced-there", |s, n| {
            fs::write(s[1].p("other"), b"other").unwrap();
            fs::rename(s[1].p("other"), s[1].p(n)).unwrap();
        }),
    ];
    for (name, gone) in cases {
        fs::write(s[0].p(name), pattern(9000, 4)).unwrap();
        let held = OpenOptions::new()
            .read(true)
            .write(true)
            .open(s[0].p(name))
            .unwrap();
        gone(&s, name);
        held.set_len(0)
            .unwrap_or_else(|e| panic!("{name}: ftruncate to 0: {e}"));
        held.write_all_at(b"after", 0).unwrap();
        held.sync_all().unwrap();
        let mut back = [0u8; 5];
        held.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"after", "{name}");
        assert_eq!(held.metadata().unwrap().len(), 5, "{name}");
    }
    assert_fsck_clean(&s[0]);
}
