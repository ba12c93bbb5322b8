//! Key prefetch (core, no mount): opening one file cold fetches the keys of the files after it
//! in walk order (its directory, then the next ones) in parallel, so reading a whole directory
//! or tree waits for about one key-service round trip, not one per file or per directory; it
//! is bounded, and off when set to 0.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, TestVolume};
use kmsfs::core::fs::{KmsFs, ROOT_INO};
use kmsfs::keys::fault::{Faults, FaultyProvider};
use kmsfs::keys::KmsOp;

/// Long enough that round trips, not the machine, decide the times: on a slow disk the walk
/// below took 0.65-1 s at 30 ms a call and as long at 100 ms.
const LATENCY: Duration = Duration::from_millis(100);

/// A fresh core (cold key cache) whose key service answers after `LATENCY`.
fn slow_core(v: &TestVolume, prefetch: usize) -> (KmsFs, Arc<FaultyProvider>) {
    let faults = Faults {
        latency: LATENCY,
        ..Default::default()
    };
    let (volume, provider) = v.open_faulty(3, faults);
    let mut core = KmsFs::new(volume, true).unwrap();
    core.set_key_prefetch(prefetch);
    (core, provider)
}

fn volume(files: usize) -> TestVolume {
    let v = TestVolume::new(4096);
    v.mkdir("dir");
    for i in 0..files {
        v.write(&format!("dir/f{i:03}"), &pattern(100 + i, i as u8));
    }
    v
}

/// Opens and closes `dir/name` without reading it.
fn open_close(core: &KmsFs, name: &str) {
    let dir = core.lookup(ROOT_INO, OsStr::new("dir")).unwrap().ino;
    let ino = core.lookup(dir, OsStr::new(name)).unwrap().ino;
    core.release(core.open(ino, libc::O_RDONLY).unwrap());
}

/// Opens and reads every file of `dir` in name order; returns the time it took.
fn read_all(core: &KmsFs, files: usize) -> Duration {
    let dir = core.lookup(ROOT_INO, OsStr::new("dir")).unwrap().ino;
    let t0 = Instant::now();
    for i in 0..files {
        let ino = core
            .lookup(dir, OsStr::new(&format!("f{i:03}")))
            .unwrap()
            .ino;
        let fh = core.open(ino, libc::O_RDONLY).unwrap();
        assert_eq!(core.read(fh, 0, 4096).unwrap(), pattern(100 + i, i as u8));
        core.release(fh);
    }
    t0.elapsed()
}

#[test]
fn reading_a_directory_waits_for_about_one_round_trip() {
    let files = 60;
    let v = volume(files);
    let (core, provider) = slow_core(&v, 256);
    let took = read_all(&core, files);
    // Without prefetch: 60 sequential Decrypts of 30 ms = 1.8 s.
    assert!(
        took < LATENCY * (files as u32) / 3,
        "read {files} files in {took:?}"
    );
    // Every key fetched once (the volume key, the first file, its 59 neighbours).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(provider.calls(KmsOp::Decrypt), 1 + files as u64);
}

#[test]
fn prefetch_is_bounded_and_can_be_turned_off() {
    let files = 40;
    let v = volume(files);
    let (core, provider) = slow_core(&v, 10);
    open_close(&core, "f000");
    std::thread::sleep(LATENCY * 6);
    assert_eq!(
        provider.calls(KmsOp::Decrypt),
        1 + 1 + 10,
        "volume key, f000, 10 more"
    );

    let (core, provider) = slow_core(&v, 0);
    let took = read_all(&core, files);
    assert!(
        took >= LATENCY * files as u32,
        "sequential without prefetch: {took:?}"
    );
    assert_eq!(provider.calls(KmsOp::Decrypt), 1 + files as u64);
}

/// Reads every file beneath `ino` depth-first in listing order (as `find -exec cat` does);
/// returns how many.
fn walk_and_read(core: &KmsFs, ino: u64) -> usize {
    let mut read = 0;
    for e in core.readdir(ino).unwrap() {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let child = core.lookup(ino, &e.name).unwrap().ino;
        match e.kind {
            kmsfs::core::fs::Kind::Dir => read += walk_and_read(core, child),
            _ => {
                let fh = core.open(child, libc::O_RDONLY).unwrap();
                assert!(!core.read(fh, 0, 4096).unwrap().is_empty());
                core.release(fh);
                read += 1;
            }
        }
    }
    read
}

/// A walk through many directories finds its keys fetched ahead across directories too: it
/// waits for about one round trip in all, not one (or more) per directory, and no key is
/// fetched twice.
#[test]
fn a_walk_through_many_directories_waits_for_about_one_round_trip() {
    let (dirs, per_dir) = (10, 30);
    let v = TestVolume::new(4096);
    for d in 0..dirs {
        v.mkdir(&format!("d{d}"));
        for i in 0..per_dir {
            v.write(&format!("d{d}/f{i:03}"), &pattern(100 + i, i as u8));
        }
    }
    let (core, provider) = slow_core(&v, 256);
    let t0 = Instant::now();
    assert_eq!(walk_and_read(&core, ROOT_INO), dirs * per_dir);
    let took = t0.elapsed();
    println!(
        "read {} files in {dirs} directories in {took:?}",
        dirs * per_dir
    );
    // One directory at a time (the first file cold, then its neighbours): ten round trips or
    // more. Ahead across directories: the first, then 300 keys at 32 at a time (10 rounds).
    assert!(
        took < LATENCY * (dirs as u32) * 2,
        "read {} files in {dirs} directories in {took:?}",
        dirs * per_dir
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        provider.calls(KmsOp::Decrypt),
        1 + (dirs * per_dir) as u64,
        "the volume key and every file's once"
    );
}

/// A walk goes on only as files it fetched are opened: opening one file again and again (a
/// local user of the mount trying to make it `Decrypt` the whole volume) lets it fetch nothing
/// more; opening the fetched files does.
#[test]
fn only_opening_the_fetched_files_lets_a_walk_go_on() {
    let files = 40;
    let v = volume(files);
    let (core, provider) = slow_core(&v, 10);
    let dir = core.lookup(ROOT_INO, OsStr::new("dir")).unwrap().ino;
    let open_close = |name: &str| open_close(&core, name);
    open_close("f000");
    std::thread::sleep(LATENCY * 6);
    for _ in 0..30 {
        open_close("f000");
    }
    std::thread::sleep(LATENCY * 6);
    assert_eq!(
        provider.calls(KmsOp::Decrypt),
        1 + 1 + 10,
        "volume key, f000, 10 ahead, nothing more"
    );
    // The control: opening what was fetched (from the key cache: no call of its own) lets it
    // fetch as many more.
    let listed: Vec<String> = core
        .readdir(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name.into_string().unwrap())
        .filter(|n| n.starts_with('f') && n != "f000")
        .collect();
    let before = provider.calls(KmsOp::Decrypt);
    for name in listed.iter().take(5) {
        open_close(name);
    }
    std::thread::sleep(LATENCY * 6);
    assert_eq!(
        provider.calls(KmsOp::Decrypt),
        before + 5,
        "opening 5 fetched files let the walk fetch 5 more"
    );
}
