//! SentencePiece-BPE as llama.cpp's "llama" (SPM) vocabulary runs it, so that ids match
//! llama.cpp exactly.
//!
//! GGUF stores pieces, scores and token types but no merge list. Encoding therefore:
//! 1. cuts special tokens (control / user-defined) out of the text ([`SpecialTokens`]),
//! 2. writes spaces as `▁` in each remaining fragment,
//! 3. starts from one symbol per character and repeatedly merges the adjacent pair whose
//!    concatenation is a vocabulary piece with the highest score (ties: leftmost first),
//! 4. emits each final symbol's id, or `<0xNN>` byte tokens when it is not a piece.
//!
//! Behaviour reference: llama.cpp `src/llama-vocab.cpp` (`llm_tokenizer_spm_session`,
//! `tokenizer_st_partition`, `token_to_piece`, `detokenize`).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use crate::special::{Fragment, SpecialTokens};
use crate::TokenizerError;

/// GGUF `tokenizer.ggml.token_type` values (SentencePiece's piece types).
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// A SentencePiece vocabulary as GGUF stores it (`tokenizer.ggml.*`).
#[derive(Clone, Debug, Default)]
pub struct SpmVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// One of [`token_type`] per token.
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

/// Token attributes as llama.cpp derives them from the token type (a bit set, because
/// llama.cpp adds CONTROL / UNUSED on top of the stored type for some tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attr(u8);

impl Attr {
    pub const NORMAL: Attr = Attr(1);
    pub const UNKNOWN: Attr = Attr(2);
    pub const CONTROL: Attr = Attr(4);
    pub const USER_DEFINED: Attr = Attr(8);
    pub const UNUSED: Attr = Attr(16);
    pub const BYTE: Attr = Attr(32);
    const NONE: Attr = Attr(0);

    fn from_token_type(t: i32) -> Attr {
        match t {
            token_type::NORMAL => Attr::NORMAL,
            token_type::UNKNOWN => Attr::UNKNOWN,
            token_type::CONTROL => Attr::CONTROL,
            token_type::USER_DEFINED => Attr::USER_DEFINED,
            token_type::UNUSED => Attr::UNUSED,
            token_type::BYTE => Attr::BYTE,
            _ => Attr::NONE,
        }
    }

    pub fn has(self, other: Attr) -> bool {
        self.0 & other.0 != 0
    }

    fn add(&mut self, other: Attr) {
        self.0 |= other.0;
    }

    /// Tokens that "unparse special" hides: control and unknown.
    pub fn is_hidden_special(self) -> bool {
        self.has(Attr::CONTROL) || self.has(Attr::UNKNOWN)
    }
}

/// Token texts llama.cpp treats as end-of-generation / fill-in-the-middle markers and forces
/// to CONTROL whatever their stored type (Gemma 3 stores `</s>` as user-defined, so this
/// changes how `</s>` tokenizes and detokenizes).
const FORCED_CONTROL_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

const SPACE_ESCAPE: &str = "\u{2581}";

/// A validated SentencePiece-BPE tokenizer.
#[derive(Debug)]
pub struct SpmTokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    attrs: Vec<Attr>,
    piece_to_id: PieceIndex,
    /// Indexed by byte value (256 entries).
    byte_tokens: Vec<Option<u32>>,
    specials: SpecialTokens,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    pub(crate) add_bos: bool,
    add_space_prefix: bool,
}

impl SpmTokenizer {
    pub fn new(vocab: SpmVocab) -> Result<SpmTokenizer, TokenizerError> {
        let SpmVocab {
            mut tokens,
            scores,
            token_types,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            add_bos,
            add_eos,
            add_space_prefix,
        } = vocab;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge { size: n });
        }
        for (field, found) in [("scores", scores.len()), ("token types", token_types.len())] {
            if found != n {
                return Err(TokenizerError::LengthMismatch {
                    field,
                    expected: n,
                    found,
                });
            }
        }
        for (field, id) in [
            ("bos_id", bos_id),
            ("eos_id", eos_id),
            ("unk_id", unk_id),
            ("pad_id", pad_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::SpecialIdOutOfRange {
                    field,
                    id: id.into(),
                    vocab_size: n,
                });
            }
        }
        if add_bos && bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_bos",
                token: "BOS",
            });
        }
        if add_eos && eos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_eos",
                token: "EOS",
            });
        }

        // llama.cpp renames empty pieces rather than rejecting the vocabulary.
        for (i, piece) in tokens.iter_mut().enumerate() {
            if piece.is_empty() {
                *piece = format!("[EMPTY_{i}]");
            }
        }

        let piece_to_id =
            PieceIndex::new(&tokens).map_err(|(first, second)| TokenizerError::DuplicateToken {
                piece: tokens[second as usize].clone(),
                first,
                second,
            })?;

        let mut attrs: Vec<Attr> = token_types
            .iter()
            .map(|&t| Attr::from_token_type(t))
            .collect();
        for text in FORCED_CONTROL_TEXTS {
            if let Some(id) = piece_to_id.get(&tokens, text) {
                attrs[id as usize].add(Attr::CONTROL);
            }
        }
        for (piece, attr) in tokens.iter().zip(attrs.iter_mut()) {
            if attr.has(Attr::CONTROL) && piece.contains("unused") {
                attr.add(Attr::UNUSED);
            }
        }
        for (i, (piece, attr)) in tokens.iter().zip(&attrs).enumerate() {
            if attr.has(Attr::BYTE) && parse_byte_piece(piece).is_none() {
                return Err(TokenizerError::BadByteToken {
                    id: i as u32,
                    piece: piece.clone(),
                });
            }
        }

        let byte_tokens = (0..=255u8)
            .map(|b| byte_token_id(&piece_to_id, &tokens, b))
            .collect();
        let specials = SpecialTokens::new(&tokens, &attrs);
        Ok(SpmTokenizer {
            pieces: tokens,
            scores,
            attrs,
            piece_to_id,
            byte_tokens,
            specials,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            add_bos,
            add_space_prefix,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id_of(&self, piece: &str) -> Option<u32> {
        self.piece_to_id.get(&self.pieces, piece)
    }

    pub(crate) fn attr(&self, id: u32) -> Option<Attr> {
        self.attrs.get(id as usize).copied()
    }

    /// Same ids as llama.cpp's `llama_tokenize(text, add_special, parse_special)` when the
    /// vocabulary's `add_bos` equals `add_bos` here and it does not ask for EOS (Gemma).
    /// `add_bos` always means "start with BOS"; EOS is never appended.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.push(self.bos_id.ok_or(TokenizerError::NoBosToken)?);
        }
        let mut after_special = true;
        for fragment in self.specials.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(raw) => {
                    let mut escaped = String::with_capacity(raw.len() + 8);
                    if self.add_space_prefix && after_special {
                        escaped.push_str(SPACE_ESCAPE);
                    }
                    escaped.push_str(&raw.replace(' ', SPACE_ESCAPE));
                    self.encode_fragment(&escaped, &mut out)?;
                    after_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Greedy best-score pair merging over one fragment (spaces already escaped).
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut merger = Merger::new(self, text);
        merger.run();
        for symbol in merger.final_symbols() {
            match self.piece_to_id.get(&self.pieces, symbol) {
                Some(id) => out.push(id),
                None => {
                    for &byte in symbol.as_bytes() {
                        let id = self.byte_tokens[byte as usize]
                            .ok_or(TokenizerError::MissingByteToken { byte })?;
                        out.push(id);
                    }
                }
            }
        }
        Ok(())
    }

    /// The bytes llama.cpp's `token_to_piece` gives: `▁` as space, byte tokens as their byte,
    /// control/user-defined/unknown tokens as their text — except that with `skip_special`
    /// control and unknown tokens give nothing. `None` for an id outside the vocabulary.
    pub fn piece_bytes(&self, id: u32, skip_special: bool) -> Option<Vec<u8>> {
        let attr = self.attr(id)?;
        let text = &self.pieces[id as usize];
        if skip_special && attr.is_hidden_special() {
            return Some(Vec::new());
        }
        let bytes = if attr.is_hidden_special() || attr.has(Attr::USER_DEFINED) {
            text.as_bytes().to_vec()
        } else if attr.has(Attr::NORMAL) {
            text.replace(SPACE_ESCAPE, " ").into_bytes()
        } else if attr.has(Attr::BYTE) {
            vec![parse_byte_piece(text)?]
        } else {
            Vec::new()
        };
        Some(bytes)
    }

    /// llama.cpp's `llama_detokenize(remove_special = false, unparse_special = !skip_special)`.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        // The space a prefix-adding vocabulary put in front of the first word comes back out.
        let mut strip_leading_space = self.add_space_prefix;
        for &id in ids {
            let piece =
                self.piece_bytes(id, skip_special)
                    .ok_or(TokenizerError::UnknownTokenId {
                        id,
                        vocab_size: self.vocab_size(),
                    })?;
            let piece = match piece.split_first() {
                Some((b' ', rest)) if strip_leading_space => rest,
                _ => &piece[..],
            };
            strip_leading_space = false;
            out.extend_from_slice(piece);
        }
        Ok(out)
    }
}

/// `<0xNN>` → `NN`.
pub(crate) fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The token for a raw byte: `<0xNN>`, else (as llama.cpp falls back) the byte itself as a
/// one-character piece.
fn byte_token_id(index: &PieceIndex, pieces: &[String], byte: u8) -> Option<u32> {
    index.get(pieces, &format!("<0x{byte:02X}>")).or_else(|| {
        std::str::from_utf8(&[byte])
            .ok()
            .and_then(|s| index.get(pieces, s))
    })
}

/// Piece text → id without a second copy of the texts: a hash table of ids, each compared
/// through the piece list it indexes (the 262k-piece Gemma vocabulary would otherwise be held
/// twice, about 15 MB).
#[derive(Debug)]
struct PieceIndex {
    ids: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl PieceIndex {
    /// Indexes `pieces`; a piece listed twice is `Err((first id, second id))`.
    fn new(pieces: &[String]) -> Result<PieceIndex, (u32, u32)> {
        let hasher = std::hash::RandomState::new();
        let mut ids = hashbrown::HashTable::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            let hash = hasher.hash_one(piece.as_str());
            match ids.entry(
                hash,
                |&id: &u32| pieces[id as usize] == *piece,
                |&id: &u32| hasher.hash_one(pieces[id as usize].as_str()),
            ) {
                hashbrown::hash_table::Entry::Occupied(first) => {
                    return Err((*first.get(), i as u32));
                }
                hashbrown::hash_table::Entry::Vacant(slot) => {
                    slot.insert(i as u32);
                }
            }
        }
        Ok(PieceIndex { ids, hasher })
    }

    /// The id of `piece` in `pieces` (the list this index was built from).
    fn get(&self, pieces: &[String], piece: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(piece);
        self.ids
            .find(hash, |&id| pieces[id as usize] == piece)
            .copied()
    }
}

/// One symbol of the merge chain: a byte range of the fragment, linked to its neighbours.
/// A symbol merged into its left neighbour keeps `len == 0`.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` with its right neighbour `right`. `size` is the merged byte
/// length when the candidate was made; a mismatch later means one side has changed since.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Candidate {
    /// Highest score first; equal scores: leftmost first. `partial_cmp` (not `total_cmp`) so
    /// that -0.0 ties with 0.0 as in C++.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

struct Merger<'a> {
    vocab: &'a SpmTokenizer,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Candidate>,
}

impl<'a> Merger<'a> {
    fn new(vocab: &'a SpmTokenizer, text: &'a str) -> Merger<'a> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, ch) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: index.checked_sub(1),
                next: Some(index + 1),
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        Merger {
            vocab,
            text,
            symbols,
            queue: BinaryHeap::new(),
        }
    }

    fn run(&mut self) {
        for right in 1..self.symbols.len() {
            self.propose(Some(right - 1), Some(right));
        }
        while let Some(best) = self.queue.pop() {
            let (left, right) = (self.symbols[best.left], self.symbols[best.right]);
            if left.len == 0 || right.len == 0 || left.len + right.len != best.size {
                continue; // stale: one side was merged elsewhere since
            }
            self.symbols[best.left].len += right.len;
            self.symbols[best.right].len = 0;
            self.symbols[best.left].next = right.next;
            if let Some(next) = right.next {
                self.symbols[next].prev = Some(best.left);
            }
            self.propose(left.prev, Some(best.left));
            self.propose(Some(best.left), right.next);
        }
    }

    fn propose(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let start = self.symbols[left].start;
        let size = self.symbols[left].len + self.symbols[right].len;
        let merged = &self.text[start..start + size];
        if let Some(id) = self.vocab.piece_to_id.get(&self.vocab.pieces, merged) {
            self.queue.push(Candidate {
                score: self.vocab.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }

    /// The surviving symbols' texts, left to right.
    fn final_symbols(&self) -> impl Iterator<Item = &'a str> + '_ {
        let mut cursor = if self.symbols.is_empty() {
            None
        } else {
            Some(0)
        };
        std::iter::from_fn(move || {
            let symbol = self.symbols[cursor?];
            cursor = symbol.next;
            Some(&self.text[symbol.start..symbol.start + symbol.len])
        })
    }
}
