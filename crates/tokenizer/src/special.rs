//! Cutting special tokens out of the text before SentencePiece sees it, with the result of
//! llama.cpp's `tokenizer_st_partition`.
//!
//! llama.cpp takes the special tokens longest text first and, for each, splits every
//! still-unclaimed stretch of text at its leftmost non-overlapping occurrences. Scanning the
//! text once per special token is slow for a vocabulary with thousands of them, so we find all
//! occurrences in one pass (hash lookups of the few text lengths specials have, only at bytes
//! that can start one) and then claim them in llama.cpp's order: by token priority, then by
//! position, skipping any occurrence that overlaps text already claimed. That gives the same
//! cut, because an occurrence llama.cpp's search would find is exactly one lying wholly in
//! unclaimed text and not overlapping an earlier claim of the same token.

use std::collections::HashMap;

use crate::spm::Attr;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

#[derive(Debug)]
struct Special {
    id: u32,
    /// Position in llama.cpp's processing order (longest text first).
    priority: usize,
    /// Control and unknown tokens are only cut out when parsing specials; user-defined
    /// tokens always are.
    needs_parse_special: bool,
}

#[derive(Debug)]
pub(crate) struct SpecialTokens {
    by_text: HashMap<String, Special>,
    /// For each possible first byte, the text lengths (descending) of specials starting with it.
    lengths_by_first_byte: Vec<Vec<usize>>,
}

impl SpecialTokens {
    /// Specials are tokens with the control, user-defined or unknown attribute.
    pub fn new(pieces: &[String], attrs: &[Attr]) -> SpecialTokens {
        let mut ids: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&id| {
                let attr = attrs[id as usize];
                attr.has(Attr::CONTROL) || attr.has(Attr::USER_DEFINED) || attr.has(Attr::UNKNOWN)
            })
            .collect();
        // Longest first as llama.cpp; equal lengths by id (llama.cpp leaves those unordered).
        ids.sort_by_key(|&id| (std::cmp::Reverse(pieces[id as usize].len()), id));

        let mut by_text = HashMap::with_capacity(ids.len());
        let mut lengths_by_first_byte = vec![Vec::new(); 256];
        for (priority, &id) in ids.iter().enumerate() {
            let text = &pieces[id as usize];
            let special = Special {
                id,
                priority,
                needs_parse_special: attrs[id as usize].is_hidden_special(),
            };
            by_text.entry(text.clone()).or_insert(special);
            let lengths: &mut Vec<usize> = &mut lengths_by_first_byte[text.as_bytes()[0] as usize];
            if !lengths.contains(&text.len()) {
                lengths.push(text.len()); // ids are sorted longest first, so this stays descending
            }
        }
        SpecialTokens {
            by_text,
            lengths_by_first_byte,
        }
    }

    /// Splits `text` into raw fragments and special tokens, in order.
    pub fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        // (priority, start, len, id) of every occurrence.
        let mut occurrences: Vec<(usize, usize, usize, u32)> = Vec::new();
        let bytes = text.as_bytes();
        for (start, _) in text.char_indices() {
            for &len in &self.lengths_by_first_byte[bytes[start] as usize] {
                let Some(candidate) = text.get(start..start + len) else {
                    continue;
                };
                if let Some(special) = self.by_text.get(candidate) {
                    if parse_special || !special.needs_parse_special {
                        occurrences.push((special.priority, start, len, special.id));
                    }
                }
            }
        }
        occurrences.sort_unstable();

        let mut claimed = vec![false; text.len()];
        let mut cuts: Vec<(usize, usize, u32)> = Vec::new();
        for (_, start, len, id) in occurrences {
            let span = &mut claimed[start..start + len];
            if span.iter().any(|&c| c) {
                continue;
            }
            span.fill(true);
            cuts.push((start, len, id));
        }
        cuts.sort_unstable();

        let mut fragments = Vec::with_capacity(cuts.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in cuts {
            if start > pos {
                fragments.push(Fragment::Text(&text[pos..start]));
            }
            fragments.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < text.len() {
            fragments.push(Fragment::Text(&text[pos..]));
        }
        fragments
    }
}
