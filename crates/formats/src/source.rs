//! Opening a model by path, whatever its format: a GGUF file or a Hugging Face folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::gguf::{GgufError, GgufFile, GGUF_MAGIC};
use crate::hf::{HfError, HfFolder};
use crate::{TensorData, TensorSource};

#[derive(Debug, Error)]
pub enum FormatError {
    #[error("model path '{path}' does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot read '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{path}' is neither a GGUF file nor a Hugging Face model folder{hint}")]
    Unrecognized { path: PathBuf, hint: &'static str },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Hf(#[from] HfError),
}

/// A model opened from disk.
#[derive(Debug)]
pub enum ModelFile {
    Gguf(GgufFile),
    Hf(HfFolder),
}

impl ModelFile {
    pub fn as_tensor_source(&self) -> &dyn TensorSource {
        match self {
            ModelFile::Gguf(file) => file,
            ModelFile::Hf(folder) => folder,
        }
    }
}

impl TensorSource for ModelFile {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        self.as_tensor_source().tensor(name)
    }

    fn tensor_names(&self) -> Vec<String> {
        self.as_tensor_source().tensor_names()
    }
}

/// Opens `path` as a Hugging Face folder if it is a directory, as GGUF if it is a file that
/// starts with the GGUF magic or is named `*.gguf` (so a corrupt one reports why).
pub fn open_model_source(path: &Path) -> Result<ModelFile, FormatError> {
    if !path.exists() {
        return Err(FormatError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        return Ok(ModelFile::Hf(HfFolder::open(path)?));
    }
    let named_gguf = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
    if named_gguf || starts_with_gguf_magic(path)? {
        return Ok(ModelFile::Gguf(GgufFile::open(path)?));
    }
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let hint = if file_name.ends_with(".safetensors") || file_name.ends_with(".json") {
        " (for a Hugging Face model, pass the folder that contains it)"
    } else {
        ""
    };
    Err(FormatError::Unrecognized {
        path: path.to_path_buf(),
        hint,
    })
}

fn starts_with_gguf_magic(path: &Path) -> Result<bool, FormatError> {
    let io_error = |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == GGUF_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error(e)),
    }
}
