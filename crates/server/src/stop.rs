//! Stop strings over streamed text: text that might be the start of a stop string is held
//! back until it either completes one (then it and everything after is dropped) or cannot.

pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> StopFilter {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text now safe to emit and whether a stop string completed.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s)).min();
        if let Some(at) = first_stop {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        let keep = self.partial_match_len();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held-back text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of the held text that begins some stop string.
    fn partial_match_len(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (start, _) in self.held.char_indices() {
                let tail = &self.held[start..];
                if tail.len() <= longest {
                    break;
                }
                if tail.len() < stop.len() && stop.starts_with(tail) {
                    longest = tail.len();
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut filter = StopFilter::new(&stops);
        let mut text = String::new();
        for piece in pieces {
            let (out, stopped) = filter.push(piece);
            text.push_str(&out);
            if stopped {
                return (text, true);
            }
        }
        text.push_str(&filter.finish());
        (text, false)
    }

    #[test]
    fn stop_split_over_pieces_is_cut() {
        assert_eq!(feed(&["END"], &["ab E", "N", "Dxx"]), ("ab ".into(), true));
    }

    #[test]
    fn failed_partial_match_is_released() {
        assert_eq!(feed(&["END"], &["a E", "Nx"]), ("a ENx".into(), false));
        let stops = vec!["END".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("a EN").0, "a ");
        assert_eq!(f.finish(), "EN");
    }

    #[test]
    fn multibyte_text_is_not_split() {
        assert_eq!(feed(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(feed(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}
