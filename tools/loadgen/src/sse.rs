//! An incremental reader of Server-Sent Events `data:` payloads.
//!
//! Written by hand rather than taken from an SSE crate: the load generator
//! needs only the `data` field of each event, fed chunk by chunk from hyper
//! frames that split lines anywhere, and the event-source crates bring their
//! own HTTP client. Lines end with `\n` or `\r\n` (what OpenAI-compatible
//! servers and Envoy send); a bare `\r` line ending is not recognised.

/// Longest line kept, in bytes; a longer line is dropped (and counted) so a
/// hostile stream cannot grow memory without bound.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Splits a byte stream into SSE events and yields each event's data.
#[derive(Debug, Default)]
pub struct SseReader {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    overlong: bool,
    /// Lines dropped because they exceeded [`MAX_LINE_BYTES`].
    pub dropped_lines: u64,
}

impl SseReader {
    /// Feeds a chunk; pushes the data of every event it completes onto `out`
    /// (multi-line data joined by `\n`, as the SSE specification says).
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(pos);
            self.push_bytes(head);
            rest = &tail[1..];
            self.end_line(out);
        }
        self.push_bytes(rest);
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if self.overlong {
            return;
        }
        if self.line.len().saturating_add(bytes.len()) > MAX_LINE_BYTES {
            self.overlong = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        if std::mem::take(&mut self.overlong) {
            self.dropped_lines = self.dropped_lines.saturating_add(1);
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                out.push(std::mem::take(&mut self.data));
            }
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // comment
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
        // Keep the allocation for the next line.
        line.clear();
        self.line = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut reader = SseReader::default();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.feed(chunk, &mut out);
        }
        out
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let text = include_str!("../tests/fixtures/stream_ok.sse");
        let whole = read_all(&[text.as_bytes()]);
        assert_eq!(whole.last().map(String::as_str), Some("[DONE]"));
        assert!(whole.len() >= 3);
        for split in 1..text.len() {
            let (a, b) = text.as_bytes().split_at(split);
            assert_eq!(read_all(&[a, b]), whole, "split at {split}");
        }
    }

    #[test]
    fn crlf_comments_multiline_and_unterminated_events() {
        let out = read_all(&[
            b": keep-alive\r\n\r\ndata: a\r\ndata: b\r\n\r\nevent: x\ndata:c\n\ndata: cut",
        ]);
        assert_eq!(out, vec!["a\nb".to_string(), "c".to_string()]);
    }

    #[test]
    fn an_overlong_line_is_dropped_not_kept() {
        let mut reader = SseReader::default();
        let mut out = Vec::new();
        reader.feed(b"data: ", &mut out);
        reader.feed(&vec![b'x'; MAX_LINE_BYTES + 1], &mut out);
        reader.feed(b"\n\ndata: ok\n\n", &mut out);
        assert_eq!(out, vec!["ok".to_string()]);
        assert_eq!(reader.dropped_lines, 1);
    }
}
