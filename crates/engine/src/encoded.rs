//! The towers' outputs by content key, shared by the image and audio sides: a conversation
//! re-fed after a reset, or the same image or clip sent again, is not encoded twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;

/// A small map from a media item's content key (its bytes and how it was prepared, hashed) to
/// its soft tokens. Cleared whole when full: the entries are large and reuse is mostly of
/// recent items.
pub(crate) struct EncodedCache {
    map: Mutex<HashMap<[u8; 32], Arc<[f32]>>>,
    capacity: usize,
}

impl EncodedCache {
    pub fn new(capacity: usize) -> Self {
        EncodedCache {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The soft tokens of `key`, from the cache or from `encode` (timed: with `verbose`,
    /// `what` and the time go to stderr).
    pub fn get_or_encode(
        &self,
        key: &[u8; 32],
        verbose: bool,
        what: &dyn Fn() -> String,
        encode: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Arc<[f32]>> {
        if let Some(e) = self.lock().get(key) {
            return Ok(e.clone());
        }
        let started = std::time::Instant::now();
        let e: Arc<[f32]> = encode()?.into();
        if verbose {
            eprintln!(
                "gemma: {} encoded in {:.0} ms",
                what(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        let mut map = self.lock();
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(*key, e.clone());
        Ok(e)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<[f32]>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
