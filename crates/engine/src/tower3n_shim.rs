//! TEMPORARY: the API of `gemma_models::vision::Gemma3nVision` (built on branch `vision-tower`)
//! so that the engine compiles before the tower lands. Removed at the merge.

use gemma_formats::{GgufFile, HfFolder};
use gemma_models::ModelError;

#[derive(Clone, Debug)]
pub struct Gemma3nVisionConfig {
    pub image_size: usize,
    pub tokens_per_image: usize,
    pub text_hidden_size: usize,
    pub vocab_offset: u32,
    pub vocab_size: usize,
}

impl Gemma3nVisionConfig {
    pub fn from_hf_config(root: &serde_json::Value) -> Result<Self, ModelError> {
        let v = &root["vision_config"];
        Ok(Gemma3nVisionConfig {
            image_size: 768,
            tokens_per_image: root["vision_soft_tokens_per_image"].as_u64().unwrap_or(256) as usize,
            text_hidden_size: root["text_config"]["hidden_size"].as_u64().unwrap_or(0) as usize,
            vocab_offset: v["vocab_offset"].as_u64().unwrap_or(262_144) as u32,
            vocab_size: v["vocab_size"].as_u64().unwrap_or(128) as usize,
        })
    }
}

pub struct Gemma3nVision {
    config: Gemma3nVisionConfig,
}

impl Gemma3nVision {
    pub fn from_hf(folder: &HfFolder) -> Result<Gemma3nVision, ModelError> {
        Gemma3nVisionConfig::from_hf_config(folder.config())?;
        Err(ModelError::Config("shim: the MobileNet-V5 tower is not merged yet".into()))
    }
    pub fn from_gguf(_mmproj: &GgufFile) -> Result<Gemma3nVision, ModelError> {
        Err(ModelError::Config("shim: the MobileNet-V5 tower is not merged yet".into()))
    }
    pub fn config(&self) -> &Gemma3nVisionConfig {
        &self.config
    }
    pub fn encode_image(&self, _pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        Err(ModelError::Config("shim".into()))
    }
    pub fn embed_hard(&self, _ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        Err(ModelError::Config("shim".into()))
    }
    pub fn weight_bytes(&self) -> usize {
        0
    }
}
