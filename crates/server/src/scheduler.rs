//! The scheduler thread: owns the model and `parallel` slots (a KV cache each) and advances
//! every active sequence once per iteration, so concurrent requests share the machine.
//! Prompts are fed in chunks interleaved with other slots' decoding; a request whose client
//! went away is dropped before the next step; a free slot whose cached tokens share the
//! longest prefix with a new prompt is picked so that prefix is not recomputed, and a longer
//! prefix held by any other slot (even a busy one) is copied over instead of recomputed.
//!
//! Prompts may carry soft tokens (images): a prompt chunk never cuts an image block (its
//! tokens attend to each other both ways), each step carries the part of the soft tokens
//! inside its chunk, and the prefix cache compares positions by content — the token id and,
//! for soft tokens, the media key — since every image sits on the same placeholder ids.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Result;
use gemma_engine::gemma_models::{KvCache, ModelError, SeqStep};
use gemma_engine::gemma_tokenizer::StreamDecoder;
use gemma_engine::generate::chunk_end;
use gemma_engine::{LoadedModel, Sampler, SamplingParams, SoftSpan};
use llguidance::Matcher;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{TokenLogprob, TopLogprob, Usage};
use crate::constrain::apply_mask;
use crate::metrics::Metrics;
use gemma_engine::stop::{Filtered, StopStringFilter};

mod prompt_store;
use prompt_store::{PromptStore, MIN_STORED_TOKENS};

/// Prompt tokens fed per slot per iteration: long prompts do not stall other slots' decoding.
const PREFILL_CHUNK: usize = 64;

/// Rows (prompt tokens and decode rows of all slots) per forward pass.
const PASS_ROWS: usize = 8 * PREFILL_CHUNK;

/// Why a sequence ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    /// The safety filter (`--shield`) blocked the request or the rest of the reply.
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// What the scheduler sends back for a job.
#[derive(Debug)]
pub enum JobEvent {
    /// New text (possibly empty when held back by stop strings) and, when asked for, the
    /// log-probabilities of the token(s) behind it.
    Token {
        text: String,
        logprobs: Option<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    Failed(String),
}

/// When a finished job went through the scheduler, and what it reused and produced (for
/// APIs that report durations, cached tokens or the token ids, such as Ollama's).
#[derive(Debug, Clone)]
pub struct Timings {
    /// The job was put in a slot (its prompt starts being fed).
    pub started: Instant,
    /// The first token was sampled (the prompt is done).
    pub first_token: Option<Instant>,
    pub finished: Instant,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// The sampled token ids, the final stop token included when one ended the reply.
    pub generated: Vec<u32>,
}

/// One generation request, already tokenized and validated.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Soft tokens on `prompt` (positions in it, sorted, disjoint): the request's images.
    pub soft: Vec<SoftSpan>,
    pub params: SamplingParams,
    /// `Some(n)`: report each token's log-probability and its `n` best alternatives.
    pub logprobs: Option<usize>,
    pub grammar: Option<Matcher>,
    pub events: UnboundedSender<JobEvent>,
    pub arrived: Instant,
    pub deadline: Instant,
}

/// Why a job was not queued.
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

/// The handle request handlers hold: a bounded queue into the scheduler thread.
#[derive(Clone)]
pub struct Scheduler {
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Starts the scheduler thread. It ends when every `Scheduler` handle is dropped and the
    /// last active sequence has finished.
    pub fn start(
        loaded: Arc<LoadedModel>,
        parallel: usize,
        ctx_size: usize,
        queue_capacity: usize,
        prompt_cache_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Scheduler, JoinHandle<()>)> {
        let slots = (0..parallel.max(1))
            .map(|_| Ok(Slot::new(loaded.model.new_cache(ctx_size)?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let (queue, jobs) = std::sync::mpsc::sync_channel(queue_capacity);
        let worker = Worker {
            stop_ids: loaded.stop_token_ids(),
            hidden: loaded.model.hidden_size(),
            loaded,
            slots,
            store: PromptStore::new(prompt_cache_bytes),
            metrics: metrics.clone(),
            logits: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("gemma-scheduler".into())
            .spawn(move || worker.run(jobs))?;
        Ok((Scheduler { queue, metrics }, thread))
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        Metrics::add(&self.metrics.queue_depth, 1);
        let result = self.queue.try_send(job);
        if result.is_err() {
            Metrics::sub(&self.metrics.queue_depth, 1);
        }
        match result {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                Metrics::add(&self.metrics.requests_rejected, 1);
                Err(SubmitError::QueueFull)
            }
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }
}

struct Slot {
    cache: KvCache,
    /// What `cache` holds, for prefix reuse.
    cached: Cached,
    active: Option<Active>,
}

impl Slot {
    fn new(cache: KvCache) -> Slot {
        Slot {
            cache,
            cached: Cached::default(),
            active: None,
        }
    }
}

/// What a slot's cache holds, position by position.
#[derive(Clone, Debug, Default, PartialEq)]
struct Cached {
    /// The tokens whose keys and values are in the cache.
    ids: Vec<u32>,
    /// Per position: the (start, length) of the prompt chunk it was computed in, or
    /// (position, 1) for a token fed alone. A query's attention sums its keys in an order that
    /// depends on its chunk (where it starts, how long it is), so only positions computed
    /// exactly as a fresh run would are reused. (The matmuls give a row the same bits
    /// whatever rows share its pass.)
    chunks: Vec<(usize, usize)>,
    /// Per position: what soft token replaced its embedding, if any.
    soft_keys: Vec<SoftKey>,
}

/// The content of a soft-token position: its span's media key and its index in the span.
/// `None` for a position that holds its token's own embedding.
type SoftKey = Option<([u8; 32], u32)>;

impl Cached {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.chunks.truncate(len);
        self.soft_keys.truncate(len);
    }

    /// The first `len` positions.
    fn prefix(&self, len: usize) -> Cached {
        Cached {
            ids: self.ids[..len].to_vec(),
            chunks: self.chunks[..len].to_vec(),
            soft_keys: self.soft_keys[..len].to_vec(),
        }
    }

    /// Records one step: `fed` computed together, with the soft keys of their positions.
    fn push(&mut self, fed: &[u32], keys: Vec<SoftKey>) {
        debug_assert_eq!(fed.len(), keys.len());
        let start = self.len();
        self.ids.extend_from_slice(fed);
        self.chunks.resize(self.ids.len(), (start, fed.len()));
        self.soft_keys.extend(keys);
    }

    /// How many leading positions a new `prompt` can keep: whole chunks of the plan a fresh
    /// run of `prompt` would follow (chunks end before an image block or take it whole),
    /// holding the same content — the same ids and, where soft tokens replace them, the same
    /// media — computed in the same chunks. The output is then bit-identical to a run without
    /// the cache; another image on the same placeholder ids is never reused.
    fn reusable_prefix(&self, prompt: &PromptView<'_>) -> usize {
        let ids = prompt.ids;
        let body = ids.len().saturating_sub(1);
        let mut reuse = 0;
        let mut start = 0;
        while start < body {
            let end = chunk_end(
                prompt.soft,
                prompt.hidden,
                start,
                start + prefill_chunk(body - start),
            );
            // The last prompt token is always computed, so that it has logits.
            if end > body {
                break;
            }
            let same = self.ids.get(start..end) == Some(&ids[start..end])
                && self.soft_keys[start..end] == prompt.keys[start..end]
                && self.chunks[start..end]
                    .iter()
                    .all(|&chunk| chunk == (start, end - start));
            if !same {
                break;
            }
            reuse = end;
            start = end;
        }
        reuse
    }
}

/// A prompt as the prefix cache sees it: ids, soft tokens and each position's [`SoftKey`].
struct PromptView<'a> {
    ids: &'a [u32],
    soft: &'a [SoftSpan],
    keys: &'a [SoftKey],
    hidden: usize,
}

/// The [`SoftKey`] of each of positions `range` of a sequence with soft tokens `soft`.
fn soft_keys(soft: &[SoftSpan], hidden: usize, range: std::ops::Range<usize>) -> Vec<SoftKey> {
    let mut keys = vec![None; range.len()];
    for s in soft {
        let r = s.range(hidden);
        for p in r.start.max(range.start)..r.end.min(range.end) {
            keys[p - range.start] = Some((s.key, (p - r.start) as u32));
        }
    }
    keys
}

/// A sequence in progress.
struct Active {
    job: Job,
    /// Tokens still to run through the model (the prompt's rest, then each sampled token).
    to_feed: Vec<u32>,
    /// Prompt and generated tokens (for the penalties).
    history: Vec<u32>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopStringFilter,
    generated: usize,
    first_token_seen: bool,
    started: Instant,
    first_token_at: Option<Instant>,
    cached_tokens: usize,
}

struct Worker {
    loaded: Arc<LoadedModel>,
    stop_ids: Vec<u32>,
    hidden: usize,
    slots: Vec<Slot>,
    /// Prompt prefixes kept beyond the slots.
    store: PromptStore,
    metrics: Arc<Metrics>,
    logits: Vec<f32>,
}

/// What ended a sequence.
enum Outcome {
    Finished(FinishReason),
    Cancelled,
    Failed(String),
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        let mut open = true;
        loop {
            let idle = self.slots.iter().all(|s| s.active.is_none());
            if idle {
                if !open {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => self.assign(job),
                    Err(_) => return,
                }
            }
            while open && self.slots.iter().any(|s| s.active.is_none()) {
                match jobs.try_recv() {
                    Ok(job) => self.assign(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_abandoned();
            self.step();
        }
    }

    /// Puts `job` into the free slot whose cache shares the longest prefix with its prompt;
    /// when another slot (free or busy) holds a longer reusable prefix, that slot's cache is
    /// copied in first.
    fn assign(&mut self, job: Job) {
        Metrics::sub(&self.metrics.queue_depth, 1);
        if job.events.is_closed() {
            Metrics::add(&self.metrics.requests_cancelled, 1);
            return;
        }
        let keys = soft_keys(&job.soft, self.hidden, 0..job.prompt.len());
        let prompt = PromptView {
            ids: &job.prompt,
            soft: &job.soft,
            keys: &keys,
            hidden: self.hidden,
        };
        let index = (0..self.slots.len())
            .filter(|&i| self.slots[i].active.is_none())
            .max_by_key(|&i| {
                (
                    self.slots[i].cached.reusable_prefix(&prompt),
                    std::cmp::Reverse(i),
                )
            });
        let Some(index) = index else {
            return;
        };
        let mut reuse = self.keep_own_prefix(index, &prompt);
        if let Some(copied) = self.copy_longer_prefix(index, &prompt, reuse) {
            reuse = copied;
            Metrics::add(&self.metrics.prefix_cache_copies, 1);
            Metrics::add(&self.metrics.prefix_cache_copied_tokens, copied as u64);
        }
        let slot = &mut self.slots[index];
        if let Some((restored, cached)) = self.store.restore(&prompt, reuse, &mut slot.cache) {
            reuse = restored;
            slot.cached = cached;
            Metrics::add(&self.metrics.prompt_store_restores, 1);
            Metrics::add(&self.metrics.prompt_store_restored_tokens, restored as u64);
        }
        if reuse > 0 {
            Metrics::add(&self.metrics.prefix_cache_hits, 1);
            Metrics::add(&self.metrics.prefix_cache_hit_tokens, reuse as u64);
        }
        Metrics::add(&self.metrics.active_slots, 1);
        Metrics::add(&self.metrics.prompt_tokens, job.prompt.len() as u64);
        slot.active = Some(Active {
            to_feed: job.prompt[reuse..].to_vec(),
            history: job.prompt.clone(),
            sampler: Sampler::new(&job.params),
            decoder: StreamDecoder::new(),
            stops: StopStringFilter::new(&job.params.stop),
            generated: 0,
            first_token_seen: false,
            started: Instant::now(),
            first_token_at: None,
            cached_tokens: reuse,
            job,
        });
    }

    /// Rewinds slot `index` to the part of its cache that `prompt` can reuse (clearing it
    /// when a sliding-window ring no longer allows the rewind); returns that length.
    fn keep_own_prefix(&mut self, index: usize, prompt: &PromptView<'_>) -> usize {
        let slot = &mut self.slots[index];
        let mut reuse = slot.cached.reusable_prefix(prompt);
        if reuse > 0 && !rewind(&mut slot.cache, reuse) {
            reuse = 0;
        }
        if reuse == 0 {
            slot.cache.clear();
        }
        slot.cached.truncate(reuse);
        reuse
    }

    /// Copies into slot `target` the cache of the other slot holding the longest reusable
    /// prefix of `prompt`, if longer than `own`; returns the copied length. A donor whose
    /// sliding-window rings have moved past the prefix is passed over.
    fn copy_longer_prefix(
        &mut self,
        target: usize,
        prompt: &PromptView<'_>,
        own: usize,
    ) -> Option<usize> {
        let mut donors: Vec<(usize, usize)> = (0..self.slots.len())
            .filter(|&i| i != target)
            .map(|i| (self.slots[i].cached.reusable_prefix(prompt), i))
            .filter(|&(reuse, _)| reuse > own)
            .collect();
        donors.sort_by_key(|&(reuse, i)| (std::cmp::Reverse(reuse), i));
        for (reuse, donor) in donors {
            // Two distinct slots: borrow the donor shared and the target mutably.
            let (d, slot) = if donor < target {
                let (low, high) = self.slots.split_at_mut(target);
                (&low[donor], &mut high[0])
            } else {
                let (low, high) = self.slots.split_at_mut(donor);
                (&high[0], &mut low[target])
            };
            // Copies only the rows the prefix occupies into the slot's own buffers; fails
            // (leaving the slot as it was) when a donor's ring has moved past the prefix.
            if slot.cache.copy_prefix_from(&d.cache, reuse).is_err() {
                continue;
            }
            slot.cached = d.cached.prefix(reuse);
            return Some(reuse);
        }
        None
    }

    /// Frees the slots of clients that disconnected or ran out of time.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Some(active) = &self.slots[i].active else {
                continue;
            };
            if active.job.events.is_closed() {
                self.finish(i, Outcome::Cancelled);
            } else if now >= active.job.deadline {
                self.finish(i, Outcome::Failed("the request timed out".into()));
            }
        }
    }

    /// One iteration: every active slot feeds its next chunk; slots whose prompt is done
    /// sample a token.
    fn step(&mut self) {
        let mut feeds = Vec::new();
        for i in 0..self.slots.len() {
            self.store_prompt_prefix(i);
            let slot = &mut self.slots[i];
            let Some(active) = &mut slot.active else {
                continue;
            };
            // The last pending token always runs on its own: a prompt's final token then
            // takes the same path whether or not its prefix came from the cache, so a cache
            // hit never changes the output and may reuse everything but that token. The
            // matmuls give a row the same bits in any batch, but a query's attention sums its
            // keys in an order that depends on its chunk. A chunk never ends inside an image
            // block (the plan `reusable_prefix` follows).
            let n = match active.to_feed.len() {
                0 => continue,
                1 => 1,
                pending => {
                    let start = slot.cached.len();
                    let end = start + prefill_chunk(pending - 1);
                    chunk_end(&active.job.soft, self.hidden, start, end) - start
                }
            };
            feeds.push((i, active.to_feed.drain(..n).collect::<Vec<u32>>()));
        }
        for group in plan_passes(feeds) {
            self.run_group(group);
        }
    }

    /// Before slot `i` feeds the last chunk of a long prompt, copies what its cache holds so
    /// far into the prompt store (unless a snapshot already holds it): the slot's
    /// sliding-window rings move past that prefix once the reply is generated.
    fn store_prompt_prefix(&mut self, i: usize) {
        let slot = &self.slots[i];
        let Some(active) = &slot.active else {
            return;
        };
        let len = slot.cached.len();
        let pending = active.to_feed.len();
        let last_chunk = pending > 1
            && chunk_end(
                &active.job.soft,
                self.hidden,
                len,
                len + prefill_chunk(pending - 1),
            ) == len + pending - 1;
        if !self.store.enabled() || !last_chunk || len < MIN_STORED_TOKENS {
            return;
        }
        let keys = soft_keys(&active.job.soft, self.hidden, 0..active.job.prompt.len());
        let prompt = PromptView {
            ids: &active.job.prompt,
            soft: &active.job.soft,
            keys: &keys,
            hidden: self.hidden,
        };
        if !self.store.holds(&prompt, len)
            && self
                .store
                .insert(&self.loaded, &slot.cached, &slot.cache, len)
        {
            Metrics::add(&self.metrics.prompt_store_inserts, 1);
        }
        Metrics::set(&self.metrics.prompt_store_bytes, self.store.bytes() as u64);
        Metrics::set(&self.metrics.prompt_store_entries, self.store.len() as u64);
    }

    /// One forward pass over `group` (slot index, tokens to feed), then sampling for every
    /// slot whose prompt is done.
    fn run_group(&mut self, group: Vec<(usize, Vec<u32>)>) {
        let (stepped, feeds): (Vec<usize>, Vec<Vec<u32>>) = group.into_iter().unzip();
        // The batch below is built in slot order and its logits rows are read in `stepped`
        // order: the two must agree.
        debug_assert!(stepped.windows(2).all(|w| w[0] < w[1]), "{stepped:?}");
        let started = Instant::now();
        let hidden = self.hidden;
        let result = {
            // Each sequence's soft tokens inside its chunk (none for generated tokens).
            let mut parts = Vec::with_capacity(stepped.len());
            let mut feeds_iter = feeds.iter();
            for (i, slot) in self.slots.iter_mut().enumerate() {
                if stepped.contains(&i) {
                    let tokens = feeds_iter.next().expect("one feed per stepped slot");
                    let start = slot.cached.len();
                    let soft = slot
                        .active
                        .as_ref()
                        .map(|a| SoftSpan::within(&a.job.soft, hidden, start..start + tokens.len()))
                        .unwrap_or_default();
                    parts.push((tokens.as_slice(), soft, &mut slot.cache));
                }
            }
            let mut seqs: Vec<SeqStep<'_>> = parts
                .iter_mut()
                .map(|(tokens, soft, cache)| SeqStep {
                    tokens,
                    soft: soft.as_slice(),
                    cache,
                })
                .collect();
            forward_all(&self.loaded, &mut seqs, &mut self.logits)
        };
        Metrics::add(
            &self.metrics.busy_micros,
            started.elapsed().as_micros() as u64,
        );
        Metrics::add(&self.metrics.forward_steps, 1);
        if let Err(e) = result {
            for &i in &stepped {
                self.slots[i].cache.clear();
                self.slots[i].cached.truncate(0);
                self.finish(i, Outcome::Failed(format!("model error: {e}")));
            }
            return;
        }
        let vocab = self.loaded.model.vocab_size();
        let mut row_logits = Vec::new();
        for (row, (&i, fed)) in stepped.iter().zip(&feeds).enumerate() {
            let slot = &mut self.slots[i];
            let start = slot.cached.len();
            let keys = match &slot.active {
                Some(a) => soft_keys(&a.job.soft, hidden, start..start + fed.len()),
                None => vec![None; fed.len()],
            };
            slot.cached.push(fed, keys);
            let prompt_pending = self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| !a.to_feed.is_empty());
            if prompt_pending {
                continue;
            }
            row_logits.clear();
            row_logits.extend_from_slice(&self.logits[row * vocab..(row + 1) * vocab]);
            if let Some(outcome) = self.sample_next(i, &mut row_logits) {
                self.finish(i, outcome);
            }
        }
    }

    /// Samples the next token of slot `i` from its logits and sends the text it completes.
    fn sample_next(&mut self, i: usize, logits: &mut [f32]) -> Option<Outcome> {
        let tokenizer = self.loaded.tokenizer.as_ref();
        let slot = &mut self.slots[i];
        let ctx_size = slot.cache.ctx_size();
        let cache_len = slot.cache.len();
        let active = slot.active.as_mut().expect("sampling an active slot");
        let logprob_info = active.job.logprobs.map(|top| (log_softmax(logits), top));
        if let Some(matcher) = &mut active.job.grammar {
            if !apply_mask(matcher, logits) {
                return Some(Outcome::Finished(FinishReason::Stop));
            }
        }
        let text_ids = self.loaded.model.sampleable_vocab().min(logits.len());
        let id = active.sampler.sample(&logits[..text_ids], &active.history);
        active.history.push(id);
        active.generated += 1;
        if !active.first_token_seen {
            active.first_token_seen = true;
            active.first_token_at = Some(Instant::now());
            let ttft = active.job.arrived.elapsed().as_micros() as u64;
            Metrics::add(&self.metrics.ttft_micros_sum, ttft);
            Metrics::add(&self.metrics.ttft_count, 1);
        }
        Metrics::add(&self.metrics.completion_tokens, 1);
        let is_stop_token = self.stop_ids.contains(&id);
        if let Some(matcher) = &mut active.job.grammar {
            if !is_stop_token && matcher.consume_token(id).is_err() {
                return Some(Outcome::Failed(
                    "the grammar rejected a sampled token".into(),
                ));
            }
        }
        let logprobs = logprob_info.map(|(lp, top)| describe_logprobs(tokenizer, &lp, id, top));
        if is_stop_token {
            if logprobs.is_some() {
                let _ = active.job.events.send(JobEvent::Token {
                    text: String::new(),
                    logprobs,
                });
            }
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        let piece = tokenizer
            .map(|t| active.decoder.push(t, id))
            .unwrap_or_default();
        let Filtered {
            emit: text,
            stopped,
        } = active.stops.push(&piece);
        if active
            .job
            .events
            .send(JobEvent::Token { text, logprobs })
            .is_err()
        {
            return Some(Outcome::Cancelled);
        }
        if stopped {
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        let grammar_done = active.job.grammar.as_ref().is_some_and(Matcher::is_stopped);
        if grammar_done {
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        if active.generated >= active.job.params.max_tokens || cache_len >= ctx_size {
            return Some(Outcome::Finished(FinishReason::Length));
        }
        active.to_feed.push(id);
        None
    }

    /// Ends the sequence in slot `i`, sending the final event; the cache stays for reuse.
    fn finish(&mut self, i: usize, outcome: Outcome) {
        let Some(mut active) = self.slots[i].active.take() else {
            return;
        };
        Metrics::sub(&self.metrics.active_slots, 1);
        let usage = Usage::new(active.job.prompt.len(), active.generated);
        let event = match outcome {
            Outcome::Finished(finish) => {
                let Filtered {
                    emit: mut tail,
                    stopped,
                } = active.stops.push(&active.decoder.finish());
                if !stopped {
                    tail.push_str(&active.stops.finish());
                }
                if !tail.is_empty() {
                    let _ = active.job.events.send(JobEvent::Token {
                        text: tail,
                        logprobs: None,
                    });
                }
                let generated = active
                    .history
                    .get(active.job.prompt.len()..)
                    .unwrap_or_default()
                    .to_vec();
                let timings = Timings {
                    started: active.started,
                    first_token: active.first_token_at,
                    finished: Instant::now(),
                    cached_tokens: active.cached_tokens,
                    generated,
                };
                JobEvent::Done {
                    finish,
                    usage,
                    timings,
                }
            }
            Outcome::Cancelled => {
                Metrics::add(&self.metrics.requests_cancelled, 1);
                return;
            }
            Outcome::Failed(message) => {
                Metrics::add(&self.metrics.requests_failed, 1);
                JobEvent::Failed(message)
            }
        };
        let _ = active.job.events.send(event);
    }
}

/// Runs every sequence's new tokens in one batched pass and leaves each one's last-token
/// logits in `out` (`seqs.len() × vocab`).
fn forward_all(
    loaded: &LoadedModel,
    seqs: &mut [SeqStep<'_>],
    out: &mut Vec<f32>,
) -> Result<(), ModelError> {
    loaded.model.forward_batch(seqs, out)
}

/// Shortens the cache to its first `len` positions; `false` when it cannot (a sliding-window
/// layer already overwrote what the continuation needs), and the caller starts from scratch.
fn rewind(cache: &mut KvCache, len: usize) -> bool {
    cache.truncate(len).is_ok()
}

/// Forward passes for one step: every slot's feed (prompt chunk or decode row) in passes of up
/// to `PASS_ROWS` rows, each in slot order (as `run_group` lays a pass's batch out). The
/// matmuls give every row the bits it would get alone (one numeric path for any batch), so
/// batching never changes an output.
fn plan_passes(feeds: Vec<(usize, Vec<u32>)>) -> Vec<Vec<(usize, Vec<u32>)>> {
    let mut passes = pack(feeds, PASS_ROWS);
    for pass in &mut passes {
        pass.sort_by_key(|(slot, _)| *slot);
    }
    passes
}

/// Groups feeds, in order, into passes of at most `max_rows` tokens (a larger feed alone).
fn pack(feeds: Vec<(usize, Vec<u32>)>, max_rows: usize) -> Vec<Vec<(usize, Vec<u32>)>> {
    let mut passes: Vec<Vec<(usize, Vec<u32>)>> = Vec::new();
    let mut rows = 0;
    for feed in feeds {
        if passes.is_empty() || rows + feed.1.len() > max_rows {
            passes.push(Vec::new());
            rows = 0;
        }
        rows += feed.1.len();
        passes.last_mut().expect("pushed above").push(feed);
    }
    passes
}

/// The next piece of `remaining` prompt tokens (last token excluded): at most `PREFILL_CHUNK`.
fn prefill_chunk(remaining: usize) -> usize {
    remaining.min(PREFILL_CHUNK)
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_sum = max + sum.ln() as f32;
    logits.iter().map(|&l| l - log_sum).collect()
}

fn describe_logprobs(
    tokenizer: Option<&gemma_engine::gemma_tokenizer::Tokenizer>,
    logprobs: &[f32],
    chosen: u32,
    top: usize,
) -> TokenLogprob {
    let bytes_of = |id: u32| {
        tokenizer
            .and_then(|t| t.token_bytes(id))
            .unwrap_or_default()
    };
    let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            logprobs[b as usize].total_cmp(&logprobs[a as usize])
        });
        order.truncate(top);
        order.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
    } else {
        order.clear();
    }
    let chosen_bytes = bytes_of(chosen);
    TokenLogprob {
        token: String::from_utf8_lossy(&chosen_bytes).into_owned(),
        logprob: logprobs[chosen as usize],
        bytes: chosen_bytes,
        top_logprobs: order
            .into_iter()
            .map(|id| {
                let bytes = bytes_of(id);
                TopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    logprob: logprobs[id as usize],
                    bytes,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A span of `len` soft tokens at `start` (hidden size 1), keyed by `key`.
    fn span(start: usize, len: usize, key: u8) -> SoftSpan {
        SoftSpan {
            start,
            embeds: vec![0.0; len].into(),
            bidirectional: true,
            key: [key; 32],
        }
    }

    /// What a slot holds after a fresh run of `ids` with `soft`: the worker's chunk plan.
    fn fed(ids: &[u32], soft: &[SoftSpan]) -> Cached {
        let mut cached = Cached::default();
        let mut start = 0;
        while start < ids.len() {
            let pending = ids.len() - start;
            let end = if pending == 1 {
                start + 1
            } else {
                chunk_end(soft, 1, start, start + prefill_chunk(pending - 1))
            };
            cached.push(&ids[start..end], soft_keys(soft, 1, start..end));
            start = end;
        }
        cached
    }

    fn reuse(cached: &Cached, ids: &[u32], soft: &[SoftSpan]) -> usize {
        let keys = soft_keys(soft, 1, 0..ids.len());
        cached.reusable_prefix(&PromptView {
            ids,
            soft,
            keys: &keys,
            hidden: 1,
        })
    }

    /// A 200-token prompt whose positions `image` hold the placeholder id 7.
    fn prompt(image: std::ops::Range<usize>) -> Vec<u32> {
        (0..200u32)
            .map(|i| {
                if image.contains(&(i as usize)) {
                    7
                } else {
                    100 + i
                }
            })
            .collect()
    }

    #[test]
    fn chunks_never_cut_an_image() {
        for image_start in [0, 1, 60, 63, 64, 100, 120, 150, 180] {
            let soft = [span(image_start, 16, 1)];
            let cached = fed(&prompt(image_start..image_start + 16), &soft);
            let r = image_start..image_start + 16;
            assert!(cached.chunks[r.clone()]
                .iter()
                .all(|&c| c == cached.chunks[r.start]));
            let (chunk_start, len) = cached.chunks[r.start];
            assert!(chunk_start <= r.start && chunk_start + len >= r.end);
        }
    }

    #[test]
    fn the_same_image_is_reused_and_another_one_is_not() {
        for image_start in [10, 64, 100, 120, 150] {
            let image = image_start..image_start + 16;
            let ids = prompt(image.clone());
            let a = [span(image_start, 16, 1)];
            let b = [span(image_start, 16, 2)];
            let cached = fed(&ids, &a);
            let full = reuse(&cached, &ids, &a);
            assert!(
                full >= image.end,
                "{image:?}: same image reuses only {full}"
            );
            let other = reuse(&cached, &ids, &b);
            assert!(
                other <= image.start,
                "{image:?}: a different image reuses {other} positions"
            );
            // Everything before the chunk holding the image is still shared.
            let (chunk_start, _) = cached.chunks[image.start];
            assert_eq!(other, chunk_start, "{image:?}");
            // The same ids with no image at all share nothing from the image on either.
            assert!(reuse(&cached, &ids, &[]) <= image.start);
            let text_only = fed(&ids, &[]);
            assert!(reuse(&text_only, &ids, &a) <= image.start);
        }
    }

    fn feed(slot: usize, n: usize) -> (usize, Vec<u32>) {
        (slot, vec![7; n])
    }

    fn shape(passes: &[Vec<(usize, Vec<u32>)>]) -> Vec<Vec<(usize, usize)>> {
        passes
            .iter()
            .map(|p| p.iter().map(|(s, t)| (*s, t.len())).collect())
            .collect()
    }

    #[test]
    fn prompt_chunks_and_decode_rows_share_passes_in_slot_order() {
        // Decode rows of slots 1, 2 and 5, a short last prompt chunk on slot 0, long chunks on
        // 3, 4 and 6: one pass, laid out in slot order.
        let feeds = vec![
            feed(1, 1),
            feed(2, 1),
            feed(5, 1),
            feed(0, 12),
            feed(3, 64),
            feed(4, 64),
            feed(6, 40),
        ];
        assert_eq!(
            shape(&plan_passes(feeds)),
            vec![vec![
                (0, 12),
                (1, 1),
                (2, 1),
                (3, 64),
                (4, 64),
                (5, 1),
                (6, 40)
            ]]
        );
        // Twenty decode rows: one pass (the old per-row path took at most 19).
        let many: Vec<_> = (0..20).map(|s| feed(s, 1)).collect();
        assert_eq!(plan_passes(many).len(), 1);
        // More rows than one pass takes: split between feeds, never inside one.
        let long: Vec<_> = (0..10).map(|s| feed(s, 64)).collect();
        let passes = plan_passes(long);
        assert_eq!(passes.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 2]);
        for pass in &passes {
            assert!(pass.iter().map(|(_, t)| t.len()).sum::<usize>() <= PASS_ROWS);
        }
    }

    #[test]
    fn the_prompt_end_is_always_fed() {
        // An image running to the end of the prompt: reuse never reaches the last token.
        let ids = prompt(184..200);
        let soft = [span(184, 16, 1)];
        let cached = fed(&ids, &soft);
        let r = reuse(&cached, &ids, &soft);
        assert!(r < ids.len() && r <= 184, "{r}");
    }
}
