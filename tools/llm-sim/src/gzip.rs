//! `content-encoding: gzip` for answers, as servers behind a compressing
//! middleware send them.
//!
//! A client that sends `accept-encoding: gzip` gets its answer compressed;
//! `--gzip-always` compresses every answer even without it, as a
//! misbehaving upstream (or one behind a proxy that ignores the request's
//! header) does. Streams stay streams: every frame is compressed and
//! flushed (a deflate sync flush) as it is produced, so each SSE event
//! reaches the client, decompressible, when it is due, and the gzip trailer
//! follows the last frame. A body that ends with an error (the abort fault)
//! still ends with that error: the client sees a cut compressed stream.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::header::ACCEPT_ENCODING;

use crate::api::Body;

/// Whether `accept-encoding` lists gzip (or `*`) with a non-zero weight.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// `body`, gzip-compressed frame by frame.
pub fn compress(body: Body) -> Body {
    Gzip {
        inner: body,
        encoder: Some(GzEncoder::new(Vec::new(), Compression::fast())),
    }
    .boxed_unsync()
}

struct Gzip {
    inner: Body,
    /// `None` once the gzip trailer has been written.
    encoder: Option<GzEncoder<Vec<u8>>>,
}

impl Gzip {
    /// Compresses `data` and returns what the encoder has produced, flushed.
    fn push(&mut self, data: &[u8]) -> io::Result<Bytes> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(Bytes::new());
        };
        encoder.write_all(data)?;
        encoder.flush()?;
        Ok(Bytes::from(std::mem::take(encoder.get_mut())))
    }

    /// Ends the gzip member (deflate end and the CRC/length trailer).
    fn finish(&mut self) -> io::Result<Bytes> {
        match self.encoder.take() {
            Some(encoder) => encoder.finish().map(Bytes::from),
            None => Ok(Bytes::new()),
        }
    }
}

impl HttpBody for Gzip {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.encoder.is_none() {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match this.push(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(err) => return Poll::Ready(Some(Err(err))),
                    },
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(err))) => {
                    // A cut stays a cut: no gzip trailer after it.
                    this.encoder = None;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(this.finish().map(Frame::data)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn reads_accept_encoding() {
        assert!(accepts_gzip(&headers("gzip")));
        assert!(accepts_gzip(&headers("br, gzip;q=0.5, deflate")));
        assert!(accepts_gzip(&headers("*")));
        assert!(!accepts_gzip(&headers("gzip;q=0")));
        assert!(!accepts_gzip(&headers("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
