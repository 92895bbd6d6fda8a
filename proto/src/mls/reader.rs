//! A bounds-checked cursor over TLS presentation language bytes with MLS
//! variable-length vectors (RFC 9420 §2.1.2).
//!
//! Every read checks the remaining input first, so no length a peer sends can
//! make us read past the end, allocate more than the input, or panic.

use super::MlsWireError;

/// Largest value an MLS variable-length integer can carry (30 bits).
const VARINT_MAX: usize = (1 << 30) - 1;

/// A cursor over borrowed input.
#[derive(Debug, Clone)]
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes already consumed.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    /// The whole input this reader walks over.
    pub(super) fn input(&self) -> &'a [u8] {
        self.buf
    }

    pub(super) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes the next `n` bytes.
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MlsWireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(MlsWireError::Truncated { field })?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(MlsWireError::Truncated { field })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MlsWireError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, MlsWireError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, MlsWireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, MlsWireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, MlsWireError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// Reads an MLS variable-length integer (§2.1.2): a 2-bit prefix gives
    /// the length (1, 2 or 4 bytes); prefix `11` is invalid, and the
    /// encoding must be minimal.
    pub(super) fn varint(&mut self, field: &'static str) -> Result<usize, MlsWireError> {
        let first = self.u8(field)?;
        let prefix = first >> 6;
        let mut value = usize::from(first & 0x3f);
        let extra = match prefix {
            0 => 0,
            1 => 1,
            2 => 3,
            _ => return Err(MlsWireError::InvalidVarint { field }),
        };
        for _ in 0..extra {
            value = (value << 8) | usize::from(self.u8(field)?);
        }
        let minimal = match prefix {
            0 => true,
            1 => value >= 1 << 6,
            _ => value >= 1 << 14,
        };
        if !minimal {
            return Err(MlsWireError::InvalidVarint { field });
        }
        Ok(value)
    }

    /// Reads `opaque field<V>`: a varint length, then that many bytes.
    pub(super) fn opaque(&mut self, field: &'static str) -> Result<&'a [u8], MlsWireError> {
        let len = self.varint(field)?;
        self.take(len, field)
    }

    /// Reads `opaque field<V>` whose length must be exactly `N`.
    pub(super) fn opaque_array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], MlsWireError> {
        let bytes = self.opaque(field)?;
        <[u8; N]>::try_from(bytes).map_err(|_| MlsWireError::InvalidLength {
            field,
            len: bytes.len(),
            expected: N,
        })
    }

    /// Reads a vector `T field<V>` and returns a reader over its elements;
    /// the caller parses the elements and calls [`Reader::finish`].
    pub(super) fn vector(&mut self, field: &'static str) -> Result<Reader<'a>, MlsWireError> {
        Ok(Reader::new(self.opaque(field)?))
    }

    /// Reads an `optional<T>` presence byte (0 or 1).
    pub(super) fn presence(&mut self, field: &'static str) -> Result<bool, MlsWireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(MlsWireError::InvalidValue {
                field,
                value: u64::from(value),
            }),
        }
    }

    /// Fails unless every byte has been consumed.
    pub(super) fn finish(self) -> Result<(), MlsWireError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(MlsWireError::TrailingBytes { count }),
        }
    }
}

/// Appends `opaque value<V>` to `out`.
pub(super) fn write_opaque(out: &mut Vec<u8>, value: &[u8]) -> Result<(), MlsWireError> {
    let len = value.len();
    if len > VARINT_MAX {
        return Err(MlsWireError::TooLarge {
            len,
            max: VARINT_MAX,
        });
    }
    // The casts cannot truncate: `len` fits in 30 bits and each arm masks
    // to its own width.
    if len < 1 << 6 {
        out.push(len as u8);
    } else if len < 1 << 14 {
        out.extend_from_slice(&(0x4000 | len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&(0x8000_0000 | len as u32).to_be_bytes());
    }
    out.extend_from_slice(value);
    Ok(())
}
