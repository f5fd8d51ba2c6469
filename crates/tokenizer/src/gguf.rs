//! Reading the `tokenizer.ggml.*` metadata of a GGUF file into an [`SpmVocab`], with
//! llama.cpp's defaults for keys a file leaves out.

use gemma_formats::{GgufError, GgufFile};

use crate::spm::{token_type, SpmVocab};
use crate::TokenizerError;

const MODEL: &str = "tokenizer.ggml.model";
const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPES: &str = "tokenizer.ggml.token_type";

pub fn spm_vocab_from_gguf(file: &GgufFile) -> Result<SpmVocab, TokenizerError> {
    let model = file
        .get_str(MODEL)?
        .ok_or(TokenizerError::MissingKey { key: MODEL })?;
    if model != "llama" {
        return Err(TokenizerError::UnsupportedModel(model.to_owned()));
    }
    let tokens: Vec<String> = file
        .get_str_array(TOKENS)?
        .ok_or(TokenizerError::MissingKey { key: TOKENS })?
        .into_iter()
        .map(str::to_owned)
        .collect();
    let n = tokens.len();
    let scores = read_scores(file)?.unwrap_or_else(|| vec![0.0; n]);
    let token_types = match file.get_i64_array(TOKEN_TYPES)? {
        Some(types) => types
            .into_iter()
            .enumerate()
            .map(|(id, value)| {
                i32::try_from(value).map_err(|_| TokenizerError::BadTokenType { id, value })
            })
            .collect::<Result<Vec<i32>, _>>()?,
        None => vec![token_type::NORMAL; n],
    };

    // llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0, no PAD; a default outside the
    // vocabulary is dropped, an explicit id outside it is an error (from `from_spm_vocab`).
    let default_id = |id: u32| ((id as usize) < n).then_some(id);
    let bos_id = special_id(file, "tokenizer.ggml.bos_token_id", n)?.or(default_id(1));
    let eos_id = special_id(file, "tokenizer.ggml.eos_token_id", n)?.or(default_id(2));
    let unk_id = special_id(file, "tokenizer.ggml.unknown_token_id", n)?.or(default_id(0));
    let pad_id = special_id(file, "tokenizer.ggml.padding_token_id", n)?;

    Ok(SpmVocab {
        tokens,
        scores,
        token_types,
        bos_id,
        eos_id,
        unk_id,
        pad_id,
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(true),
        add_eos: file
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        add_space_prefix: file
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true),
    })
}

/// Scores are f32 in practice; llama.cpp also accepts i32.
fn read_scores(file: &GgufFile) -> Result<Option<Vec<f32>>, TokenizerError> {
    match file.get_f32_array(SCORES) {
        Ok(scores) => Ok(scores),
        Err(float_error @ GgufError::MetadataType { .. }) => match file.get_i64_array(SCORES) {
            Ok(ints) => Ok(ints.map(|v| v.into_iter().map(|s| s as f32).collect())),
            Err(_) => Err(float_error.into()),
        },
        Err(e) => Err(e.into()),
    }
}

fn special_id(
    file: &GgufFile,
    key: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>, TokenizerError> {
    match file.get_u64(key)? {
        None => Ok(None),
        Some(id) => u32::try_from(id)
            .map(Some)
            .map_err(|_| TokenizerError::SpecialIdOutOfRange {
                field: key,
                id,
                vocab_size,
            }),
    }
}
