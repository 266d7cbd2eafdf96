//! Splitting a server-sent-events stream into lines, chunk by chunk.
//!
//! Written by hand rather than taken from an SSE crate: the host hands a
//! filter the response body in chunks of arbitrary size that must be passed
//! on at once (holding them back would stall the client's stream), so the
//! parser has to carry a partial line from one chunk to the next and must
//! not buffer the stream itself. The SSE crates available either own the
//! transport (reqwest/hyper/tokio streams) or collect whole events into
//! owned `String`s, which allocates per event. Here a line that lies whole
//! inside a chunk is handed out as a slice of that chunk; only the piece of
//! a line cut by a chunk boundary is copied, into one buffer that is reused
//! and bounded by `max_line`.

/// Appends one SSE event to `out`: an optional `event:` line, then `data`
/// as `data:` lines (one per line of `data`, so a multi-line payload stays
/// one event), then the blank line that ends the event. `data` is written
/// as given; JSON from serde_json has no raw line breaks.
pub fn write_event(out: &mut String, event: Option<&str>, data: &str) {
    if let Some(name) = event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
}

/// Shrink the carry buffer back after a line longer than this.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Splits bytes into lines ending in `\n`, `\r\n` or `\r` (the three line
/// ends SSE allows), across chunk boundaries.
#[derive(Debug)]
pub struct SseLineReader {
    /// The start of a line cut by a chunk boundary.
    partial: Vec<u8>,
    max_line: usize,
    /// The previous chunk ended with `\r`: a `\n` starting this one ends the
    /// same line, not an empty one.
    after_cr: bool,
    /// The current line outgrew `max_line`: its bytes are dropped until the
    /// next line end.
    discarding: bool,
    overflows: u32,
}

impl SseLineReader {
    /// A reader that drops lines longer than `max_line` bytes (counting them
    /// in [`overflows`](Self::overflows)) instead of growing without bound.
    pub fn new(max_line: usize) -> Self {
        SseLineReader {
            partial: Vec::new(),
            max_line,
            after_cr: false,
            discarding: false,
            overflows: 0,
        }
    }

    /// Feeds a chunk; `on_line` gets each complete line, without its line end.
    pub fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let piece = &rest[..end];
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(piece, &mut on_line);
            rest = &rest[next..];
        }
        self.carry(rest);
    }

    /// Ends the stream: an unterminated last line is handed out as a line.
    pub fn finish(&mut self, mut on_line: impl FnMut(&[u8])) {
        if !self.discarding && !self.partial.is_empty() {
            on_line(&self.partial);
        }
        self.partial.clear();
        self.discarding = false;
        self.after_cr = false;
    }

    /// Lines dropped for being longer than `max_line`.
    pub fn overflows(&self) -> u32 {
        self.overflows
    }

    fn end_line(&mut self, piece: &[u8], on_line: &mut impl FnMut(&[u8])) {
        if self.discarding {
            self.discarding = false;
        } else if self.partial.is_empty() {
            if piece.len() > self.max_line {
                self.overflows = self.overflows.saturating_add(1);
            } else {
                on_line(piece);
            }
        } else if self.partial.len().saturating_add(piece.len()) > self.max_line {
            self.overflows = self.overflows.saturating_add(1);
        } else {
            self.partial.extend_from_slice(piece);
            on_line(&self.partial);
        }
        self.partial.clear();
        if self.partial.capacity() > KEEP_CAPACITY {
            self.partial = Vec::new();
        }
    }

    fn carry(&mut self, piece: &[u8]) {
        if self.discarding || piece.is_empty() {
            return;
        }
        if self.partial.len().saturating_add(piece.len()) > self.max_line {
            self.overflows = self.overflows.saturating_add(1);
            self.discarding = true;
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]], max: usize) -> (Vec<String>, u32) {
        let mut r = SseLineReader::new(max);
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        r.finish(|l| out.push(String::from_utf8_lossy(l).into_owned()));
        (out, r.overflows())
    }

    #[test]
    fn all_three_line_ends_across_boundaries() {
        let (out, _) = lines(&[b"a\r", b"\nb\rc\n", b"\n", b"d"], 100);
        assert_eq!(out, ["a", "b", "c", "", "d"]);
        let (out, _) = lines(&[b"a\r", b"\r"], 100);
        assert_eq!(out, ["a", ""]);
    }

    #[test]
    fn written_events_read_back() {
        let mut out = String::new();
        write_event(&mut out, None, "{\"a\":1}");
        write_event(&mut out, Some("ping"), "x\ny");
        assert_eq!(out, "data: {\"a\":1}\n\nevent: ping\ndata: x\ndata: y\n\n");
        let (lines, _) = lines(&[out.as_bytes()], 100);
        assert_eq!(
            lines,
            [
                "data: {\"a\":1}",
                "",
                "event: ping",
                "data: x",
                "data: y",
                ""
            ]
        );
    }

    #[test]
    fn carries_partial_lines() {
        let (out, _) = lines(&[b"da", b"ta: x", b"yz\n\n"], 100);
        assert_eq!(out, ["data: xyz", ""]);
    }

    #[test]
    fn drops_overlong_lines_and_resumes() {
        let (out, overflows) = lines(&[b"0123", b"456789", b"abc\nok\n"], 8);
        assert_eq!(out, ["ok"]);
        assert_eq!(overflows, 1);
        let (out, overflows) = lines(&[b"0123456789\nok\n"], 8);
        assert_eq!(out, ["ok"]);
        assert_eq!(overflows, 1);
        let (out, overflows) = lines(&[b"0123", b"45678\nok"], 8);
        assert_eq!(out, ["ok"]);
        assert_eq!(overflows, 1);
    }
}
