//! Block sealing and the arithmetic of where blocks live in a backing file.
//!
//! A file's plaintext is cut into fixed-size blocks (the last one may be short). Each block is
//! stored as `nonce (12) ‖ ciphertext ‖ tag (16)` under AES-256-GCM with a fresh random nonce,
//! and associated data `file id (16) ‖ block index (u64 BE) ‖ last flag (u8)`. The index stops
//! reordering, the file id stops moving blocks between files, and the last flag makes dropping
//! trailing blocks detectable. An empty file still has one sealed, empty, last block, so
//! truncating a file down to its header is detected too.
//!
//! The AEAD is AWS-LC's AES-256-GCM (through aws-lc-rs, which the AWS SDK already links):
//! measured on the project's machine at about 2.5× RustCrypto's `aes-gcm` at 4 KiB blocks
//! (`examples/block_throughput.rs`, docs/PERFORMANCE.md). The format is plain AES-256-GCM
//! either way; the test vectors pin it.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::FormatError;
use crate::secret::DerivedKey;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed block adds to its plaintext.
pub const BLOCK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Whether `n` is an allowed plaintext block size (a power of two from 512 B to 1 MiB).
pub fn valid_block_size(n: u32) -> bool {
    n.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&n)
}

/// Seals and opens the blocks of one file.
pub struct BlockCipher {
    /// AWS-LC clears the expanded key when this is dropped.
    aead: LessSafeKey,
    file_id: [u8; 16],
}

impl BlockCipher {
    pub fn new(content_key: &DerivedKey, file_id: [u8; 16]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, content_key.expose())
            .expect("a 32-byte key is an AES-256 key");
        BlockCipher {
            aead: LessSafeKey::new(key),
            file_id,
        }
    }

    fn aad(&self, index: u64, last: bool) -> [u8; 25] {
        let mut aad = [0u8; 25];
        aad[..16].copy_from_slice(&self.file_id);
        aad[16..24].copy_from_slice(&index.to_be_bytes());
        aad[24] = last as u8;
        aad
    }

    /// Appends the sealed form of `plaintext` (block `index`) to `out`.
    pub fn seal(
        &self,
        index: u64,
        last: bool,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        out.resize(start + plaintext.len() + BLOCK_OVERHEAD, 0);
        self.seal_into(index, last, nonce, plaintext, &mut out[start..]);
    }

    /// Writes the sealed form of `plaintext` (block `index`) into `out`, which is exactly
    /// `plaintext.len() + 28` bytes.
    pub fn seal_into(
        &self,
        index: u64,
        last: bool,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        out: &mut [u8],
    ) {
        let len = plaintext.len();
        assert_eq!(out.len(), len + BLOCK_OVERHEAD, "sealed block buffer size");
        out[..NONCE_LEN].copy_from_slice(nonce);
        let (body, tag_out) = out[NONCE_LEN..].split_at_mut(len);
        copy_block(body, plaintext);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(self.aad(index, last)),
                body,
            )
            .expect("AES-GCM seals any block shorter than 64 GiB");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Opens sealed block `index` into `out` (which must hold `sealed.len() - 28` bytes) and
    /// returns the plaintext length. On failure `out` holds no plaintext.
    pub fn open(
        &self,
        index: u64,
        last: bool,
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<usize, FormatError> {
        if sealed.len() < BLOCK_OVERHEAD {
            return Err(FormatError::DecryptionFailed(index));
        }
        let len = sealed.len() - BLOCK_OVERHEAD;
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(len);
        let out = &mut out[..len];
        copy_block(out, ct);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        let result = self.aead.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(index, last)),
            tag,
            out,
        );
        if result.is_err() {
            out.fill(0);
            return Err(FormatError::DecryptionFailed(index));
        }
        Ok(len)
    }
}

/// `dst.copy_from_slice(src)` without glibc's `memcpy`. For block-sized copies glibc (2.36)
/// uses `rep movsb`, which on AMD Zen is several times slower when source and destination are
/// differently aligned, as a block and its sealed form (12 bytes of nonce ahead) always are
/// (glibc bug 30994): with `copy_from_slice` the copy took 30 % of a seal. XOR with a zero the
/// compiler cannot see keeps it from turning this loop back into a `memcpy` call; it becomes
/// plain vector loads and stores.
fn copy_block(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_block lengths");
    let zero = std::hint::black_box(0u128);
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (d, s) in (&mut d).zip(&mut s) {
        let v = u128::from_ne_bytes(s.try_into().expect("16-byte chunk")) ^ zero;
        d.copy_from_slice(&v.to_ne_bytes());
    }
    d.into_remainder().copy_from_slice(s.remainder());
}

/// Where the blocks of a file live: after a header of `data_offset` bytes, blocks of
/// `block_size` plaintext bytes, each `block_size + 28` bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub data_offset: u64,
    pub block_size: u32,
}

impl Layout {
    pub fn sealed_block_len(&self) -> u64 {
        self.block_size as u64 + BLOCK_OVERHEAD as u64
    }

    /// Number of blocks a file of `size` plaintext bytes has (at least one).
    pub fn block_count(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size as u64).max(1)
    }

    /// Byte offset of block `index` in the backing file.
    pub fn block_offset(&self, index: u64) -> u64 {
        self.data_offset + index * self.sealed_block_len()
    }

    /// Plaintext length of block `index` in a file of `size` bytes.
    pub fn block_plain_len(&self, size: u64, index: u64) -> usize {
        let start = index * self.block_size as u64;
        (size.saturating_sub(start)).min(self.block_size as u64) as usize
    }

    /// Length of the backing file holding `size` plaintext bytes.
    pub fn backing_len(&self, size: u64) -> u64 {
        self.data_offset + size + self.block_count(size) * BLOCK_OVERHEAD as u64
    }

    /// The plaintext size of a backing file of `backing_len` bytes; refuses lengths no
    /// plaintext size produces (a file cut inside a block, or without its final block).
    pub fn plaintext_len(&self, backing_len: u64) -> Result<u64, FormatError> {
        let bad = || FormatError::InvalidLength(backing_len);
        let data = backing_len.checked_sub(self.data_offset).ok_or_else(bad)?;
        let sealed = self.sealed_block_len();
        let full = data / sealed;
        let rest = data % sealed;
        let size = match (full, rest) {
            (0, r) if r == BLOCK_OVERHEAD as u64 => 0,
            (_, 0) if full > 0 => full * self.block_size as u64,
            (_, r) if r > BLOCK_OVERHEAD as u64 => {
                full * self.block_size as u64 + r - BLOCK_OVERHEAD as u64
            }
            _ => return Err(bad()),
        };
        debug_assert_eq!(self.backing_len(size), backing_len);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cipher(id: u8) -> BlockCipher {
        BlockCipher::new(&DerivedKey::new([7; 32]), [id; 16])
    }

    #[test]
    fn seal_open_round_trip() {
        let c = cipher(1);
        let mut sealed = Vec::new();
        c.seal(3, false, &[9; 12], b"hello", &mut sealed);
        assert_eq!(sealed.len(), 5 + BLOCK_OVERHEAD);
        let mut out = [0u8; 5];
        assert_eq!(c.open(3, false, &sealed, &mut out), Ok(5));
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn block_reordered_fails() {
        let c = cipher(1);
        let mut sealed = Vec::new();
        c.seal(3, false, &[9; 12], b"hello", &mut sealed);
        let mut out = [0u8; 5];
        assert_eq!(
            c.open(4, false, &sealed, &mut out),
            Err(FormatError::DecryptionFailed(4))
        );
        assert_eq!(out, [0; 5], "no plaintext escapes a failed open");
    }

    #[test]
    fn last_flag_is_authenticated() {
        let c = cipher(1);
        let mut sealed = Vec::new();
        c.seal(0, false, &[9; 12], b"x", &mut sealed);
        assert!(c.open(0, true, &sealed, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn block_from_other_file_fails() {
        let mut sealed = Vec::new();
        cipher(1).seal(0, true, &[9; 12], b"x", &mut sealed);
        assert!(cipher(2).open(0, true, &sealed, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn layout_lengths() {
        let l = Layout {
            data_offset: 100,
            block_size: 4096,
        };
        assert_eq!(l.backing_len(0), 128);
        assert_eq!(l.plaintext_len(128), Ok(0));
        assert_eq!(l.backing_len(4096), 100 + 4124);
        assert_eq!(l.backing_len(4097), 100 + 4124 + 29);
        assert_eq!(l.block_count(0), 1);
        assert_eq!(l.block_count(4096), 1);
        assert_eq!(l.block_count(4097), 2);
        assert_eq!(l.block_plain_len(4097, 1), 1);
        // Header only: the final block was dropped.
        assert!(l.plaintext_len(100).is_err());
        // An empty block after full blocks is never written.
        assert!(l.plaintext_len(100 + 4124 + 28).is_err());
        // Cut inside a block's overhead.
        assert!(l.plaintext_len(100 + 4124 + 27).is_err());
        assert!(l.plaintext_len(99).is_err());
    }

    proptest! {
        #[test]
        fn layout_round_trips(size in 0u64..10_000_000, bs_log in 9u32..=20) {
            let l = Layout { data_offset: 1088, block_size: 1 << bs_log };
            prop_assert_eq!(l.plaintext_len(l.backing_len(size)), Ok(size));
        }
    }
}
