//! MatFormer "mix-n-match" configurations: which prefix of every layer's MLP a Gemma 3n
//! sub-model keeps (see `docs/matformer.md` for the rule and where it comes from).

use std::path::Path;

use serde_json::Value;

use crate::ModelError;

/// A MatFormer sub-model, read from a small JSON file:
/// `{"ffn_widths": [8192, 8192, 16384, ...]}` (one width per layer) or `{"ffn_widths": 8192}`
/// (every layer). `intermediate_size` is accepted as another name for `ffn_widths`, so the
/// `text_config` of a published sub-model's `config.json` can be used as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatformerConfig {
    widths: WidthSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum WidthSpec {
    Uniform(usize),
    PerLayer(Vec<usize>),
}

/// Keys a configuration may hold; anything else is most likely a typo, so it is rejected.
const KNOWN_KEYS: [&str; 3] = ["ffn_widths", "intermediate_size", "layers_to_skip"];

impl MatformerConfig {
    pub fn per_layer(widths: Vec<usize>) -> MatformerConfig {
        MatformerConfig {
            widths: WidthSpec::PerLayer(widths),
        }
    }

    pub fn from_file(path: &Path) -> Result<MatformerConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ModelError::Config(format!(
                "cannot read MatFormer config {}: {e}",
                path.display()
            ))
        })?;
        MatformerConfig::from_json(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<MatformerConfig, ModelError> {
        let err = |m: String| ModelError::Config(format!("MatFormer config: {m}"));
        let root: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON ({e})")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        if let Some(key) = obj.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(err(format!(
                "unknown key '{key}' (known: {})",
                KNOWN_KEYS.join(", ")
            )));
        }
        // The reference defines no layer-skipping rule (see docs/matformer.md): refuse rather
        // than guess what a skipped layer would do to PLE columns and KV sharing.
        match obj.get("layers_to_skip") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(err(
                    "layers_to_skip is not supported: Gemma 3n's reference defines sub-models by \
                     per-layer MLP widths only (see docs/matformer.md)"
                        .into(),
                ))
            }
        }
        let spec = match (obj.get("ffn_widths"), obj.get("intermediate_size")) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "give either ffn_widths or intermediate_size, not both".into()
                ))
            }
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => return Err(err("missing 'ffn_widths'".into())),
        };
        let width = |v: &Value| match v.as_u64() {
            Some(w) if w > 0 => Ok(w as usize),
            _ => Err(err(format!("MLP width {v} is not a positive integer"))),
        };
        let widths = match spec {
            Value::Array(items) => {
                WidthSpec::PerLayer(items.iter().map(width).collect::<Result<_, _>>()?)
            }
            v => WidthSpec::Uniform(width(v)?),
        };
        Ok(MatformerConfig { widths })
    }

    /// Every layer's MLP width for a model of `n_layers` layers whose stored MLPs are
    /// `stored` wide: each must be at least 1 and at most the stored width.
    pub fn widths(&self, stored: &[usize]) -> Result<Vec<usize>, ModelError> {
        let n_layers = stored.len();
        let widths = match &self.widths {
            WidthSpec::Uniform(w) => vec![*w; n_layers],
            WidthSpec::PerLayer(w) if w.len() == n_layers => w.clone(),
            WidthSpec::PerLayer(w) => {
                return Err(ModelError::Config(format!(
                    "MatFormer config has {} MLP widths for a model of {n_layers} layers",
                    w.len()
                )))
            }
        };
        if let Some((i, (w, s))) = widths
            .iter()
            .zip(stored)
            .enumerate()
            .find(|(_, (w, s))| w > s)
        {
            return Err(ModelError::Config(format!(
                "MatFormer config asks layer {i} for an MLP of {w} units, but the checkpoint \
                 stores only {s}"
            )));
        }
        Ok(widths)
    }
}
