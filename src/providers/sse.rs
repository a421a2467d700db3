//! Server-sent events, parsed by the WHATWG rules without an allocation per event:
//! every streamed chunk of every provider passes through here.
//!
//! It replaced `eventsource-stream`, which copies the rest of its buffer after each
//! line (`String::split_off`) and allocates every event's strings. On an upstream
//! read holding 22 OpenAI chunks that came to 6,400 instructions per event
//! (callgrind); this parser takes 845, and 0.13 µs against 1.03
//! (`cargo bench --bench hot_paths -- sse_parse`; BENCHMARKS.md). A test checks both
//! give the same events for generated streams cut into random reads. (The crate also
//! panics on a stream that starts with a BOM; this parser skips it.)
//!
//! ```
//! use switchboard::providers::sse::SseParser;
//!
//! let mut p = SseParser::default();
//! p.push(b"event: delta\ndata: {\"a\":");
//! assert!(p.next_event().unwrap().is_none()); // the event is not complete yet
//! p.push(b"1}\n\n");
//! let ev = p.next_event().unwrap().unwrap();
//! assert_eq!((ev.event, ev.data), ("delta", "{\"a\":1}"));
//! assert!(p.next_event().unwrap().is_none());
//! ```

/// One dispatched event, borrowed from the parser until the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, `"message"` when the event had none.
    pub event: &'a str,
    /// The `data:` lines joined with `\n`.
    pub data: &'a str,
}

/// Why a stream cannot be read as events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line was not UTF-8.
    #[error("the event stream is not UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
    /// A line still unended, or an event's data, grew past [`MAX_EVENT`] bytes.
    #[error("an event stream line or event is longer than {} MiB", MAX_EVENT >> 20)]
    TooLong,
}

/// The most the parser buffers for one line, and for one event's data (16 MiB):
/// far above any real event (a large tool call's arguments arrive in many small
/// deltas), and a bound on the memory an upstream that never ends its line, or its
/// event, can take.
pub const MAX_EVENT: usize = 16 << 20;

/// An incremental SSE parser: [`push`](Self::push) bytes as they arrive, then take
/// events with [`next_event`](Self::next_event) until it returns `None`.
///
/// Lines end with `\n`, `\r\n` or `\r`; a leading UTF-8 BOM is skipped; `:` lines
/// are comments; one space after a field's colon is dropped; an event ends at a blank
/// line and is dispatched only if it had a `data` field. An event cut off by the end
/// of the stream is never dispatched. `id` and `retry` are read past (no caller
/// reconnects). A line or an event's data longer than [`MAX_EVENT`] is an error.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Received bytes; those before `start` are consumed.
    buf: Vec<u8>,
    start: usize,
    /// Bytes after `start` already searched for a line end: a long line is scanned
    /// once, not again at every read (an upstream could make that quadratic).
    scanned: usize,
    /// Bytes searched for line ends in all (tests check the scan is linear).
    #[cfg(test)]
    searched: usize,
    /// The event being built (or the one last returned, cleared on the next call).
    event: String,
    data: String,
    dispatched: bool,
    /// Whether the BOM check at the stream's start is done.
    started: bool,
    /// No more bytes will come: a final `\r` ends its line.
    ended: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        } else if self.start >= 4096 && self.start * 2 >= self.buf.len() {
            // Move a partial line to the front, at most once per half buffer.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Marks the end of the stream, after which a final `\r` ends its line.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// Whether [`end`](Self::end) was called.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The next complete event, or `None` until more bytes are pushed.
    pub fn next_event(&mut self) -> Result<Option<SseEvent<'_>>, SseError> {
        if std::mem::take(&mut self.dispatched) {
            self.event.clear();
            self.data.clear();
        }
        if !self.started {
            let rest = &self.buf[self.start..];
            if rest.len() < BOM.len() && BOM.starts_with(rest) && !self.ended {
                return Ok(None);
            }
            if rest.starts_with(BOM) {
                self.start += BOM.len();
            }
            self.started = true;
        }
        loop {
            let rest = &self.buf[self.start..];
            #[cfg(test)]
            {
                self.searched += rest.len() - self.scanned;
            }
            let Some(i) = memchr::memchr2(b'\n', b'\r', &rest[self.scanned..]) else {
                if rest.len() > MAX_EVENT {
                    return Err(SseError::TooLong);
                }
                self.scanned = rest.len();
                return Ok(None);
            };
            let i = self.scanned + i;
            let mut consumed = i + 1;
            if rest[i] == b'\r' {
                match rest.get(i + 1) {
                    Some(b'\n') => consumed += 1,
                    Some(_) => {}
                    // A `\n` may follow in the next read.
                    None if !self.ended => {
                        self.scanned = i;
                        return Ok(None);
                    }
                    None => {}
                }
            }
            let line = std::str::from_utf8(&rest[..i]).map_err(SseError::NotUtf8)?;
            self.start += consumed;
            self.scanned = 0;
            if line.is_empty() {
                if self.data.is_empty() {
                    self.event.clear();
                    continue;
                }
                if self.data.ends_with('\n') {
                    self.data.pop();
                }
                self.dispatched = true;
                let event = if self.event.is_empty() {
                    "message"
                } else {
                    &self.event
                };
                return Ok(Some(SseEvent {
                    event,
                    data: &self.data,
                }));
            }
            let (field, value) = match line.find(':') {
                Some(0) => continue,
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(' ').unwrap_or(v))
                }
                None => (line, ""),
            };
            match field {
                "data" => {
                    if self.data.len() + value.len() + 1 > MAX_EVENT {
                        return Err(SseError::TooLong);
                    }
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "event" => {
                    self.event.clear();
                    self.event.push_str(value);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Some(e) = p.next_event().unwrap() {
            out.push((e.event.to_string(), e.data.to_string()));
        }
        out
    }

    fn parse(input: &[u8]) -> Vec<(String, String)> {
        let mut p = SseParser::default();
        p.push(input);
        p.end();
        all(&mut p)
    }

    fn ev(event: &str, data: &str) -> (String, String) {
        (event.to_string(), data.to_string())
    }

    #[test]
    fn line_endings_fields_and_comments() {
        let got = parse(
            b"\xEF\xBB\xBF: a comment\r\nevent: ping\r\ndata: 1\r\n\r\ndata:2\rdata:  3\r\rdata\n\nid: 7\nretry: 9\n\n",
        );
        assert_eq!(
            got,
            vec![ev("ping", "1"), ev("message", "2\n 3"), ev("message", "")]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_its_type_is_forgotten() {
        assert_eq!(parse(b"event: a\n\ndata: x\n\n"), vec![ev("message", "x")]);
    }

    #[test]
    fn an_event_cut_off_by_the_end_is_dropped() {
        assert_eq!(parse(b"data: x\n\ndata: y\n"), vec![ev("message", "x")]);
    }

    #[test]
    fn a_cr_split_from_its_lf_is_one_line_end() {
        let mut p = SseParser::default();
        p.push(b"data: x\r");
        assert_eq!(all(&mut p), vec![]);
        p.push(b"\n\r");
        assert_eq!(all(&mut p), vec![]);
        p.push(b"\n");
        assert_eq!(all(&mut p), vec![ev("message", "x")]);
        // A final `\r` ends its line once the stream has ended.
        p.push(b"data: y\r\r");
        assert_eq!(all(&mut p), vec![]);
        p.end();
        assert_eq!(all(&mut p), vec![ev("message", "y")]);
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_events() {
        let input = "\u{feff}data: {\"é\":\"日本\"}\n\nevent: x\ndata: a\ndata: b\r\n\r\n: c\n\ndata: z\r\r";
        let whole = parse(input.as_bytes());
        assert_eq!(whole.len(), 3);
        for cut in 0..input.len() {
            let mut p = SseParser::default();
            p.push(&input.as_bytes()[..cut]);
            let mut got = all(&mut p);
            p.push(&input.as_bytes()[cut..]);
            p.end();
            got.extend(all(&mut p));
            assert_eq!(got, whole, "split at {cut}");
        }
    }

    #[test]
    fn a_line_that_never_ends_is_an_error_not_unbounded_memory() {
        let mut p = SseParser::default();
        p.push(b"data: ");
        let block = vec![b'x'; 1 << 20];
        for _ in 0..15 {
            p.push(&block);
            assert_eq!(p.next_event(), Ok(None));
        }
        // Exactly MAX_EVENT bytes is still a line that may end.
        p.push(&block[6..]);
        assert_eq!(p.next_event(), Ok(None));
        p.push(b"x");
        assert_eq!(p.next_event(), Err(SseError::TooLong));
    }

    #[test]
    fn an_event_that_never_ends_is_an_error_not_unbounded_memory() {
        // Short `data` lines, never a blank line: the event's data is bounded too.
        let mut p = SseParser::default();
        let line = format!("data: {}\n", "y".repeat(1023));
        let block = line.repeat(1024); // 1 MiB of data per push
        for _ in 0..16 {
            p.push(block.as_bytes());
            assert_eq!(p.next_event(), Ok(None));
        }
        // Exactly MAX_EVENT bytes of data so far; one more line is too many.
        p.push(b"data: z\n");
        assert_eq!(p.next_event(), Err(SseError::TooLong));
    }

    /// A long line arriving in many reads is searched once: rescanning it from its
    /// start at every read let an upstream make the parser quadratic.
    #[test]
    fn a_long_line_is_scanned_once() {
        let mut p = SseParser::default();
        p.push(b"data: ");
        let piece = [b'x'; 1024];
        for _ in 0..4096 {
            p.push(&piece);
            assert_eq!(p.next_event(), Ok(None));
        }
        p.push(b"\n\n");
        let ev = p.next_event().unwrap().unwrap();
        assert_eq!(ev.data.len(), 4096 * 1024);
        let total = 6 + 4096 * 1024 + 2;
        assert!(
            p.searched <= 2 * total,
            "searched {} of {total} bytes",
            p.searched
        );
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut p = SseParser::default();
        p.push(b"data: \xff\n\n");
        assert!(p.next_event().is_err());
    }

    #[test]
    fn a_partial_line_survives_compaction() {
        // Reads cut mid-line, so the buffer is never empty between them.
        let input: String = (0..500).map(|i| format!("data: {i:0>40}\n\n")).collect();
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for read in input.as_bytes().chunks(100) {
            p.push(read);
            got.extend(all(&mut p));
            assert!(p.buf.len() < 8192 + 100, "the buffer is compacted");
        }
        let expected: Vec<_> = (0..500)
            .map(|i| ev("message", &format!("{i:0>40}")))
            .collect();
        assert_eq!(got, expected);
    }

    /// The same events as `eventsource-stream` (the crate this replaced) for
    /// generated streams: mixed line endings, comments, unknown fields, multi-line
    /// data, fields without a colon or space, cut into random reads.
    #[test]
    fn agrees_with_eventsource_stream() {
        use eventsource_stream::Eventsource;
        use futures_util::{FutureExt, StreamExt};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ends = ["\n", "\r\n", "\r"];
        let lines = [
            "data: {\"a\":1}",
            "data:x",
            "data",
            "data:  two spaces",
            "event: delta",
            "event:",
            ": comment",
            "id: 3",
            "retry: 10",
            "other: y",
            "data: é日本",
        ];
        for _ in 0..300 {
            // No BOM: eventsource-stream panics on one (it slices `&s[1..]` into
            // the 3-byte character); the BOM tests above cover ours.
            let mut input = String::new();
            for _ in 0..rng.random_range(1..12) {
                for _ in 0..rng.random_range(0..4) {
                    input.push_str(lines[rng.random_range(0..lines.len())]);
                    input.push_str(ends[rng.random_range(0..ends.len())]);
                }
                // The blank line that ends the event; `\n` so that a `\r` before
                // it cannot merge with it into one `\r\n`.
                input.push('\n');
            }
            let bytes = input.into_bytes();
            let mut reads = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let n = rng.random_range(1..=(bytes.len() - at).min(40));
                reads.push(bytes[at..at + n].to_vec());
                at += n;
            }
            // Every read is ready at once, so the stream completes in one poll.
            let theirs: Vec<(String, String)> =
                futures_util::stream::iter(reads.clone().into_iter().map(Ok::<_, std::io::Error>))
                    .eventsource()
                    .map(|e| {
                        let e = e.unwrap();
                        (e.event, e.data)
                    })
                    .collect::<Vec<_>>()
                    .now_or_never()
                    .unwrap();
            let mut p = SseParser::default();
            let mut ours = Vec::new();
            for r in &reads {
                p.push(r);
                ours.extend(all(&mut p));
            }
            p.end();
            ours.extend(all(&mut p));
            assert_eq!(ours, theirs, "input {:?}", String::from_utf8_lossy(&bytes));
        }
    }
}
