//! Hugging Face model folders: `config.json` plus weights in `model.safetensors` or in shards
//! listed by `model.safetensors.index.json`. Shards are memory-mapped once each and tensors
//! are handed out without copying.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensorError, SafeTensors};
use thiserror::Error;

use crate::{Blob, GgmlType, TensorData, TensorSource};

const CONFIG_FILE: &str = "config.json";
const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, Error)]
pub enum HfError {
    #[error("'{path}' is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot read '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{path}' is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("'{dir}' has no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}")]
    NoWeights { dir: PathBuf },
    #[error("'{path}': {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("shard '{path}' (holding tensor '{tensor}') does not exist")]
    MissingShard { path: PathBuf, tensor: String },
    #[error("'{path}': invalid safetensors header: {source}")]
    Header {
        path: PathBuf,
        source: SafeTensorError,
    },
    #[error("tensor '{tensor}' in '{path}': dtype {dtype} is not supported (only F32, F16, BF16)")]
    UnsupportedDtype {
        tensor: String,
        dtype: String,
        path: PathBuf,
    },
    #[error("tensor '{tensor}' appears in both '{first}' and '{second}'")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("tensor '{tensor}' is listed in the index under '{path}' but that shard does not contain it")]
    TensorNotInShard { tensor: String, path: PathBuf },
}

struct HfTensor {
    name: String,
    dtype: GgmlType,
    shape: Vec<usize>,
    data: Blob,
    /// Index into `HfFolder::shards`.
    shard: usize,
}

/// An opened Hugging Face model folder.
pub struct HfFolder {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<PathBuf>,
    /// File order: shards in name order, tensors by offset within a shard.
    tensors: Vec<HfTensor>,
    by_name: HashMap<String, usize>,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<HfFolder, HfError> {
        if !dir.is_dir() {
            return Err(HfError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let config = read_json(&dir.join(CONFIG_FILE))?;
        let mut folder = HfFolder {
            dir: dir.to_path_buf(),
            config,
            shards: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
        };
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_WEIGHTS_FILE);
        if index_path.is_file() {
            let weight_map = read_weight_map(&index_path)?;
            // Each shard is mapped once however many tensors it holds.
            let shard_names: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
            for shard in shard_names {
                let path = dir.join(shard);
                if !path.is_file() {
                    let tensor = weight_map
                        .iter()
                        .filter(|(_, s)| s.as_str() == shard)
                        .map(|(t, _)| t.as_str())
                        .min()
                        .unwrap_or_default()
                        .to_owned();
                    return Err(HfError::MissingShard { path, tensor });
                }
                folder.add_shard(&path)?;
            }
            folder.check_index(&weight_map)?;
        } else if single_path.is_file() {
            folder.add_shard(&single_path)?;
        } else {
            return Err(HfError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Ok(folder)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub fn tokenizer_json_path(&self) -> Option<PathBuf> {
        let path = self.dir.join("tokenizer.json");
        path.is_file().then_some(path)
    }

    /// `tokenizer_config.json`, if present and valid JSON.
    pub fn tokenizer_config(&self) -> Option<serde_json::Value> {
        read_json(&self.dir.join("tokenizer_config.json")).ok()
    }

    /// The chat template: `chat_template.jinja`, else `chat_template.json`'s
    /// `chat_template`, else `tokenizer_config.json`'s `chat_template` (a string, or the
    /// entry named `default` in a list of named templates).
    pub fn chat_template(&self) -> Option<String> {
        if let Ok(text) = std::fs::read_to_string(self.dir.join("chat_template.jinja")) {
            return Some(text);
        }
        if let Ok(json) = read_json(&self.dir.join("chat_template.json")) {
            if let Some(template) = template_from(&json["chat_template"]) {
                return Some(template);
            }
        }
        template_from(&self.tokenizer_config()?["chat_template"])
    }

    /// Paths of the weight files, in the order their tensors are listed.
    pub fn shard_paths(&self) -> &[PathBuf] {
        &self.shards
    }

    fn add_shard(&mut self, path: &Path) -> Result<(), HfError> {
        let io_error = |source| HfError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: read-only mapping; as for every mmap reader, the file must not be
        // truncated while open.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?);
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map[..]).map_err(|source| HfError::Header {
                path: path.to_path_buf(),
                source,
            })?;
        // read_metadata checked that the offsets tile the data section exactly, so every
        // range below lies inside the mapping.
        let data_start = 8 + header_len;
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = map;
        let shard = self.shards.len();
        self.shards.push(path.to_path_buf());
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else {
                continue;
            };
            let dtype = ggml_type_of(info.dtype).ok_or_else(|| HfError::UnsupportedDtype {
                tensor: name.clone(),
                dtype: format!("{:?}", info.dtype),
                path: path.to_path_buf(),
            })?;
            if let Some(&existing) = self.by_name.get(&name) {
                return Err(HfError::DuplicateTensor {
                    tensor: name,
                    first: self.shards[self.tensors[existing].shard].clone(),
                    second: path.to_path_buf(),
                });
            }
            let (start, end) = info.data_offsets;
            self.by_name.insert(name.clone(), self.tensors.len());
            self.tensors.push(HfTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                data: Blob::new(owner.clone(), data_start + start, end - start),
                shard,
            });
        }
        Ok(())
    }

    /// Every tensor the index names must be in the shard it names.
    fn check_index(&self, weight_map: &HashMap<String, String>) -> Result<(), HfError> {
        let mut entries: Vec<_> = weight_map.iter().collect();
        entries.sort();
        for (tensor, shard) in entries {
            let expected = self.dir.join(shard);
            let found = self
                .by_name
                .get(tensor)
                .is_some_and(|&i| self.shards[self.tensors[i].shard] == expected);
            if !found {
                return Err(HfError::TensorNotInShard {
                    tensor: tensor.clone(),
                    path: expected,
                });
            }
        }
        Ok(())
    }
}

impl TensorSource for HfFolder {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        let t = &self.tensors[*self.by_name.get(name)?];
        Some(TensorData {
            interleaved: false,
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.clone(),
        })
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("shards", &self.shards)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn ggml_type_of(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| HfError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `weight_map` (tensor name -> shard file name) and refuses shard names that would
/// reach outside the folder.
fn read_weight_map(path: &Path) -> Result<HashMap<String, String>, HfError> {
    let bad = |reason: String| HfError::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let index = read_json(path)?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no 'weight_map' object".to_owned()));
    };
    let mut weight_map = HashMap::with_capacity(map.len());
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!("weight_map['{tensor}'] is not a string")));
        };
        if !is_plain_file_name(shard) {
            return Err(bad(format!(
                "weight_map['{tensor}'] = '{shard}' is not a plain file name in the folder"
            )));
        }
        weight_map.insert(tensor.clone(), shard.to_owned());
    }
    Ok(weight_map)
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !Path::new(name).is_absolute()
}

fn template_from(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned),
        _ => None,
    }
}
