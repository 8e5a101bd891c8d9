//! Counting NDJSON lines in a byte stream cut at arbitrary points.

/// Counts non-empty lines: what the manifest's `count` (resources) is compared with. A blank
/// line (some servers end files with one) is no resource; a last line without a newline is.
#[derive(Debug, Default, Clone)]
pub(crate) struct LineCounter {
    lines: u64,
    /// The current, unterminated line has at least one byte.
    open: bool,
}

impl LineCounter {
    /// Counts the lines `bytes` completes and returns how many.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> u64 {
        let before = self.lines;
        let mut start = 0;
        for newline in memchr::memchr_iter(b'\n', bytes) {
            if newline > start || self.open {
                self.lines += 1;
            }
            self.open = false;
            start = newline + 1;
        }
        if start < bytes.len() {
            self.open = true;
        }
        self.lines - before
    }

    /// The total, counting an unterminated last line.
    pub(crate) fn finish(&self) -> u64 {
        self.lines + u64::from(self.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_in_pieces(text: &[u8], piece: usize) -> u64 {
        let mut counter = LineCounter::default();
        for chunk in text.chunks(piece) {
            counter.feed(chunk);
        }
        counter.finish()
    }

    #[test]
    fn counts_lines_wherever_the_stream_is_cut() {
        let text = b"{\"a\":1}\n{\"b\":2}\n\n{\"c\":3}";
        for piece in 1..=text.len() {
            assert_eq!(count_in_pieces(text, piece), 3, "pieces of {piece}");
        }
        assert_eq!(count_in_pieces(b"x\ny\n", 1), 2);
        assert_eq!(count_in_pieces(b"", 1), 0);
        assert_eq!(count_in_pieces(b"\n\n\n", 2), 0);
    }

    #[test]
    fn feed_returns_the_lines_it_completed() {
        let mut counter = LineCounter::default();
        assert_eq!(counter.feed(b"ab"), 0);
        assert_eq!(counter.feed(b"c\nd"), 1);
        assert_eq!(counter.feed(b"\n\n"), 1);
        assert_eq!(counter.finish(), 2);
    }
}
