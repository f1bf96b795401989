//! Committed tokens → client text: incremental UTF-8-safe detokenisation, stop strings (trimmed,
//! and held back while they might still be forming), eos and the token budget. Streaming and
//! non-streaming responses both come from this one path.

use edgespec_model::StreamDecoder;

/// Why a generation ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// eos or a stop string.
    Stop,
    /// The token budget (or the context window) ran out.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Text with stop strings cut out, produced incrementally.
#[derive(Debug)]
pub(crate) struct StopText {
    stop: Vec<String>,
    held: String,
}

impl StopText {
    /// `stop` strings (empty ones are ignored).
    pub fn new(stop: Vec<String>) -> Self {
        StopText {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds text; returns what may be shown now and whether a stop string was found (then the
    /// returned text ends right before it and everything after is discarded).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.first_stop() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep_from = self.partial_stop_start();
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// Whatever is held back (the generation ended without completing a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn first_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Smallest char boundary `k` such that `held[k..]` is a proper prefix of some stop string.
    fn partial_stop_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stop
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

/// Turns committed tokens into text deltas and decides when the generation is over.
#[derive(Debug)]
pub(crate) struct Output {
    decoder: StreamDecoder,
    text: StopText,
    eos: Vec<u32>,
    max_new: usize,
    produced: usize,
    ids: Vec<u32>,
    finished: Option<FinishReason>,
}

impl Output {
    /// An output for `max_new` tokens ending at any of `eos` or `stop`.
    pub fn new(decoder: StreamDecoder, eos: Vec<u32>, stop: Vec<String>, max_new: usize) -> Self {
        Output {
            decoder,
            text: StopText::new(stop),
            eos,
            max_new,
            produced: 0,
            ids: Vec::new(),
            finished: None,
        }
    }

    /// Adds one committed token; returns the text to show (possibly empty) and, once, why the
    /// generation ends. Tokens after the end are ignored.
    pub fn push(&mut self, token: u32) -> (String, Option<FinishReason>) {
        if self.finished.is_some() {
            return (String::new(), None);
        }
        self.produced += 1;
        self.ids.push(token);
        if self.eos.contains(&token) {
            return self.finish(String::new(), FinishReason::Stop);
        }
        let piece = self.decoder.push(token).unwrap_or_default();
        let (shown, stopped) = self.text.push(&piece);
        if stopped {
            self.finished = Some(FinishReason::Stop);
            return (shown, self.finished);
        }
        if self.produced >= self.max_new {
            return self.finish(shown, FinishReason::Length);
        }
        (shown, None)
    }

    /// Ends the generation early (e.g. the target's context is full); returns the held text.
    pub fn end(&mut self, reason: FinishReason) -> (String, Option<FinishReason>) {
        if self.finished.is_some() {
            return (String::new(), None);
        }
        self.finish(String::new(), reason)
    }

    /// Completion tokens counted so far (eos included, nothing after the end).
    pub fn produced(&self) -> usize {
        self.produced
    }

    /// The completion's token ids so far (eos included, nothing after the end).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn finish(
        &mut self,
        mut shown: String,
        reason: FinishReason,
    ) -> (String, Option<FinishReason>) {
        let rest = self.decoder.finish();
        let (tail, stopped) = self.text.push(&rest);
        shown.push_str(&tail);
        if !stopped {
            shown.push_str(&self.text.flush());
        }
        let reason = if stopped { FinishReason::Stop } else { reason };
        self.finished = Some(reason);
        (shown, Some(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, stopped) = s.push(p);
            out.push_str(&t);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&s.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_are_trimmed_even_across_pieces() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
        assert_eq!(
            run(&["\n\n", "xy"], &["a\n", "b x", "y"]),
            ("a\nb ".into(), true)
        );
        assert_eq!(run(&["END"], &["E", "N", "d"]), ("ENd".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn text_that_might_start_a_stop_string_is_held_back() {
        let mut s = StopText::new(vec!["STOP".into()]);
        assert_eq!(s.push("hello ST"), ("hello ".into(), false));
        assert_eq!(s.push("x"), ("STx".into(), false));
        // multi-byte characters stay whole
        let mut s = StopText::new(vec!["éé".into()]);
        assert_eq!(s.push("aé"), ("a".into(), false));
        assert_eq!(s.push("b"), ("éb".into(), false));
    }
}
