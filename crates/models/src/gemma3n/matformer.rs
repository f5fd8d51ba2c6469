//! MatFormer "mix-n-match" configurations: which layers of a Gemma 3n checkpoint a sub-model
//! keeps and which prefix of every kept layer's MLP (see `docs/matformer.md` for the rule and
//! where it comes from).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::Gemma3nConfig;
use crate::ModelError;

/// A MatFormer sub-model, read from a small JSON file:
/// `{"ffn_widths": [8192, 8192, 16384, ...], "layers_to_skip": [20, 21, 22, 23, 24]}`.
/// `ffn_widths` holds one width per *kept* layer (as Google's slicing configurations do) or a
/// single number for every layer; without it every kept layer keeps its stored width.
/// `intermediate_size` is accepted as another name for `ffn_widths`, so the `text_config` of a
/// published sub-model's `config.json` can be used as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatformerConfig {
    widths: Option<WidthSpec>,
    /// Original layer indices dropped from the sub-model, sorted, without duplicates.
    layers_to_skip: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum WidthSpec {
    Uniform(usize),
    PerLayer(Vec<usize>),
}

/// A MatFormer configuration applied to one checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct SubModel {
    /// Original index of every kept layer, in order: sub-model layer `j` is stored layer
    /// `kept[j]`.
    pub kept: Vec<usize>,
    /// The sub-model as a standalone model: kept layers renumbered, per-layer lists filtered,
    /// MLP widths cut, KV sharing recounted.
    pub config: Gemma3nConfig,
}

/// Keys a configuration may hold; anything else is most likely a typo, so it is rejected.
const KNOWN_KEYS: [&str; 3] = ["ffn_widths", "intermediate_size", "layers_to_skip"];

impl MatformerConfig {
    /// Every layer kept, with these MLP widths.
    pub fn per_layer(widths: Vec<usize>) -> MatformerConfig {
        MatformerConfig {
            widths: Some(WidthSpec::PerLayer(widths)),
            layers_to_skip: Vec::new(),
        }
    }

    /// The same configuration with `layers` dropped; `widths` (if given) must then hold one
    /// width per kept layer.
    pub fn skipping(mut self, layers: Vec<usize>) -> Result<MatformerConfig, ModelError> {
        self.layers_to_skip = sorted_unique(layers)?;
        Ok(self)
    }

    /// Original indices of the dropped layers, ascending.
    pub fn layers_to_skip(&self) -> &[usize] {
        &self.layers_to_skip
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
        let layers_to_skip = match obj.get("layers_to_skip") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let layers = items
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|i| i as usize).ok_or_else(|| {
                            err(format!("layers_to_skip holds {v}, expected layer indices"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                sorted_unique(layers)?
            }
            Some(v) => {
                return Err(err(format!(
                    "layers_to_skip is {v}, expected a list of layer indices"
                )))
            }
        };
        let spec = match (obj.get("ffn_widths"), obj.get("intermediate_size")) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "give either ffn_widths or intermediate_size, not both".into()
                ))
            }
            (Some(v), None) | (None, Some(v)) => Some(v),
            (None, None) if !layers_to_skip.is_empty() => None,
            (None, None) => {
                return Err(err(
                    "give 'ffn_widths' and/or a non-empty 'layers_to_skip'".into()
                ))
            }
        };
        let width = |v: &Value| match v.as_u64() {
            Some(w) if w > 0 => Ok(w as usize),
            _ => Err(err(format!("MLP width {v} is not a positive integer"))),
        };
        let widths = match spec {
            None => None,
            Some(Value::Array(items)) => Some(WidthSpec::PerLayer(
                items.iter().map(width).collect::<Result<_, _>>()?,
            )),
            Some(v) => Some(WidthSpec::Uniform(width(v)?)),
        };
        Ok(MatformerConfig {
            widths,
            layers_to_skip,
        })
    }

    /// The MLP width of every kept layer, given the widths the checkpoint stores for those
    /// layers (`stored[j]` for kept layer `j`; `kept[j]` names it in errors).
    fn kept_widths(&self, stored: &[usize], kept: &[usize]) -> Result<Vec<usize>, ModelError> {
        let n_kept = stored.len();
        let widths = match &self.widths {
            None => stored.to_vec(),
            Some(WidthSpec::Uniform(w)) => vec![*w; n_kept],
            Some(WidthSpec::PerLayer(w)) if w.len() == n_kept => w.clone(),
            Some(WidthSpec::PerLayer(w)) if self.layers_to_skip.is_empty() => {
                return Err(ModelError::Config(format!(
                    "MatFormer config has {} MLP widths for a model of {n_kept} layers",
                    w.len()
                )))
            }
            Some(WidthSpec::PerLayer(w)) => {
                return Err(ModelError::Config(format!(
                    "MatFormer config has {} MLP widths, but keeps {n_kept} layers (skips {}): \
                     give one width per kept layer",
                    w.len(),
                    self.layers_to_skip.len()
                )))
            }
        };
        if let Some(j) = (0..n_kept).find(|&j| widths[j] > stored[j]) {
            return Err(ModelError::Config(format!(
                "MatFormer config asks layer {} for an MLP of {} units, but the checkpoint \
                 stores only {}",
                kept[j], widths[j], stored[j]
            )));
        }
        Ok(widths)
    }

    /// Every layer's MLP width for a model whose stored MLPs are `stored` wide (one per layer),
    /// when no layer is skipped.
    pub fn widths(&self, stored: &[usize]) -> Result<Vec<usize>, ModelError> {
        let kept: Vec<usize> = (0..stored.len()).collect();
        self.kept_widths(stored, &kept)
    }

    /// This configuration applied to a checkpoint of configuration `full` whose layers store
    /// MLPs `stored` wide: which layers remain and the standalone configuration they form.
    pub fn plan(&self, full: &Gemma3nConfig, stored: &[usize]) -> Result<SubModel, ModelError> {
        let n = full.num_hidden_layers;
        if stored.len() != n {
            return Err(ModelError::Config(format!(
                "{} stored MLP widths for a model of {n} layers",
                stored.len()
            )));
        }
        if let Some(&i) = self.layers_to_skip.iter().find(|&&i| i >= n) {
            return Err(ModelError::Config(format!(
                "MatFormer config skips layer {i}, but the model has {n} layers (0-{})",
                n - 1
            )));
        }
        if self.layers_to_skip.len() == n {
            return Err(ModelError::Config(format!(
                "MatFormer config skips all {n} layers"
            )));
        }
        let kept: Vec<usize> = (0..n)
            .filter(|i| self.layers_to_skip.binary_search(i).is_err())
            .collect();
        let kept_stored: Vec<usize> = kept.iter().map(|&i| stored[i]).collect();
        let widths = self.kept_widths(&kept_stored, &kept)?;
        let mut config = full.keep_layers(&kept)?;
        config.intermediate_size = widths;
        config.validate()?;
        Ok(SubModel { kept, config })
    }
}

fn sorted_unique(mut layers: Vec<usize>) -> Result<Vec<usize>, ModelError> {
    let mut seen = BTreeSet::new();
    if let Some(&dup) = layers.iter().find(|&&i| !seen.insert(i)) {
        return Err(ModelError::Config(format!(
            "MatFormer config: layers_to_skip lists layer {dup} twice"
        )));
    }
    layers.sort_unstable();
    Ok(layers)
}
