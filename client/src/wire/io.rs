//! Reading and writing frames on a compio stream.

use bytes::BytesMut;
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The length prefix exceeds the limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    /// IO failed (including a close in the middle of a frame).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one frame body (without its length prefix).
pub async fn read_frame<S: AsyncRead>(stream: &mut S, max_bytes: u32) -> Result<BytesMut, FrameError> {
    let BufResult(res, len_buf) = stream.read_exact([0u8; 4]).await;
    if let Err(e) = res {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof { FrameError::Closed } else { e.into() });
    }
    let len = u32::from_le_bytes(len_buf);
    if len > max_bytes {
        return Err(FrameError::TooLarge(len));
    }
    let body = BytesMut::with_capacity(len as usize);
    let BufResult(res, body) = stream.read_exact(body.limit_to(len as usize)).await;
    res?;
    Ok(body.into_inner())
}

/// Writes whole frames (each already length-prefixed, possibly in several buffers) with one
/// vectored write.
pub async fn write_frames<S: AsyncWrite, T: IoBuf>(stream: &mut S, frames: Vec<T>) -> std::io::Result<Vec<T>> {
    let BufResult(res, frames) = stream.write_vectored_all(frames).await;
    res.map(|()| frames)
}

trait LimitTo: Sized {
    fn limit_to(self, n: usize) -> compio::buf::Slice<Self>;
}

impl LimitTo for BytesMut {
    fn limit_to(self, n: usize) -> compio::buf::Slice<Self> {
        compio::buf::IoBuf::slice(self, ..n)
    }
}
