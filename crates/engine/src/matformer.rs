//! MatFormer sub-models of a loaded Gemma 3n (layers kept, MLP widths): chosen at load time
//! (`--matformer CONFIG`) or switched between requests, always as views of the weights already
//! held.

use std::path::Path;

use anyhow::{bail, Context, Result};
use gemma_models::Model;

use crate::load::{load, LoadOptions, LoadedModel};

pub use gemma_models::gemma3n::MatformerConfig;

impl LoadedModel {
    /// Makes `m` the active MatFormer configuration. Start new sessions afterwards: a KV cache
    /// filled under another configuration holds that configuration's keys and values.
    pub fn set_matformer(&mut self, m: &MatformerConfig) -> Result<()> {
        match &mut self.model {
            Model::Gemma3n(g) => Ok(g.set_matformer(m)?),
            other => bail!(
                "MatFormer configurations apply to Gemma 3n models, not {}",
                other.architecture()
            ),
        }
    }
}

/// `load`, then the MatFormer configuration in the JSON file `matformer` if one is given.
pub fn load_with_matformer(
    path: Option<&Path>,
    opts: &LoadOptions,
    matformer: Option<&Path>,
) -> Result<LoadedModel> {
    let config = matformer
        .map(MatformerConfig::from_file)
        .transpose()
        .context("--matformer")?;
    let mut loaded = load(path, opts)?;
    if let Some(config) = &config {
        loaded.set_matformer(config)?;
        if let (true, Model::Gemma3n(g)) = (opts.verbose, &loaded.model) {
            eprintln!(
                "gemma: MatFormer sub-model: layers {:?}, MLP widths {:?}",
                g.active_layers(),
                g.config().intermediate_size
            );
        }
    }
    Ok(loaded)
}
