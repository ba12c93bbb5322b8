//! Creates that do not wait for their data key (core, no mount): a create returns before its
//! `GenerateDataKey` answers, the first writes wait in memory, and the key, the header and the
//! data reach the backing store afterwards; fsync waits for them; a key request that fails is
//! reported at close and fsync, and the next creates wait for their keys themselves.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{pattern, TestVolume};
use kmsfs::core::fs::{Caller, KmsFs, ROOT_INO};
use kmsfs::keys::fault::{Faults, FaultyProvider};
use kmsfs::keys::KmsOp;

const CALLER: Caller = Caller {
    uid: 0,
    gid: 0,
    umask: 0o022,
};
/// A create that waited for its key took at least this long (the fault is a sleep), so a
/// create that returns sooner did not wait; long enough that a busy machine's scheduling
/// delays (tens of milliseconds under CI's parallel tests) stay well below it.
const LATENCY: Duration = Duration::from_millis(250);

/// A writable core whose key service answers after `LATENCY`.
fn slow_core(v: &TestVolume, pending: usize) -> (KmsFs, Arc<FaultyProvider>) {
    let faults = Faults {
        latency: LATENCY,
        ..Default::default()
    };
    let (volume, provider) = v.open_faulty(5, faults);
    let mut core = KmsFs::new(volume, false).unwrap();
    core.set_pending_creates(pending);
    // The first create waits: the key service's speed is not known yet.
    put(&core, "primer", b"1");
    (core, provider)
}

/// A create that must not wait for its key.
fn create(core: &KmsFs, name: &str) -> (u64, u64) {
    let t0 = Instant::now();
    let (attr, fh) = core
        .create(ROOT_INO, OsStr::new(name), 0o644, libc::O_RDWR, CALLER)
        .unwrap();
    let took = t0.elapsed();
    assert!(took < LATENCY, "the create of {name} waited ({took:?})");
    (attr.ino, fh)
}

/// create + write + close of `name` with `data`; returns the inode.
fn put(core: &KmsFs, name: &str, data: &[u8]) -> u64 {
    let (attr, fh) = core
        .create(ROOT_INO, OsStr::new(name), 0o644, libc::O_WRONLY, CALLER)
        .unwrap();
    assert_eq!(core.write(fh, 0, data).unwrap(), data.len());
    core.flush(fh).unwrap();
    core.release(fh);
    attr.ino
}

#[test]
fn creates_return_before_their_keys_and_the_data_arrives_afterwards() {
    let v = TestVolume::new(4096);
    let (core, provider) = slow_core(&v, 64);
    let files = 30;
    let t0 = Instant::now();
    for i in 0..files {
        put(&core, &format!("f{i:02}"), &pattern(3000 + i, i as u8));
    }
    let took = t0.elapsed();
    // Waiting for each key: 30 × 100 ms = 3 s.
    assert!(
        took < LATENCY * files as u32 / 3,
        "{files} creates took {took:?}"
    );
    core.settle();
    assert_eq!(provider.calls(KmsOp::GenerateDataKey), files as u64 + 1);
    for i in 0..files {
        assert_eq!(
            v.read(&format!("f{i:02}")).unwrap(),
            pattern(3000 + i, i as u8)
        );
    }
    assert_eq!(core.io_errors(), 0);
}

#[test]
fn every_create_waits_when_pending_creates_are_off() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 0);
    let t0 = Instant::now();
    for i in 0..5 {
        put(&core, &format!("f{i}"), b"x");
    }
    assert!(t0.elapsed() >= LATENCY * 5);
    assert_eq!(v.read("f4").unwrap(), b"x");
}

#[test]
fn a_pending_file_reads_stats_and_truncates_from_memory() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 64);
    let (ino, fh) = create(&core, "f");
    core.write(fh, 0, b"hello world").unwrap();
    core.write(fh, 20, b"!").unwrap();
    assert_eq!(core.getattr(ino).unwrap().size, 21);
    let read = core.read(fh, 0, 100).unwrap();
    assert_eq!(&read[..11], b"hello world");
    assert_eq!(&read[11..20], &[0u8; 9]);
    core.fallocate(fh, 0, 30, 0).unwrap();
    core.setattr(
        ino,
        None,
        None,
        None,
        Some(5),
        None,
        None,
        false,
        false,
        Some(fh),
        false,
    )
    .unwrap();
    assert_eq!(core.read(fh, 0, 100).unwrap(), b"hello");
    core.release(fh);
    core.settle();
    assert_eq!(v.read("f").unwrap(), b"hello");
}

#[test]
fn fsync_waits_for_the_key_and_the_data() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 64);
    let (_, fh) = create(&core, "f");
    core.write(fh, 0, b"durable").unwrap();
    core.fsync(fh).unwrap();
    // No settle: the fsync alone put the header and data on the backing store.
    assert_eq!(v.read("f").unwrap(), b"durable");
    core.release(fh);
}

#[test]
fn a_large_write_waits_for_the_key_and_lands_whole() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 64);
    let (_, fh) = create(&core, "big");
    let head = pattern(1000, 1);
    let big = pattern(3 << 20, 2);
    core.write(fh, 0, &head).unwrap();
    core.write(fh, head.len() as u64, &big).unwrap();
    core.release(fh);
    core.settle();
    let mut want = head.clone();
    want.extend_from_slice(&big);
    assert_eq!(v.read("big").unwrap(), want);
}

#[test]
fn the_times_set_while_pending_survive_the_key_arriving() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 64);
    let ino = put(&core, "f", b"contents");
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    core.setattr(
        ino,
        None,
        None,
        None,
        None,
        Some(then),
        Some(then),
        false,
        false,
        None,
        false,
    )
    .unwrap();
    core.settle();
    let meta = std::fs::metadata(v.backing_file("f")).unwrap();
    assert_eq!(meta.modified().unwrap(), then);
    assert_eq!(v.read("f").unwrap(), b"contents");
}

#[test]
fn renaming_a_pending_file_binds_its_key_to_the_new_name() {
    let v = TestVolume::new(4096);
    let (core, _) = slow_core(&v, 64);
    put(&core, "old", b"moved");
    core.rename(
        ROOT_INO,
        OsStr::new("old"),
        ROOT_INO,
        OsStr::new("new"),
        false,
    )
    .unwrap();
    core.settle();
    assert_eq!(v.read("new").unwrap(), b"moved");
    assert!(v.read("old").is_err());
}

#[test]
fn a_failed_key_request_is_reported_at_close_and_fsync_and_later_creates_wait() {
    let v = TestVolume::new(4096);
    let (core, provider) = slow_core(&v, 64);
    provider.set(
        Some(KmsOp::GenerateDataKey),
        Faults {
            latency: LATENCY,
            deny: true,
            ..Default::default()
        },
    );
    let (_, fh) = create(&core, "lost");
    core.write(fh, 0, b"never stored").unwrap();
    let err = core
        .fsync(fh)
        .expect_err("fsync must report the missing key");
    assert!(err.to_string().contains("never arrived"), "{err}");
    assert!(core.flush(fh).is_err(), "close reports it too");
    core.release(fh);
    assert_eq!(core.io_errors(), 1);
    // The file is left empty: reading it fails rather than returning nothing.
    assert!(v.read("lost").is_err());
    // The key service is failing: the next create waits and fails itself.
    let err = core
        .create(ROOT_INO, OsStr::new("next"), 0o644, libc::O_WRONLY, CALLER)
        .expect_err("a create while the key service fails reports it");
    assert!(err.to_string().to_lowercase().contains("denied"), "{err}");
    // Once it answers again, creates go back to not waiting.
    provider.set(
        Some(KmsOp::GenerateDataKey),
        Faults {
            latency: LATENCY,
            ..Default::default()
        },
    );
    put(&core, "after", b"ok");
    let t0 = Instant::now();
    put(&core, "again", b"ok");
    assert!(t0.elapsed() < LATENCY);
    core.settle();
    assert_eq!(v.read("again").unwrap(), b"ok");
}

#[test]
fn a_key_service_that_answers_fast_is_waited_for() {
    let v = TestVolume::new(4096);
    let (core, provider) = slow_core(&v, 64);
    provider.heal();
    assert!(!core.creates_wait_for_keys());
    // Creates teach the core the key service is now fast (a moving average): a few dozen on
    // an idle machine, more when a busy one slows some of them.
    let mut warm = 0;
    while !core.creates_wait_for_keys() {
        assert!(warm < 2000, "2000 fast creates did not make creates wait");
        put(&core, &format!("warm{warm}"), b"w");
        warm += 1;
        core.settle();
    }
    put(&core, "f", b"on disk at close");
    // No settle: the create waited for its key and the write went straight to the store.
    assert_eq!(v.read("f").unwrap(), b"on disk at close");
}
