//! Any bytes given to the block opener and the length arithmetic: no panic, never plaintext
//! from a block that was not sealed by this key.
#![no_main]
use kmsfs::format::block::{BlockCipher, Layout};
use kmsfs::secret::DerivedKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cipher = BlockCipher::new(&DerivedKey::new([7; 32]), [1; 16]);
    let mut out = vec![0u8; data.len()];
    assert!(cipher.open(0, data.first().is_some_and(|b| b & 1 == 1), data, &mut out).is_err());
    if data.len() >= 12 {
        let len = u64::from_le_bytes(data[..8].try_into().unwrap());
        let bs = 1u32 << (9 + data[8] % 12);
        let layout = Layout { data_offset: u32::from_le_bytes(data[8..12].try_into().unwrap()) as u64, block_size: bs };
        if let Ok(size) = layout.plaintext_len(len) {
            assert_eq!(layout.backing_len(size), len);
        }
    }
});
