//! A fixed arena of 32-byte key slots in memory that is locked (`mlock`, never swapped) and
//! excluded from core dumps (`MADV_DONTDUMP`). The key cache keeps plaintext data keys here.
//! Locking can fail for an unprivileged user with a small RLIMIT_MEMLOCK; the arena then still
//! works, reports `is_locked() == false`, and the caller logs it once.

use std::ptr::NonNull;

use zeroize::Zeroize;

use crate::secret::{DataKey, DATA_KEY_LEN};

pub struct LockedArena {
    ptr: NonNull<u8>,
    len: usize,
    free: Vec<usize>,
    locked: bool,
    dontdump: bool,
}

// SAFETY: the arena owns its mapping exclusively; callers serialize access (the cache holds it
// inside a Mutex), so moving or sharing the handle across threads is sound.
unsafe impl Send for LockedArena {}
unsafe impl Sync for LockedArena {}

impl LockedArena {
    pub fn new(slots: usize) -> std::io::Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (slots.max(1) * DATA_KEY_LEN).div_ceil(page) * page;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ptr/len describe the mapping just created.
        let locked = unsafe { libc::mlock(ptr, len) } == 0;
        // SAFETY: as above; madvise only changes the mapping's dump flag.
        let dontdump = unsafe { libc::madvise(ptr, len, libc::MADV_DONTDUMP) } == 0;
        Ok(LockedArena {
            ptr: NonNull::new(ptr as *mut u8).expect("mmap never returns null on success"),
            len,
            free: (0..slots).rev().collect(),
            locked,
            dontdump,
        })
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn is_excluded_from_dumps(&self) -> bool {
        self.dontdump
    }

    /// The mapping's address, for tests that inspect /proc/self/smaps.
    #[cfg(test)]
    pub fn address(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!((slot + 1) * DATA_KEY_LEN <= self.len);
        // SAFETY: the slot lies inside the mapping (asserted) and &mut self is exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(slot * DATA_KEY_LEN), DATA_KEY_LEN)
        }
    }

    /// Stores a key in a free slot; `None` when the arena is full.
    pub fn store(&mut self, key: &DataKey) -> Option<usize> {
        let slot = self.free.pop()?;
        self.slot_mut(slot).copy_from_slice(key.expose());
        Some(slot)
    }

    pub fn load(&mut self, slot: usize) -> DataKey {
        DataKey::from_slice(self.slot_mut(slot)).expect("slots are 32 bytes")
    }

    /// Zeroizes a slot and returns it to the free list.
    pub fn release(&mut self, slot: usize) {
        self.slot_mut(slot).zeroize();
        self.free.push(slot);
    }
}

impl Drop for LockedArena {
    fn drop(&mut self) {
        // SAFETY: the whole mapping is ours; we zeroize, unlock and unmap it exactly once.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len).zeroize();
            if self.locked {
                libc::munlock(self.ptr.as_ptr() as *mut libc::c_void, self.len);
            }
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests play the attacker on the store, by path
mod tests {
    use super::*;

    #[test]
    fn store_load_release_zeroizes() {
        let mut a = LockedArena::new(2).unwrap();
        let s1 = a.store(&DataKey::from_bytes(&[1; 32])).unwrap();
        let s2 = a.store(&DataKey::from_bytes(&[2; 32])).unwrap();
        assert!(a.store(&DataKey::from_bytes(&[3; 32])).is_none(), "bounded");
        assert_eq!(a.load(s1).expose(), &[1; 32]);
        a.release(s1);
        assert_eq!(a.slot_mut(s1), &[0u8; 32]);
        assert_eq!(a.load(s2).expose(), &[2; 32]);
    }

    #[test]
    fn mapping_is_locked_and_not_dumped() {
        let a = LockedArena::new(100).unwrap();
        assert!(a.is_excluded_from_dumps());
        // /proc/self/smaps lists the mapping's flags: "lo" = locked, "dd" = do not dump.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", a.address());
        let flags = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&start))
            .find(|l| l.starts_with("VmFlags"))
            .unwrap_or_else(|| panic!("mapping {start} not in /proc/self/smaps"));
        assert!(flags.contains(" dd"), "{flags}");
        if a.is_locked() {
            assert!(flags.contains(" lo"), "{flags}");
        }
        // Root (CAP_IPC_LOCK) can always lock; CI runs as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(a.is_locked());
        }
    }
}
