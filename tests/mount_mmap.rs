//! `mmap` through a real mount: shared mappings read the plaintext and their writes reach
//! the encrypted file (through the page cache and FUSE writes), surviving a remount.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;

use common::mount::{fuse_available, Mount};
use common::pattern;

/// A shared read-write mapping of the first `len` bytes of `f` (the caller unmaps it).
fn map_shared(f: &fs::File, len: usize) -> (*mut libc::c_void, &'static mut [u8]) {
    // SAFETY: a shared mapping of an open file of at least `len` bytes.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: the mapping is `len` bytes long and lives until the test unmaps it; only the
    // test touches it.
    (ptr, unsafe {
        std::slice::from_raw_parts_mut(ptr as *mut u8, len)
    })
}

#[test]
fn mmap_reads_and_writes() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let len = 3 * 4096 + 100;
    fs::write(m.p("map"), pattern(len, 9)).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("map"))
        .unwrap();
    let (ptr, view) = map_shared(&f, len);
    assert_eq!(view, pattern(len, 9).as_slice());
    view[4096..4096 + 5].copy_from_slice(b"MMAPD");
    // SAFETY: ptr/len are the mapping made above.
    unsafe {
        assert_eq!(libc::msync(ptr, len, libc::MS_SYNC), 0);
        libc::munmap(ptr, len);
    }
    drop(f);
    m.remount();
    let data = fs::read(m.p("map")).unwrap();
    assert_eq!(&data[4096..4101], b"MMAPD");
    assert_eq!(data.len(), len);
}

#[test]
fn a_mapping_of_a_new_file_fills_it_and_sees_later_writes() {
    if !fuse_available() {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let len = 1 << 20;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("filled"))
        .unwrap();
    f.set_len(len as u64).unwrap();
    let (ptr, view) = map_shared(&f, len);
    assert!(view.iter().all(|&b| b == 0), "a hole reads as zeros");
    view.copy_from_slice(&pattern(len, 3));
    // SAFETY: ptr/len are the mapping made above.
    assert_eq!(unsafe { libc::msync(ptr, len, libc::MS_SYNC) }, 0);
    // A write(2) through the same file shows in the mapping.
    std::os::unix::fs::FileExt::write_all_at(&f, b"WRITTEN", 500_000).unwrap();
    assert_eq!(&view[500_000..500_007], b"WRITTEN");
    // SAFETY: as above.
    unsafe { libc::munmap(ptr, len) };
    drop(f);
    m.remount();
    let mut want = pattern(len, 3);
    want[500_000..500_007].copy_from_slice(b"WRITTEN");
    assert!(
        fs::read(m.p("filled")).unwrap() == want,
        "contents after remount"
    );
}
