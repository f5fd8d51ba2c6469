//! Turning generated token ids into text one at a time without ever splitting a UTF-8
//! character: byte-fallback tokens carry single bytes of a multi-byte character, so bytes are
//! held back until the character they start is complete.

use crate::Tokenizer;

/// Incremental detokenizer. Independent of any tokenizer: pass the tokenizer to each `push`.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}

impl StreamDecoder {
    /// Control tokens (`<end_of_turn>`, `<eos>`, ...) produce no text.
    pub fn new() -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special: true,
        }
    }

    /// Control tokens produce their text (`<end_of_turn>`), as `decode(ids, false)` does.
    pub fn keeping_special() -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special: false,
        }
    }

    /// Adds one token and returns the text that is now complete. An id outside the
    /// vocabulary yields U+FFFD so that the mistake is visible in the output.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        match tokenizer.piece_bytes(id, self.skip_special) {
            Some(bytes) => self.pending.extend_from_slice(&bytes),
            None => {
                let mut out = self.take_valid();
                out.push(char::REPLACEMENT_CHARACTER);
                return out;
            }
        }
        self.take_valid()
    }

    /// Whatever is still held back (an unfinished character), with invalid bytes as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Emits every complete character; bytes that can never form one become U+FFFD; an
    /// incomplete character at the end stays pending.
    fn take_valid(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Safe: from_utf8 just said these bytes are valid.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after; // an unfinished character: wait for more bytes
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}
