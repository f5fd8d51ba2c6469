//! Counters for `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_slots: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Hits served by copying another slot's cache.
    pub prefix_cache_copies: AtomicU64,
    pub prefix_cache_copied_tokens: AtomicU64,
    /// Prompt prefixes stored beyond the slots (`--cache-ram`), and hits served from them.
    pub prompt_store_inserts: AtomicU64,
    pub prompt_store_restores: AtomicU64,
    pub prompt_store_restored_tokens: AtomicU64,
    pub prompt_store_bytes: AtomicU64,
    pub prompt_store_entries: AtomicU64,
    /// Microseconds the scheduler spent running forward passes.
    pub busy_micros: AtomicU64,
    pub ttft_micros_sum: AtomicU64,
    pub ttft_count: AtomicU64,
    pub forward_steps: AtomicU64,
    /// The safety filter's counters (shown when `--shield` is on).
    pub shield: crate::shield::ShieldMetrics,
    pub shield_enabled: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let busy_secs = get(&self.busy_micros) as f64 / 1e6;
        let tokens_per_sec = if busy_secs > 0.0 {
            get(&self.completion_tokens) as f64 / busy_secs
        } else {
            0.0
        };
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let counters = [
            (
                "gemma_requests_total",
                "Generation requests accepted",
                &self.requests,
            ),
            (
                "gemma_requests_failed_total",
                "Requests that ended with an error",
                &self.requests_failed,
            ),
            (
                "gemma_requests_rejected_total",
                "Requests refused because the queue was full",
                &self.requests_rejected,
            ),
            (
                "gemma_requests_cancelled_total",
                "Requests whose client went away before the end",
                &self.requests_cancelled,
            ),
            (
                "gemma_prompt_tokens_total",
                "Prompt tokens of accepted requests",
                &self.prompt_tokens,
            ),
            (
                "gemma_completion_tokens_total",
                "Generated tokens",
                &self.completion_tokens,
            ),
            (
                "gemma_prefix_cache_hits_total",
                "Requests that reused cached KV of a shared prompt prefix",
                &self.prefix_cache_hits,
            ),
            (
                "gemma_prefix_cache_hit_tokens_total",
                "Prompt tokens not recomputed thanks to the prefix cache",
                &self.prefix_cache_hit_tokens,
            ),
            (
                "gemma_prefix_cache_copies_total",
                "Prefix cache hits served by copying the KV of another slot",
                &self.prefix_cache_copies,
            ),
            (
                "gemma_prefix_cache_copied_tokens_total",
                "Prompt tokens whose KV was copied from another slot",
                &self.prefix_cache_copied_tokens,
            ),
            (
                "gemma_prompt_store_inserts_total",
                "Prompt prefixes copied into the prompt store (--cache-ram)",
                &self.prompt_store_inserts,
            ),
            (
                "gemma_prompt_store_restores_total",
                "Prefix cache hits served from the prompt store",
                &self.prompt_store_restores,
            ),
            (
                "gemma_prompt_store_restored_tokens_total",
                "Prompt tokens whose KV came from the prompt store",
                &self.prompt_store_restored_tokens,
            ),
            (
                "gemma_forward_steps_total",
                "Scheduler iterations that ran the model",
                &self.forward_steps,
            ),
        ];
        for (name, help, counter) in counters {
            line(name, "counter", help, get(counter).to_string());
        }
        line(
            "gemma_queue_depth",
            "gauge",
            "Requests waiting for a slot",
            get(&self.queue_depth).to_string(),
        );
        line(
            "gemma_active_slots",
            "gauge",
            "Sequences being processed",
            get(&self.active_slots).to_string(),
        );
        line(
            "gemma_prompt_store_bytes",
            "gauge",
            "Bytes of keys and values held by the prompt store",
            get(&self.prompt_store_bytes).to_string(),
        );
        line(
            "gemma_prompt_store_entries",
            "gauge",
            "Prompt prefixes held by the prompt store",
            get(&self.prompt_store_entries).to_string(),
        );
        line(
            "gemma_tokens_per_second",
            "gauge",
            "Generated tokens per second of model time",
            format!("{tokens_per_sec:.3}"),
        );
        let name = "gemma_time_to_first_token_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from arrival to the first generated token\n# TYPE {name} summary\n{name}_sum {:.6}\n{name}_count {}",
            get(&self.ttft_micros_sum) as f64 / 1e6,
            get(&self.ttft_count)
        );
        if self.shield_enabled.load(Ordering::Relaxed) {
            self.shield.render(&mut out);
        }
        out
    }
}
