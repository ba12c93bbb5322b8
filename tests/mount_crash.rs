//! Crash consistency: `kill -9` of the daemon during fsynced appends, during renames of a file,
//! and during the rename of a directory of 300 files. After a remount every fsynced byte is
//! there, every file decrypts, each file is at one of the names it had, and the remount has
//! tidied the envelopes of the names it did not keep.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::mount::{fuse_available, Mount};
use common::pattern;
use kmsfs::core::file::read_header;
use kmsfs::format::context::CanonicalPath;

fn record(i: i64) -> String {
    format!("record {i:08} {}\n", "x".repeat((i % 97) as usize))
}

#[test]
fn kill_during_fsynced_appends_loses_no_fsynced_byte() {
    if !fuse_available() {
        return;
    }
    for round in 0..4u64 {
        let mut m = Mount::new(4096, &[]);
        let acked = Arc::new(AtomicI64::new(-1));
        let path = m.p("journal.log");
        let writer = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) else {
                    return;
                };
                for i in 0.. {
                    if f.write_all(record(i).as_bytes()).is_err() || f.sync_data().is_err() {
                        return;
                    }
                    acked.store(i, Ordering::SeqCst);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(150 + 70 * round));
        m.crash();
        writer.join().unwrap();
        let acked = acked.load(Ordering::SeqCst);
        assert!(acked > 10, "the writer made progress ({acked})");
        m.start();
        let data = fs::read(m.p("journal.log")).expect("the file decrypts after the crash");
        let want: String = (0..=acked).map(record).collect();
        assert!(
            data.len() >= want.len(),
            "round {round}: {} bytes, {} fsynced",
            data.len(),
            want.len()
        );
        assert_eq!(
            &data[..want.len()],
            want.as_bytes(),
            "round {round}: fsynced records differ"
        );
        // Whatever follows is records too (written, not yet fsynced), never garbage.
        let rest = String::from_utf8(data[want.len()..].to_vec()).unwrap();
        assert!(rest.split_inclusive('\n').enumerate().all(|(k, r)| {
            r == record(acked + 1 + k as i64) || record(acked + 1 + k as i64).starts_with(r)
        }));
    }
}

#[test]
fn kill_during_file_renames_leaves_the_file_at_one_name() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let content = pattern(10_000, 4);
    fs::write(m.p("ping"), &content).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (a, b, s) = (m.p("ping"), m.p("pong"), stop.clone());
    let renamer = std::thread::spawn(move || {
        let mut n = 0;
        while !s.load(Ordering::SeqCst) {
            let (from, to) = if n % 2 == 0 { (&a, &b) } else { (&b, &a) };
            if fs::rename(from, to).is_err() {
                return n;
            }
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    m.crash();
    stop.store(true, Ordering::SeqCst);
    let renames = renamer.join().unwrap();
    assert!(renames > 5, "renames happened ({renames})");
    m.start();
    let found: Vec<_> = ["ping", "pong"]
        .iter()
        .filter(|n| m.p(n).exists())
        .collect();
    assert_eq!(found.len(), 1, "exactly one name: {found:?}");
    assert_eq!(
        fs::read(m.p(found[0])).unwrap(),
        content,
        "readable at {}",
        found[0]
    );
    assert_tidy(&m, found[0]);
}

#[test]
fn kill_during_a_directory_rename_leaves_every_file_readable() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    for i in 0..300 {
        if i % 50 == 0 {
            fs::create_dir_all(m.p(&format!("tree/d{}", i / 50))).unwrap();
        }
        fs::write(
            m.p(&format!("tree/d{}/f{i}", i / 50)),
            pattern(200 + i, i as u8),
        )
        .unwrap();
    }
    let (from, to) = (m.p("tree"), m.p("moved"));
    let renamer = std::thread::spawn(move || fs::rename(from, to).is_ok());
    std::thread::sleep(Duration::from_millis(25));
    m.crash();
    let _ = renamer.join();
    m.start();
    let root = if m.p("moved").exists() {
        "moved"
    } else {
        "tree"
    };
    assert!(!(m.p("moved").exists() && m.p("tree").exists()));
    for i in 0..300 {
        let p = format!("{root}/d{}/f{i}", i / 50);
        let got = fs::read(m.p(&p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(got, pattern(200 + i, i as u8), "{p}");
        assert_tidy(&m, &p);
    }
}

/// The remount tidied the envelopes of the name a file did not end up with, and finished
/// the rebind records.
fn assert_tidy(m: &Mount, p: &str) {
    let file = fs::File::open(m.b(p)).unwrap();
    let (header, _) = read_header(&file, &CanonicalPath::root()).unwrap();
    for (_, slot) in header.candidates() {
        for e in &slot.envelopes {
            assert_eq!(e.path.as_str(), m.stored(p), "stale envelope in {p}");
        }
    }
    let pending = fs::read_dir(m.b(".kmsfs/pending")).map_or(0, |d| d.count());
    assert_eq!(
        pending,
        0,
        "rebind records left after the remount; daemon log:\n{}",
        m.log()
    );
}
