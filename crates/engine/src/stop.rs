//! Stop strings over streamed text. A stop string can arrive split across tokens, so text that
//! could be the start of one is held back until it either completes the stop string (and is
//! dropped) or stops matching (and is released).

pub struct StopStringFilter {
    stops: Vec<String>,
    pending: String,
}

/// What one piece of streamed text turned into.
pub struct Filtered {
    /// Text that is safe to show now.
    pub emit: String,
    /// A stop string was completed; nothing after it may be shown.
    pub stopped: bool,
}

impl StopStringFilter {
    pub fn new(stops: &[String]) -> Self {
        StopStringFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Filtered {
        self.pending.push_str(text);
        if let Some(at) = self.earliest_stop() {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return Filtered {
                emit,
                stopped: true,
            };
        }
        let held = self.held_suffix_len();
        let release = self.pending.len() - held;
        let emit = self.pending[..release].to_string();
        self.pending.drain(..release);
        Filtered {
            emit,
            stopped: false,
        }
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
    }

    /// Length of the longest tail of `pending` that is a proper prefix of some stop string.
    fn held_suffix_len(&self) -> usize {
        let text = self.pending.as_bytes();
        let mut best = 0;
        for stop in &self.stops {
            let longest = (stop.len() - 1).min(text.len());
            for len in (best + 1..=longest).rev() {
                let start = text.len() - len;
                if self.pending.is_char_boundary(start)
                    && stop.as_bytes().starts_with(&text[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopStringFilter::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let r = f.push(p);
            out.push_str(&r.emit);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn text_without_stops_passes_through() {
        assert_eq!(run(&[], &["ab", "cd"]), ("abcd".into(), false));
        assert_eq!(run(&["xyz"], &["ab", "cd"]), ("abcd".into(), false));
    }

    #[test]
    fn stop_inside_one_piece_cuts_there() {
        assert_eq!(
            run(&["STOP"], &["hello STOP world"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn stop_split_across_pieces_is_caught() {
        assert_eq!(
            run(&["STOP"], &["hi S", "T", "OP", "after"]),
            ("hi ".into(), true)
        );
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let stops = vec!["STOP".to_string()];
        let mut f = StopStringFilter::new(&stops);
        assert_eq!(f.push("a ST").emit, "a ");
        assert_eq!(f.push("ART").emit, "START");
        assert_eq!(f.push("xx ST").emit, "xx ");
        assert_eq!(f.finish(), "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbbya"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_never_split_inside_a_char() {
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}
