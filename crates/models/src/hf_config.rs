//! Values of a transformers `config.json`, read as untrusted input: a key left out takes
//! transformers' default where it has one, a value of the wrong type is an error naming it.

use serde_json::Value;

use crate::ModelError;

fn err(m: String) -> ModelError {
    ModelError::Config(m)
}

/// The object under `key` (`vision_config`, `text_config`, …); `what` says what its absence
/// means.
pub(crate) fn section<'a>(root: &'a Value, key: &str, what: &str) -> Result<&'a Value, ModelError> {
    root.get(key)
        .filter(|v| v.is_object())
        .ok_or_else(|| err(format!("config.json has no {key}{what}")))
}

/// A non-negative integer, or `default` when the key is absent or null (an error without one).
pub(crate) fn int(v: &Value, k: &str, default: Option<u64>) -> Result<u64, ModelError> {
    match v.get(k) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| err(format!("config.json lacks integer '{k}'")))
        }
        Some(x) => x
            .as_u64()
            .ok_or_else(|| err(format!("config.json '{k}' is {x}, expected an integer"))),
    }
}

/// A token id (an integer that fits `u32`), or `default`.
pub(crate) fn token_id(v: &Value, k: &str, default: u64) -> Result<u32, ModelError> {
    u32::try_from(int(v, k, Some(default))?)
        .map_err(|_| err(format!("config.json '{k}' is not a token id")))
}

/// A number of `section` (named in the error), or `default`.
pub(crate) fn float(v: &Value, section: &str, k: &str, default: f64) -> Result<f64, ModelError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| err(format!("{section} '{k}' is {x}"))),
    }
}
