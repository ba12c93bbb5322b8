//! Any bytes given to the header parser: no panic, and whatever parses re-encodes the same.
#![no_main]
use kmsfs::format::header::{Header, Preamble, SlotState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = Header::parse(data) {
        assert_eq!(&header.preamble.encode()[..], &data[..64]);
        let _ = header.candidates();
        for slot in &header.slots {
            if let SlotState::Sealed(content) = slot {
                assert!(!content.envelopes.is_empty());
            }
        }
    }
    let _ = Preamble::decode(data);
});
