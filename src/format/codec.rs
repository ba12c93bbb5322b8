//! Big-endian primitives shared by the config and header encodings.
//!
//! Variable-length fields are length-prefixed with a u16 (`lp16`); the reader never trusts a
//! length beyond the bytes it was handed and rejects trailing garbage where a layout ends.

/// Appends encoded fields to a byte vector.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A u16 length followed by the bytes. Panics if `v` is longer than u16::MAX: callers
    /// validate lengths first, so this is a programming error, not bad input.
    pub fn lp16(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).expect("lp16 field longer than 65535 bytes");
        self.u16(len).bytes(v)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields from a byte slice; every read fails cleanly past the end.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

/// A read ran past the end of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.remaining() < n {
            return Err(Truncated);
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn lp16(&mut self) -> Result<&'a [u8], Truncated> {
        let len = self.u16()? as usize;
        self.take(len)
    }
}

/// Lower-case hex, for ids in messages and docs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex; `None` on odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut w = Writer::new();
        w.u8(1).u16(0x0203).u32(0x04050607).u64(8).lp16(b"abc");
        let bytes = w.into_bytes();
        assert_eq!(&bytes[..7], &[1, 2, 3, 4, 5, 6, 7]);
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x04050607));
        assert_eq!(r.u64(), Ok(8));
        assert_eq!(r.lp16(), Ok(&b"abc"[..]));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), Err(Truncated));
        // A length prefix that claims more than is there.
        let mut r = Reader::new(&[0, 5, b'a']);
        assert_eq!(r.lp16(), Err(Truncated));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 0xff, 0x1a]), "00ff1a");
        assert_eq!(unhex("00ff1A"), Some(vec![0, 0xff, 0x1a]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
