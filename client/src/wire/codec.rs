//! Primitive encoding: little-endian integers, length-prefixed strings, byte strings and
//! arrays. Decoding reads from a `BytesMut` and never panics: every length is checked against
//! the bytes that remain before anything is allocated or split off, and byte strings are
//! split off the frame without copying.

use bytes::{Buf, BytesMut};

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ends before a field does.
    #[error("message truncated reading {0}")]
    Truncated(&'static str),
    /// A string is not UTF-8.
    #[error("invalid utf-8 in {0}")]
    Utf8(&'static str),
    /// A value is out of its allowed range.
    #[error("invalid value for {0}")]
    Invalid(&'static str),
    /// Bytes remain after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Builds a message into a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

/// Reads a message from a frame; split-off byte strings share the frame's memory.
#[derive(Debug)]
pub struct Reader {
    buf: BytesMut,
}

impl Reader {
    /// Reads from `buf`.
    pub fn new(buf: BytesMut) -> Reader {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        Ok(())
    }

    /// Splits off the next `n` bytes without copying.
    pub fn split(&mut self, n: usize, what: &'static str) -> Result<BytesMut, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    /// An array length, checked against the bytes left (every element takes at least one).
    pub fn array_len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = u32::decode(self)? as usize;
        if n > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }
}

/// A type with a wire encoding.
pub trait Wire: Sized {
    /// Appends the encoding.
    fn encode(&self, w: &mut Writer);
    /// Reads one value.
    fn decode(r: &mut Reader) -> Result<Self, DecodeError>;
}

macro_rules! wire_int {
    ($t:ty, $get:ident, $name:literal) => {
        impl Wire for $t {
            fn encode(&self, w: &mut Writer) {
                w.buf.extend_from_slice(&self.to_le_bytes());
            }
            fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
                r.need(std::mem::size_of::<$t>(), $name)?;
                Ok(r.buf.$get())
            }
        }
    };
}

wire_int!(u8, get_u8, "u8");
wire_int!(i8, get_i8, "i8");
wire_int!(u16, get_u16_le, "u16");
wire_int!(i16, get_i16_le, "i16");
wire_int!(u32, get_u32_le, "u32");
wire_int!(i32, get_i32_le, "i32");
wire_int!(u64, get_u64_le, "u64");
wire_int!(i64, get_i64_le, "i64");

impl Wire for bool {
    fn encode(&self, w: &mut Writer) {
        u8::from(*self).encode(w);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        match u8::decode(r)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("bool")),
        }
    }
}

/// Wire strings carry a u16 length: a longer one (only a message text can be: names are
/// validated far below it) is cut at the last character boundary within [`STRING_BYTES_MAX`],
/// so no input echoed into an answer can make an encoder fail.
impl Wire for String {
    fn encode(&self, w: &mut Writer) {
        let text = truncate_to_char_boundary(self, STRING_BYTES_MAX);
        let len = u16::try_from(text.len()).expect("cut to STRING_BYTES_MAX, which fits a u16");
        len.encode(w);
        w.buf.extend_from_slice(text.as_bytes());
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let len = u16::decode(r)? as usize;
        let bytes = r.split(len, "string")?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8("string"))
    }
}

/// Byte strings (record batches) are split off the frame, not copied.
impl Wire for BytesMut {
    fn encode(&self, w: &mut Writer) {
        let len = u32::try_from(self.len()).expect("byte strings under 4 GiB");
        len.encode(w);
        w.buf.extend_from_slice(self);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let len = u32::decode(r)? as usize;
        r.split(len, "bytes")
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn encode(&self, w: &mut Writer) {
        u32::try_from(self.len()).expect("arrays under 2^32 elements").encode(w);
        for item in self {
            item.encode(w);
        }
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let n = r.array_len("array")?;
        // `n` is bounded by the bytes left, but an element may take far more memory than its
        // smallest encoding: reserve no more than the frame's own size up front.
        let mut out = Vec::with_capacity(n.min(r.remaining() / std::mem::size_of::<T>().max(1)));
        for _ in 0..n {
            out.push(T::decode(r)?);
        }
        Ok(out)
    }
}

impl<T: Wire> Wire for Option<T> {
    fn encode(&self, w: &mut Writer) {
        match self {
            None => 0u8.encode(w),
            Some(v) => {
                1u8.encode(w);
                v.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        match u8::decode(r)? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(r)?)),
            _ => Err(DecodeError::Invalid("option tag")),
        }
    }
}

/// The longest string the wire carries, in bytes.
pub const STRING_BYTES_MAX: usize = u16::MAX as usize;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Client-given text (a name, a config) as an error message shows it: at most 64
/// characters, the rest elided with its length, so no answer or error line repeats unbounded
/// input.
pub fn shown(text: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    match text.char_indices().nth(SHOWN_CHARS_MAX) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Declares a message struct whose encoding is its fields in order.
#[macro_export]
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $crate::wire::codec::Wire for $name {
            #[allow(unused_variables)]
            fn encode(&self, w: &mut $crate::wire::codec::Writer) {
                $($crate::wire::codec::Wire::encode(&self.$f, w);)*
            }
            #[allow(unused_variables)]
            fn decode(r: &mut $crate::wire::codec::Reader) -> Result<Self, $crate::wire::codec::DecodeError> {
                Ok($name { $($f: <$t as $crate::wire::codec::Wire>::decode(r)?),* })
            }
        }
    };
}
