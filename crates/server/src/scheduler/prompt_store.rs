//! Prompt prefixes kept beyond the slots (as llama-server's `--cache-ram`): when a slot is
//! about to feed the last chunk of a long prompt, its cache's prefix up to there is copied
//! into a snapshot, so the next request with that prefix — the same document, the same system
//! prompt — reuses it even after the slot went on to other work.
//!
//! Slots alone keep little: a slot holds only its latest sequence, and a sliding-window
//! layer's ring (as long as the window) moves past a long prompt's prefix as soon as the reply
//! is generated, after which no rewind to that prefix is possible (`KvCache::truncate`). A
//! snapshot is taken before that happens and sized to what it holds: global layers keep the
//! prefix's positions, rings the last window of them. A snapshot longer than the window can
//! only be reused whole (up to one position less), one within the window for any prefix.
//! Snapshots are evicted least recently used first, within a byte budget.

use gemma_engine::gemma_models::KvCache;
use gemma_engine::LoadedModel;

use super::{Cached, PromptView};

/// Prompts (up to their last chunk) shorter than this are not stored: recomputing them costs
/// less than the copies.
pub(super) const MIN_STORED_TOKENS: usize = 128;

/// One stored prefix: what it holds, position by position, and its keys and values.
pub(super) struct Snapshot {
    pub cached: Cached,
    pub cache: KvCache,
}

/// Snapshots of prompt prefixes, least recently used first, within `budget` bytes.
pub(super) struct PromptStore {
    entries: Vec<Snapshot>,
    budget: usize,
    used: usize,
}

impl PromptStore {
    /// A store of at most `budget` bytes of keys and values (0: nothing is stored).
    pub fn new(budget: usize) -> PromptStore {
        PromptStore {
            entries: Vec::new(),
            budget,
            used: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry with the longest reusable prefix of `prompt` above `at_least`, as
    /// (index, length), longest first among equals the most recently used.
    fn best(&self, prompt: &PromptView<'_>, at_least: usize) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.cached.reusable_prefix(prompt)))
            .filter(|&(_, reuse)| reuse > at_least)
            .max_by_key(|&(i, reuse)| (reuse, i))
    }

    /// Whether a snapshot already holds the first `len` positions `prompt` would reuse;
    /// marks it used.
    pub fn holds(&mut self, prompt: &PromptView<'_>, len: usize) -> bool {
        match self.best(prompt, len.saturating_sub(1)) {
            Some((i, _)) => {
                self.touch(i);
                true
            }
            None => false,
        }
    }

    /// Copies into `cache` the longest stored prefix of `prompt` longer than `own` (the
    /// positions the slot already has); returns what the slot then holds, or `None` when no
    /// snapshot offers more (or none can be rewound that far: a snapshot past the window only
    /// serves its whole length).
    pub fn restore(
        &mut self,
        prompt: &PromptView<'_>,
        own: usize,
        cache: &mut KvCache,
    ) -> Option<(usize, Cached)> {
        let mut candidates: Vec<(usize, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.cached.reusable_prefix(prompt)))
            .filter(|&(_, reuse)| reuse > own)
            .collect();
        candidates.sort_by_key(|&(i, reuse)| std::cmp::Reverse((reuse, i)));
        for (i, reuse) in candidates {
            let entry = &self.entries[i];
            // Fails, leaving `cache` as it was, when the snapshot's rings hold too little.
            if cache.copy_prefix_from(&entry.cache, reuse).is_ok() {
                let cached = entry.cached.prefix(reuse);
                self.touch(i);
                return Some((reuse, cached));
            }
        }
        None
    }

    /// Stores the first `len` positions of `cache` (holding `cached`), evicting the least
    /// recently used snapshots to make room; false when it does not fit the budget at all or
    /// cannot be copied.
    pub fn insert(
        &mut self,
        loaded: &LoadedModel,
        cached: &Cached,
        cache: &KvCache,
        len: usize,
    ) -> bool {
        let bytes = loaded.model.kv_cache_bytes(len);
        if !self.enabled() || len == 0 || bytes > self.budget {
            return false;
        }
        while self.used + bytes > self.budget && !self.entries.is_empty() {
            let evicted = self.entries.remove(0);
            self.used -= evicted.cache.bytes();
        }
        // A cache sized to the prefix: global layers hold its positions, rings the window.
        let Ok(mut snapshot) = loaded.model.new_cache(len) else {
            return false;
        };
        if snapshot.copy_prefix_from(cache, len).is_err() {
            return false;
        }
        self.used += snapshot.bytes();
        self.entries.push(Snapshot {
            cached: cached.prefix(len),
            cache: snapshot,
        });
        true
    }

    /// Marks entry `i` most recently used.
    fn touch(&mut self, i: usize) {
        let entry = self.entries.remove(i);
        self.entries.push(entry);
    }
}
