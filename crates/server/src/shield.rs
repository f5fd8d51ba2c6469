//! The safety filter of `gemma serve --shield`: safety classifiers (text ShieldGemma on the
//! user's text and on the reply, ShieldGemma 2 on the request's images) between the client and
//! the generation.
//!
//! - **Input**: the request's user text (the last user message, or a completion's prompt) is
//!   checked against the text policies and its images against the image policies. The check
//!   runs on a blocking thread while the scheduler already prefills the prompt; the reply's
//!   first token is only released once it passed. A hit ends the request with
//!   `finish_reason: "content_filter"` and a message naming the policy (the job is dropped,
//!   which frees its slot).
//! - **Output**: the reply is held back and checked with the response prompt (user text +
//!   reply so far) in windows when streamed (the first of `first_window` tokens, each next one
//!   twice as long up to `window`: [`next_window`]), and whole at the end either way; text
//!   goes out only after the check that covers it passed. A hit ends the reply there, and
//!   nothing of the flagged window is sent. Each stream keeps a classifier cache
//!   ([`ShieldCache`]) holding the prompt up to the reply so far, so a window's check feeds its
//!   new tokens and the policies' suffixes, not the whole reply again (the result is the
//!   fresh prompt's); the cache is primed with the prompt up to the reply while the main model
//!   still prefills, so the first window's check does not feed the user's text either.
//! - `--shield-stages` turns either stage off (input checks only, or output checks only).
//! - A check that cannot run (an engine error, a prompt longer than the classifier's context,
//!   a panic) fails the request closed: an error, never an unchecked answer.
//! - Audio is not classified (no ShieldGemma takes it): the input check sees a message's text
//!   parts, the reply to an `input_audio` part is checked like any reply, and
//!   `/v1/audio/transcriptions|translations` (the client's own audio restated) pass unfiltered.
//!
//! The classifiers are ordinary loaded models (memory-mapped, sharing the process's kernel
//! thread pool with the main model), each wrapped once in a [`Shield`] (its Yes/No ids and
//! compiled template). A check runs all policies of an input in one batched pass over their
//! shared prefix ([`Shield::p_yes_all`]); the first policy in order at or above the threshold
//! is the hit. Caches of finished checks are pooled: a new check reuses the common prefix
//! (the prompt's preamble) of the last one that ran in that cache.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gemma_engine::shield::Modality;
use gemma_engine::{
    resolve_policies, ImageOptions, LoadedModel, Policy, PolicySpec, Shield, ShieldCache,
    ShieldInput,
};
use tokio::sync::mpsc;

use crate::api::Usage;
use crate::metrics::Metrics;
use crate::scheduler::{FinishReason, JobEvent, Timings};

/// Default `--shield-window`: the most generated tokens held back per output check of a
/// streamed reply.
pub const DEFAULT_WINDOW: usize = 64;

/// Default `--shield-first-window`: the first output check of a stream covers its first token,
/// so the first text waits for one check, not for a whole window of generation.
pub const DEFAULT_FIRST_WINDOW: usize = 1;

/// The window after one of `current` tokens: twice as long, up to `max`. A stream's windows
/// start at the first window and double, so the first text comes early and a long reply
/// still costs few checks (each check feeds every policy's suffix, about 100 tokens).
pub fn next_window(current: usize, max: usize) -> usize {
    current.saturating_mul(2).clamp(1, max.max(1))
}

/// What `gemma serve --shield` was told besides the models.
#[derive(Clone, Debug)]
pub struct ShieldOptions {
    /// Built-in policies by name (each applies to the modality that has it); empty with no
    /// `policy_texts`: every built-in policy of each checked modality.
    pub policies: Vec<String>,
    /// Policies of one's own (applied to every checked modality).
    pub policy_texts: Vec<String>,
    /// P(Yes) at or above this blocks.
    pub threshold: f32,
    /// The most tokens per output check of a streamed reply.
    pub window: usize,
    /// Tokens in a stream's first output check; later windows double up to `window`.
    pub first_window: usize,
    /// Check the request before generation (`--shield-stages input`).
    pub input: bool,
    /// Check the reply (`--shield-stages output`).
    pub output: bool,
    /// Longest classifier prompt in tokens (at most each model's own context; 0: the model's).
    pub ctx_size: usize,
}

impl Default for ShieldOptions {
    fn default() -> Self {
        ShieldOptions {
            policies: Vec::new(),
            policy_texts: Vec::new(),
            threshold: 0.5,
            window: DEFAULT_WINDOW,
            first_window: DEFAULT_FIRST_WINDOW,
            input: true,
            output: true,
            ctx_size: 0,
        }
    }
}

/// A classifier model, wrapped once, with its pool of caches.
struct Classifier {
    loaded: Arc<LoadedModel>,
    shield: Shield<'static>,
    /// Caches of finished checks, for the next ones (at most [`POOLED_CACHES`]).
    pool: Mutex<Vec<ShieldCache>>,
}

/// Caches a classifier keeps between checks.
const POOLED_CACHES: usize = 4;

/// Largest idle cache (positions) a pool keeps.
const POOLED_MAX_POSITIONS: usize = 1024;

impl Classifier {
    fn new(loaded: Arc<LoadedModel>, ctx: usize) -> Result<Classifier> {
        Ok(Classifier {
            shield: Shield::shared(loaded.clone(), ctx)?,
            loaded,
            pool: Mutex::new(Vec::new()),
        })
    }

    fn take_cache(&self) -> ShieldCache {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    /// Keeps an idle cache for the next check: its prefix only (the per-policy copies are
    /// dropped), and only a small one (a long reply's cache is freed).
    fn return_cache(&self, mut cache: ShieldCache) {
        cache.trim();
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED_CACHES && cache.capacity() <= POOLED_MAX_POSITIONS {
            pool.push(cache);
        }
    }
}

/// The loaded, validated filter.
pub struct ShieldFilter {
    text: Option<Classifier>,
    image: Option<Classifier>,
    text_policies: Vec<Policy>,
    image_policies: Vec<Policy>,
    threshold: f32,
    window: usize,
    first_window: usize,
    input: bool,
    output: bool,
    /// What the filter will not check (printed at start-up).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for ShieldFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |ps: &[Policy]| ps.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        f.debug_struct("ShieldFilter")
            .field(
                "text",
                &self.text.as_ref().map(|c| c.loaded.display_name.clone()),
            )
            .field(
                "image",
                &self.image.as_ref().map(|c| c.loaded.display_name.clone()),
            )
            .field("text_policies", &names(&self.text_policies))
            .field("image_policies", &names(&self.image_policies))
            .field("threshold", &self.threshold)
            .field("window", &self.window)
            .field("first_window", &self.first_window)
            .field("input", &self.input)
            .field("output", &self.output)
            .finish()
    }
}

/// Where a check happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

/// The request's part the input check looks at (set by the preparation when a filter is on).
#[derive(Debug, Default)]
pub struct ShieldRequest {
    /// The last user message's text, or a completion's prompt.
    pub text: String,
    /// The encoded bytes of the request's images (only when an image classifier is loaded).
    pub images: Vec<Vec<u8>>,
}

impl ShieldFilter {
    /// Validates the classifiers and the policies: everything that could fail at the first
    /// request fails here (not a classifier, an unknown or empty policy, a policy whose prompt
    /// does not fit the classifier's context, a policy for a modality no classifier takes).
    pub fn new(models: Vec<LoadedModel>, opts: &ShieldOptions) -> Result<ShieldFilter> {
        if !(0.0..=1.0).contains(&opts.threshold) {
            bail!("--shield-threshold must be a probability between 0 and 1");
        }
        if opts.window == 0 || opts.first_window == 0 {
            bail!("--shield-window and --shield-first-window must be at least 1 token");
        }
        if !opts.input && !opts.output {
            bail!("--shield-stages names no stage: give input, output or both");
        }
        if models.is_empty() {
            bail!("the safety filter needs a classifier model (--shield MODEL)");
        }
        let mut text: Option<Classifier> = None;
        let mut image: Option<Classifier> = None;
        for model in models {
            let name = model.display_name.clone();
            let ctx = match (opts.ctx_size, model.model.context_length()) {
                (0, 0) => 8192,
                (0, trained) => trained,
                (asked, _) => asked,
            };
            let loaded = Arc::new(model);
            let classifier =
                Classifier::new(loaded, ctx).with_context(|| format!("--shield {name}"))?;
            let (takes_text, takes_images) = (
                classifier.shield.takes_text(),
                classifier.shield.takes_images(),
            );
            let mut used = false;
            if takes_text && text.is_none() {
                text = Some(Classifier::new(classifier.loaded.clone(), ctx)?);
                used = true;
            }
            if takes_images && image.is_none() {
                image = Some(classifier);
                used = true;
            }
            if !used {
                bail!(
                    "--shield {name}: the other classifier already checks what this one \
                     checks (give at most one text and one image classifier)"
                );
            }
        }
        let mut checked = Vec::new();
        if text.is_some() {
            checked.push(Modality::Text);
        }
        if image.is_some() {
            checked.push(Modality::Image);
        }
        for name in &opts.policies {
            if checked.iter().any(|m| m.knows(name)) {
                continue;
            }
            let missing = [Modality::Text, Modality::Image]
                .into_iter()
                .find(|m| m.knows(name));
            match missing {
                Some(Modality::Text) => bail!(
                    "--shield-policies {name}: a text policy, but no --shield model checks \
                     text (ShieldGemma 2 classifies images; add a text ShieldGemma)"
                ),
                Some(Modality::Image) => bail!(
                    "--shield-policies {name}: an image policy, but no --shield model checks \
                     images (add ShieldGemma 2)"
                ),
                None => bail!(
                    "unknown policy {name:?} in --shield-policies (text: {}; images: {}; or \
                     give its text with --shield-policy-text)",
                    Modality::Text.names().join(", "),
                    Modality::Image.names().join(", ")
                ),
            }
        }
        let resolve = |m: Modality| -> Result<Vec<Policy>> {
            let mut specs: Vec<PolicySpec> = opts
                .policies
                .iter()
                .filter(|n| m.knows(n))
                .map(|n| PolicySpec::Named(n.clone()))
                .collect();
            specs.extend(opts.policy_texts.iter().cloned().map(PolicySpec::Custom));
            if specs.is_empty() && !opts.policies.is_empty() {
                return Ok(Vec::new());
            }
            resolve_policies(m, &specs).map_err(|e| anyhow::anyhow!("--shield-policy-text: {e:#}"))
        };
        let mut warnings = Vec::new();
        let text_policies = match &text {
            Some(c) => {
                let policies = resolve(Modality::Text)?;
                let shield = &c.shield;
                shield
                    .check_text_policies(&policies, false)
                    .and_then(|()| shield.check_text_policies(&policies, true))
                    .with_context(|| format!("--shield {}", c.loaded.display_name))?;
                policies
            }
            None => {
                warnings.push(
                    "no --shield model checks text: prompts and replies are not checked".into(),
                );
                Vec::new()
            }
        };
        let image_policies = match &image {
            Some(c) => {
                let policies = resolve(Modality::Image)?;
                let shield = &c.shield;
                for policy in &policies {
                    let prompt = shield.image_prompt_text(policy)?;
                    let n = c.loaded.encode_prompt(&prompt)?.len();
                    if n > shield.ctx_limit() {
                        bail!(
                            "--shield {}: policy {:?} alone makes a {n}-token prompt, more than \
                             the classifier's context of {} tokens",
                            c.loaded.display_name,
                            policy.name,
                            shield.ctx_limit()
                        );
                    }
                }
                policies
            }
            None => {
                warnings.push(
                    "no --shield model takes images: images in requests are not checked \
                     (add ShieldGemma 2 with a second --shield)"
                        .into(),
                );
                Vec::new()
            }
        };
        if text.is_some() && text_policies.is_empty() {
            warnings.push("no text policy was named: text is not checked".into());
        }
        if image.is_some() && image_policies.is_empty() {
            warnings.push("no image policy was named: images are not checked".into());
        }
        if !opts.input {
            warnings.push("--shield-stages output: requests are not checked".into());
        }
        if !opts.output {
            warnings.push("--shield-stages input: replies are not checked".into());
        }
        Ok(ShieldFilter {
            text,
            image,
            text_policies,
            image_policies,
            threshold: opts.threshold,
            window: opts.window,
            first_window: opts.first_window.min(opts.window),
            input: opts.input,
            output: opts.output,
            warnings,
        })
    }

    /// Whether the input check needs the request's image bytes.
    pub fn checks_images(&self) -> bool {
        self.image.is_some() && !self.image_policies.is_empty()
    }

    /// Every policy name a hit can carry (for `/metrics`).
    pub fn policy_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .text_policies
            .iter()
            .chain(&self.image_policies)
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The most tokens per output check of a streamed reply.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Tokens in a stream's first output check (later ones: [`next_window`]).
    pub fn first_window(&self) -> usize {
        self.first_window
    }

    /// The first policy the user's text or one of the images violates, if any.
    pub fn check_input(&self, text: &str, images: &[Vec<u8>]) -> Result<Option<String>> {
        if let Some(c) = &self.text {
            if !self.text_policies.is_empty() && !text.trim().is_empty() {
                let input = ShieldInput::Text {
                    label: "prompt",
                    prompt: text,
                    response: None,
                };
                if let Some(hit) = self.first_hit(c, &[input], &self.text_policies)? {
                    return Ok(Some(hit));
                }
            }
        }
        if let (Some(c), false) = (&self.image, images.is_empty()) {
            if !self.image_policies.is_empty() {
                let prepared = images
                    .iter()
                    .map(|bytes| c.loaded.prepare_image(bytes, &ImageOptions::default()))
                    .collect::<Result<Vec<_>>>()
                    .context("preparing an image for the classifier")?;
                let inputs: Vec<ShieldInput<'_>> = prepared
                    .iter()
                    .map(|image| ShieldInput::Image {
                        label: "image",
                        image,
                    })
                    .collect();
                return self.first_hit(c, &inputs, &self.image_policies);
            }
        }
        Ok(None)
    }

    /// The first policy the reply (to `prompt`) violates, if any, checked in a pooled cache.
    pub fn check_output(&self, prompt: &str, response: &str) -> Result<Option<String>> {
        let mut cache = self.output_cache();
        let verdict = self.check_output_in(&mut cache, prompt, response);
        self.end_output(cache);
        verdict
    }

    /// A cache for a stream's output checks (from the text classifier's pool).
    pub fn output_cache(&self) -> ShieldCache {
        self.text
            .as_ref()
            .map(Classifier::take_cache)
            .unwrap_or_default()
    }

    /// Feeds into a stream's `cache` the reply prompt up to where the reply starts (the
    /// preamble and the user's text), while the main model prefills: the stream's first
    /// output check then feeds only its window and the policies' suffixes.
    pub fn prime_output(&self, cache: &mut ShieldCache, prompt: &str) -> Result<()> {
        let Some(c) = &self.text else {
            return Ok(());
        };
        if self.text_policies.is_empty() {
            return Ok(());
        }
        let input = ShieldInput::Text {
            label: "response",
            prompt,
            response: Some(""),
        };
        c.shield.prime(cache, &input, &self.text_policies)
    }

    /// Gives a stream's cache back to the pool.
    pub fn end_output(&self, cache: ShieldCache) {
        if let Some(c) = &self.text {
            c.return_cache(cache);
        }
    }

    /// [`ShieldFilter::check_output`] in a stream's own `cache`: what the cache holds of the
    /// prompt from the stream's last check (the reply so far) is not fed again.
    pub fn check_output_in(
        &self,
        cache: &mut ShieldCache,
        prompt: &str,
        response: &str,
    ) -> Result<Option<String>> {
        let Some(c) = &self.text else {
            return Ok(None);
        };
        if self.text_policies.is_empty() || response.trim().is_empty() {
            return Ok(None);
        }
        let input = ShieldInput::Text {
            label: "response",
            prompt,
            response: Some(response),
        };
        self.hit_in(c, cache, &[input], &self.text_policies)
    }

    /// Runs `inputs` × `policies` (an input's policies in one batched pass) in a pooled cache
    /// and returns the first policy at or above the threshold.
    fn first_hit(
        &self,
        c: &Classifier,
        inputs: &[ShieldInput<'_>],
        policies: &[Policy],
    ) -> Result<Option<String>> {
        let mut cache = c.take_cache();
        let verdict = self.hit_in(c, &mut cache, inputs, policies);
        c.return_cache(cache);
        verdict
    }

    fn hit_in(
        &self,
        c: &Classifier,
        cache: &mut ShieldCache,
        inputs: &[ShieldInput<'_>],
        policies: &[Policy],
    ) -> Result<Option<String>> {
        for input in inputs {
            let prompts = c.shield.prompts(input, policies)?;
            let p = c.shield.p_yes_all(cache, &prompts)?;
            if let Some(i) = p.iter().position(|&p| p >= self.threshold) {
                return Ok(Some(policies[i].name.clone()));
            }
        }
        Ok(None)
    }
}

/// What the client gets instead of a flagged request or reply: the policy's name, never the
/// classifier's output.
pub fn block_message(stage: Stage, policy: &str) -> String {
    match stage {
        Stage::Input => {
            format!("This request was blocked by the safety filter (policy: {policy}).")
        }
        Stage::Output => {
            format!("This response was blocked by the safety filter (policy: {policy}).")
        }
    }
}

/// The counters of `/metrics` for the filter.
#[derive(Default)]
pub struct ShieldMetrics {
    pub input_checks: AtomicU64,
    pub output_checks: AtomicU64,
    pub blocked_input: AtomicU64,
    pub blocked_output: AtomicU64,
    pub failures: AtomicU64,
    /// Hits per policy name.
    pub hits: Mutex<BTreeMap<String, u64>>,
    /// Check durations: a histogram over [`CHECK_BUCKETS`] (cumulative counts are computed
    /// when rendering), their sum and count.
    pub buckets: [AtomicU64; CHECK_BUCKETS.len()],
    pub micros_sum: AtomicU64,
    pub count: AtomicU64,
}

/// Upper bounds (seconds) of the check-duration histogram's buckets.
pub const CHECK_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl ShieldMetrics {
    fn record(&self, stage: Stage, seconds: f64) {
        let checks = match stage {
            Stage::Input => &self.input_checks,
            Stage::Output => &self.output_checks,
        };
        Metrics::add(checks, 1);
        if let Some(i) = CHECK_BUCKETS.iter().position(|&b| seconds <= b) {
            Metrics::add(&self.buckets[i], 1);
        }
        Metrics::add(&self.micros_sum, (seconds * 1e6) as u64);
        Metrics::add(&self.count, 1);
    }

    fn hit(&self, stage: Stage, policy: &str) {
        let blocked = match stage {
            Stage::Input => &self.blocked_input,
            Stage::Output => &self.blocked_output,
        };
        Metrics::add(blocked, 1);
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        *hits.entry(policy.to_owned()).or_default() += 1;
    }

    /// Shows every policy in `/metrics` from the start, at 0.
    pub fn register(&self, policies: &[String]) {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        for p in policies {
            hits.entry(p.clone()).or_default();
        }
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "gemma_shield_checks_total",
            "counter",
            "Safety-filter checks run (input: the request, output: a window of the reply)",
            vec![
                (
                    "{stage=\"input\"}".into(),
                    get(&self.input_checks).to_string(),
                ),
                (
                    "{stage=\"output\"}".into(),
                    get(&self.output_checks).to_string(),
                ),
            ],
        );
        family(
            "gemma_shield_blocked_total",
            "counter",
            "Requests ended by the safety filter, by where the hit was",
            vec![
                (
                    "{stage=\"input\"}".into(),
                    get(&self.blocked_input).to_string(),
                ),
                (
                    "{stage=\"output\"}".into(),
                    get(&self.blocked_output).to_string(),
                ),
            ],
        );
        let hits = self
            .hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, n)| (format!("{{policy=\"{}\"}}", escape_label(p)), n.to_string()))
            .collect();
        family(
            "gemma_shield_hits_total",
            "counter",
            "Safety-filter hits (P(Yes) at or above the threshold) per policy",
            hits,
        );
        family(
            "gemma_shield_failures_total",
            "counter",
            "Safety-filter checks that could not run (the request failed closed)",
            vec![(String::new(), get(&self.failures).to_string())],
        );
        let mut lines = Vec::new();
        let mut cumulative = 0;
        for (bound, bucket) in CHECK_BUCKETS.iter().zip(&self.buckets) {
            cumulative += get(bucket);
            lines.push((format!("_bucket{{le=\"{bound}\"}}"), cumulative.to_string()));
        }
        lines.push(("_bucket{le=\"+Inf\"}".into(), get(&self.count).to_string()));
        lines.push((
            "_sum".into(),
            format!("{:.6}", get(&self.micros_sum) as f64 / 1e6),
        ));
        lines.push(("_count".into(), get(&self.count).to_string()));
        family(
            "gemma_shield_check_seconds",
            "histogram",
            "Time the safety-filter checks took (each runs beside generation)",
            lines,
        );
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Runs one check on a blocking thread, recording it; any error (or panic) is the message of
/// a closed failure.
async fn run_check(
    metrics: &Metrics,
    stage: Stage,
    check: impl FnOnce() -> Result<Option<String>> + Send + 'static,
) -> Result<Option<String>, String> {
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(check).await;
    metrics
        .shield
        .record(stage, started.elapsed().as_secs_f64());
    let verdict = match result {
        Ok(Ok(verdict)) => Ok(verdict),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(format!("the check panicked: {e}")),
    };
    match &verdict {
        Ok(Some(policy)) => metrics.shield.hit(stage, policy),
        Ok(None) => {}
        Err(_) => Metrics::add(&metrics.shield.failures, 1),
    }
    verdict.map_err(|e| format!("the safety check failed ({} check): {e}", stage.as_str()))
}

/// Puts the filter between the scheduler's events for a job and the response writer: returns
/// the events the writer should see. Nothing of the reply comes out before the input check
/// passed; then text comes out window by window as the output checks pass (when `streamed`:
/// the filter's first window, then each twice the last up to its `window`; otherwise the whole
/// reply at once). While the main model prefills, the stream's classifier cache is primed with
/// the reply prompt's head ([`ShieldFilter::prime_output`]). Either stage may be off
/// (`--shield-stages`). A hit ends the events with the block message as text and
/// `Done { finish: ContentFilter }`; a failed check with `Failed`. Either drops the job's
/// receiver, which cancels the generation.
pub(crate) fn filter_events(
    filter: Arc<ShieldFilter>,
    metrics: Arc<Metrics>,
    request: ShieldRequest,
    prompt_tokens: usize,
    streamed: bool,
    mut inner: mpsc::UnboundedReceiver<JobEvent>,
) -> mpsc::UnboundedReceiver<JobEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let started = Instant::now();
        let request = Arc::new(request);
        let verdict = if filter.input {
            let (filter, request) = (filter.clone(), request.clone());
            run_check(&metrics, Stage::Input, move || {
                filter.check_input(&request.text, &request.images)
            })
            .await
        } else {
            Ok(None)
        };
        let block = |stage: Stage, policy: &str, generated: usize| {
            let _ = tx.send(JobEvent::Token {
                text: block_message(stage, policy),
                logprobs: None,
            });
            let _ = tx.send(JobEvent::Done {
                finish: FinishReason::ContentFilter,
                usage: Usage::new(prompt_tokens, generated),
                timings: Timings {
                    started,
                    first_token: None,
                    finished: Instant::now(),
                    cached_tokens: 0,
                    generated: Vec::new(),
                },
            });
        };
        match verdict {
            Err(message) => {
                let _ = tx.send(JobEvent::Failed(message));
                return;
            }
            Ok(Some(policy)) => {
                block(Stage::Input, &policy, 0);
                return;
            }
            Ok(None) => {}
        }
        if !filter.output {
            // Input checks only: the reply goes out as generated.
            loop {
                let event = tokio::select! {
                    event = inner.recv() => event,
                    _ = tx.closed() => return,
                };
                match event {
                    Some(event) => {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        }
        // Not streamed: one check of the whole reply.
        let (mut window, max_window) = if streamed {
            (filter.first_window(), filter.window())
        } else {
            (usize::MAX, usize::MAX)
        };
        // The stream's classifier cache: the prompt up to the reply so far stays in it between
        // windows. Given back to the pool when the stream ends (a dropped stream drops it).
        let stream_cache = Arc::new(Mutex::new(filter.output_cache()));
        let _give_back = GiveBack {
            filter: filter.clone(),
            cache: stream_cache.clone(),
        };
        {
            // Primed on a blocking thread while the main model prefills; the first output
            // check waits for the cache's lock. A priming that fails leaves the cache empty
            // (the check then feeds everything itself and fails closed on its own error).
            let (filter, request, cache) = (filter.clone(), request.clone(), stream_cache.clone());
            tokio::task::spawn_blocking(move || {
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                let _ = filter.prime_output(&mut cache, &request.text);
            });
        }
        let mut held: Vec<JobEvent> = Vec::new();
        let mut held_tokens = 0;
        let mut held_text = String::new();
        let mut passed_text = String::new();
        let mut generated = 0;
        loop {
            let event = tokio::select! {
                event = inner.recv() => event,
                _ = tx.closed() => return,
            };
            let end = match event {
                Some(JobEvent::Token { text, logprobs }) => {
                    generated += 1;
                    held_tokens += 1;
                    held_text.push_str(&text);
                    held.push(JobEvent::Token { text, logprobs });
                    None
                }
                Some(done @ JobEvent::Done { .. }) => Some(done),
                Some(failed @ JobEvent::Failed(_)) => {
                    let _ = tx.send(failed);
                    return;
                }
                None => return,
            };
            if end.is_none() && held_tokens < window {
                continue;
            }
            window = next_window(window, max_window);
            if !held_text.trim().is_empty() {
                passed_text.push_str(&held_text);
                let (filter, request, reply, cache) = (
                    filter.clone(),
                    request.clone(),
                    passed_text.clone(),
                    stream_cache.clone(),
                );
                let verdict = run_check(&metrics, Stage::Output, move || {
                    let mut cache = cache.lock().unwrap_or_else(|e| {
                        // A check that panicked: its cache may be half-written.
                        let mut cache = e.into_inner();
                        cache.reset();
                        cache
                    });
                    filter.check_output_in(&mut cache, &request.text, &reply)
                })
                .await;
                match verdict {
                    Err(message) => {
                        let _ = tx.send(JobEvent::Failed(message));
                        return;
                    }
                    Ok(Some(policy)) => {
                        block(Stage::Output, &policy, generated);
                        return;
                    }
                    Ok(None) => {}
                }
            } else {
                passed_text.push_str(&held_text);
            }
            for event in held.drain(..) {
                if tx.send(event).is_err() {
                    return;
                }
            }
            held_tokens = 0;
            held_text.clear();
            if let Some(done) = end {
                let _ = tx.send(done);
                return;
            }
        }
    });
    rx
}

/// Gives a stream's classifier cache back to the pool when the stream's task ends.
struct GiveBack {
    filter: Arc<ShieldFilter>,
    cache: Arc<Mutex<ShieldCache>>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        // A check still running on a blocking thread holds the lock: then the cache is left
        // to that thread and dropped with it.
        if let Ok(mut cache) = self.cache.try_lock() {
            self.filter.end_output(std::mem::take(&mut *cache));
        }
    }
}
