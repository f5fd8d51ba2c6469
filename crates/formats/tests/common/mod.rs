//! Helpers shared by the integration tests: a self-deleting temp dir and a raw GGUF byte
//! builder that can write any value, valid or not.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gemma_formats::{GgufError, GgufFile};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("gemma-formats-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Little-endian GGUF pieces appended one by one.
#[derive(Default)]
pub struct Raw {
    pub bytes: Vec<u8>,
}

impl Raw {
    /// Magic, version, tensor count and kv count.
    pub fn header(version: u32, tensor_count: u64, kv_count: u64) -> Raw {
        let mut raw = Raw::default();
        raw.bytes.extend_from_slice(b"GGUF");
        raw.u32(version).u64(tensor_count).u64(kv_count);
        raw
    }

    pub fn u8(&mut self, v: u8) -> &mut Raw {
        self.bytes.push(v);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Raw {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Raw {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Raw {
        self.u64(s.len() as u64);
        self.bytes.extend_from_slice(s.as_bytes());
        self
    }

    /// A metadata entry holding a u32 (value type 4).
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Raw {
        self.str(key).u32(4).u32(v)
    }

    /// A metadata entry holding a string (value type 8).
    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Raw {
        self.str(key).u32(8).str(v)
    }

    /// A tensor info; `ne` is innermost first as on disk.
    pub fn tensor_info(&mut self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }

    pub fn pad_to(&mut self, alignment: usize) -> &mut Raw {
        while !self.bytes.len().is_multiple_of(alignment) {
            self.bytes.push(0);
        }
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Raw {
        self.bytes.resize(self.bytes.len() + n, 0);
        self
    }

    pub fn parse(&self) -> Result<GgufFile, GgufError> {
        parse(self.bytes.clone())
    }
}

pub fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(Arc::new(bytes))
}

/// Parses and returns the error, failing the test if parsing succeeded.
pub fn parse_err(bytes: Vec<u8>) -> GgufError {
    match parse(bytes) {
        Ok(file) => panic!("expected an error, parsed {file:?}"),
        Err(e) => e,
    }
}

/// Asserts that `message` mentions every one of `parts`.
#[track_caller]
pub fn assert_mentions(err: &dyn std::fmt::Display, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(
            message.contains(part),
            "error message {message:?} does not mention {part:?}"
        );
    }
}
