//! Property tests of the core against a plain in-memory model: random writes, truncates and
//! reopens round-trip byte for byte; any single bit flip anywhere in a backing file is either
//! detected or harmless (it hit the unused header slot, which is then reported damaged).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{pattern, TestVolume};
use kmsfs::core::EncryptedFile;
use kmsfs::format::header::{Header, SlotState, PREAMBLE_LEN};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Truncate(u64),
    Reopen,
    Read { offset: u64, len: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..6000, 0usize..3000, any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        1 => (0u64..7000).prop_map(Op::Truncate),
        1 => Just(Op::Reopen),
        2 => (0u64..7000, 0usize..4000).prop_map(|(offset, len)| Op::Read { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_round_trip(ops in proptest::collection::vec(op(), 1..40)) {
        let v = TestVolume::new(512);
        v.write("f", b"");
        let mut volume = v.reopen().unwrap();
        let mut file = EncryptedFile::open(&volume, &v.stored("f"), true).unwrap();
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                Op::Write { offset, len, seed } => {
                    let data = pattern(len, seed);
                    file.write_at(offset, &data).unwrap();
                    if len > 0 {
                        let end = offset as usize + len;
                        if model.len() < end { model.resize(end, 0); }
                        model[offset as usize..end].copy_from_slice(&data);
                    }
                }
                Op::Truncate(n) => {
                    file.set_len(n).unwrap();
                    model.resize(n as usize, 0);
                }
                Op::Reopen => {
                    drop(file);
                    volume = v.reopen().unwrap();
                    file = EncryptedFile::open(&volume, &v.stored("f"), true).unwrap();
                }
                Op::Read { offset, len } => {
                    let mut buf = vec![0xEE; len];
                    let n = file.read_at(offset, &mut buf).unwrap();
                    let want = model.get(offset as usize..).map_or(&[][..], |r| &r[..r.len().min(len)]);
                    prop_assert_eq!(&buf[..n], want);
                }
            }
            prop_assert_eq!(file.size(), model.len() as u64);
        }
        drop(file);
        prop_assert_eq!(v.read("f").unwrap(), model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_single_bit_flip_is_detected(size in 0usize..2000, bit in any::<prop::sample::Index>()) {
        let v = TestVolume::new(512);
        let data = pattern(size, 3);
        v.write("f", &data);
        let mut raw = v.bytes("f");
        let at = bit.index(raw.len() * 8);
        raw[at / 8] ^= 1 << (at % 8);
        v.put_bytes("f", &raw);
        match v.read("f") {
            Err(_) => {}
            Ok(read) => {
                // Never wrong data; and the only harmless place is the unused slot 1, which
                // the header then reports as damaged (fsck sees it).
                prop_assert_eq!(&read, &data);
                let header = Header::parse(&raw).unwrap();
                let slot = header.preamble.slot_size as usize;
                prop_assert!((PREAMBLE_LEN + slot..PREAMBLE_LEN + 2 * slot).contains(&(at / 8)),
                    "flip at byte {} went unnoticed", at / 8);
                prop_assert!(matches!(header.slots[1], SlotState::Damaged(_)));
            }
        }
    }
}

#[test]
fn large_sparse_write_fills_the_gap_with_zeros() {
    let v = TestVolume::new(4096);
    v.write("f", b"head");
    let volume = v.reopen().unwrap();
    let mut f = EncryptedFile::open(&volume, &v.stored("f"), true).unwrap();
    f.write_at(3 << 20, b"tail").unwrap();
    assert_eq!(f.size(), (3 << 20) + 4);
    let all = f.read_all().unwrap();
    assert_eq!(&all[..4], b"head");
    assert!(all[4..3 << 20].iter().all(|&b| b == 0));
    assert_eq!(&all[3 << 20..], b"tail");
}
