//! Framing of Noise messages on a byte stream: `u16` big-endian length, then that many
//! bytes of one Noise message (so never more than 65535, Noise's own limit).
//!
//! Each phase caps the length lower (see [`super::session`]); a frame over the cap is
//! refused as soon as its 2-byte header is read, before anything is allocated for it.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::session::SessionError;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 2;

/// Reassembles frames from a stream, one at a time.
///
/// Cancel-safe: every byte read is kept in `self` before the next `.await`, so dropping
/// a pending [`FrameReader::read`] (a `tokio::time::timeout` or `select!` branch) and
/// calling it again resumes the same frame.
pub(crate) struct FrameReader {
    max: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_have: usize,
    body: Vec<u8>,
    body_have: usize,
}

impl FrameReader {
    /// A reader refusing frames longer than `max` bytes (without the header).
    pub(crate) fn new(max: usize) -> FrameReader {
        FrameReader {
            max,
            header: [0; FRAME_HEADER_LEN],
            header_have: 0,
            body: Vec::new(),
            body_have: 0,
        }
    }

    /// The next whole frame's body. A clean end of stream between frames is
    /// [`SessionError::Closed`]; one inside a frame is an I/O error.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<&[u8], SessionError> {
        while self.header_have < FRAME_HEADER_LEN {
            let n = stream
                .read(&mut self.header[self.header_have..])
                .await
                .map_err(|source| SessionError::Io {
                    during: "reading a frame header",
                    source,
                })?;
            if n == 0 {
                return Err(if self.header_have == 0 {
                    SessionError::Closed
                } else {
                    truncated("reading a frame header")
                });
            }
            self.header_have += n;
            if self.header_have == FRAME_HEADER_LEN {
                let len = usize::from(u16::from_be_bytes(self.header));
                if len > self.max {
                    return Err(SessionError::FrameTooLarge { len, max: self.max });
                }
                self.body.clear();
                self.body.resize(len, 0);
                self.body_have = 0;
            }
        }
        while self.body_have < self.body.len() {
            let n = stream
                .read(&mut self.body[self.body_have..])
                .await
                .map_err(|source| SessionError::Io {
                    during: "reading a frame",
                    source,
                })?;
            if n == 0 {
                return Err(truncated("reading a frame"));
            }
            self.body_have += n;
        }
        // Complete: the next call starts a new frame.
        self.header_have = 0;
        Ok(&self.body)
    }
}

fn truncated(during: &'static str) -> SessionError {
    SessionError::Io {
        during,
        source: std::io::ErrorKind::UnexpectedEof.into(),
    }
}

/// Prefixes `body` with its length, writes and flushes. Not cancel-safe: a cancelled
/// write leaves a partial frame on the stream, so the caller must end the session.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    stream: &mut W,
    body: &[u8],
) -> Result<(), SessionError> {
    let len = u16::try_from(body.len()).map_err(|_| SessionError::FrameTooLarge {
        len: body.len(),
        max: usize::from(u16::MAX),
    })?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    let io = |source| SessionError::Io {
        during: "writing a frame",
        source,
    };
    stream.write_all(&frame).await.map_err(io)?;
    stream.flush().await.map_err(io)
}
