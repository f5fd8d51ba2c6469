//! The generation loop: feed the prompt, then sample one token at a time until a stop
//! condition, streaming text as it becomes printable.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gemma_models::{KvCache, Logits, SoftTokens};
use gemma_tokenizer::{ChatMessage, StreamDecoder};

use crate::audio::PreparedAudio;
use crate::load::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopStringFilter;
use crate::vision::PreparedImage;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence or end-of-turn token.
    EndOfTurn,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The output contained one of the stop strings.
    StopString,
    /// The KV cache is full.
    ContextFull,
    /// The text callback asked to stop.
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfTurn => "end of turn",
            StopReason::MaxTokens => "max tokens",
            StopReason::StopString => "stop string",
            StopReason::ContextFull => "context full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    /// Tokens fed before the first sampled one (the new prompt tokens of this call).
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_secs: f64,
    pub gen_secs: f64,
    pub stop_reason: StopReason,
    /// The sampled ids, including a final stop token.
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_secs)
    }

    pub fn gen_tokens_per_sec(&self) -> f64 {
        rate(self.generated_tokens, self.gen_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// A tower's soft tokens (an image view, an audio clip) at positions of a sequence: they
/// replace the embeddings of the placeholder ids there.
#[derive(Clone, Debug)]
pub struct SoftSpan {
    /// First position, relative to the ids the span comes with.
    pub start: usize,
    /// `len × hidden_size` values.
    pub embeds: Arc<[f32]>,
    /// Attends to itself in both directions (Gemma 3 images); such a span is fed whole.
    pub bidirectional: bool,
    /// Content key (a hash of the media and how it was prepared): what a prefix cache compares
    /// instead of the placeholder ids.
    pub key: [u8; 32],
}

impl SoftSpan {
    /// Positions covered, given the model's hidden size.
    pub fn range(&self, hidden: usize) -> std::ops::Range<usize> {
        self.start..self.start + self.embeds.len() / hidden.max(1)
    }

    /// The parts of `spans` inside the positions `range`, offsets relative to `range.start`:
    /// what a forward pass over `range` takes.
    pub fn within(
        spans: &[SoftSpan],
        hidden: usize,
        range: std::ops::Range<usize>,
    ) -> Vec<SoftTokens<'_>> {
        spans
            .iter()
            .filter_map(|s| {
                let r = s.range(hidden);
                let (lo, hi) = (r.start.max(range.start), r.end.min(range.end));
                (lo < hi).then(|| SoftTokens {
                    offset: lo - range.start,
                    embeds: &s.embeds[(lo - r.start) * hidden..(hi - r.start) * hidden],
                    bidirectional: s.bidirectional,
                })
            })
            .collect()
    }
}

/// Where to end a prompt chunk that starts at `start` and would end at `end`, so that no
/// bidirectional span is cut: the chunk stops before such a span, or takes it whole when it
/// starts the chunk.
pub fn chunk_end(spans: &[SoftSpan], hidden: usize, start: usize, end: usize) -> usize {
    for s in spans.iter().filter(|s| s.bidirectional) {
        let r = s.range(hidden);
        if r.start < end && end < r.end && r.end > start {
            return if r.start > start { r.start } else { r.end };
        }
    }
    end
}

/// One sequence being generated: a KV cache plus every token it has seen. Keeping the session
/// between calls (multi-turn chat) means only new tokens are fed.
pub struct Session<'m> {
    loaded: &'m LoadedModel,
    cache: KvCache,
    /// Every token of the sequence. The cache holds the first `cache.len()` of them; the rest
    /// (at most the last sampled token) are fed at the start of the next call.
    history: Vec<u32>,
    /// Soft tokens placed on `history` (absolute positions), in order.
    soft: Vec<SoftSpan>,
    stop_ids: Vec<u32>,
    logits: Vec<f32>,
}

impl<'m> Session<'m> {
    pub fn new(loaded: &'m LoadedModel, ctx_size: usize) -> Result<Session<'m>> {
        let cache = loaded
            .model
            .new_cache(ctx_size)
            .context("cannot allocate the KV cache")?;
        Ok(Session {
            loaded,
            cache,
            history: Vec::new(),
            soft: Vec::new(),
            stop_ids: loaded.stop_token_ids(),
            logits: Vec::new(),
        })
    }

    pub fn loaded(&self) -> &'m LoadedModel {
        self.loaded
    }

    pub fn history(&self) -> &[u32] {
        &self.history
    }

    pub fn ctx_size(&self) -> usize {
        self.cache.ctx_size()
    }

    /// Tokens that end generation.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Forgets the sequence (the cache memory is kept).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
        self.soft.clear();
    }

    /// Appends `new_ids` to the sequence and generates a continuation. `on_text` receives the
    /// generated text piece by piece and returns `false` to stop early. Without a tokenizer
    /// no text is produced, but the ids are still in the returned stats.
    pub fn generate(
        &mut self,
        new_ids: &[u32],
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        self.generate_with(new_ids, &[], params, on_text)
    }

    /// [`Session::generate`] where `soft` (positions relative to `new_ids`) replaces the
    /// embeddings of some of the new ids: images, audio.
    pub fn generate_with(
        &mut self,
        new_ids: &[u32],
        soft: &[SoftSpan],
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let prompt_start = Instant::now();
        let to_feed = self.prefill(new_ids, soft, params, Logits::Last)?;
        let prompt_secs = prompt_start.elapsed().as_secs_f64();

        let gen_start = Instant::now();
        let mut sampler = Sampler::new(params);
        let mut decoder = StreamDecoder::new();
        let mut stops = StopStringFilter::new(&params.stop);
        let tokenizer = self.loaded.tokenizer.as_ref();
        let mut generated = Vec::new();
        let stop_reason = loop {
            if generated.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            let text_ids = self.loaded.model.sampleable_vocab();
            let id = sampler.sample(&self.logits[..text_ids], &self.history);
            self.history.push(id);
            generated.push(id);
            if self.stop_ids.contains(&id) {
                break StopReason::EndOfTurn;
            }
            if let Some(tokenizer) = tokenizer {
                let piece = decoder.push(tokenizer, id);
                let filtered = stops.push(&piece);
                if !filtered.emit.is_empty() && !on_text(&filtered.emit) {
                    break StopReason::Cancelled;
                }
                if filtered.stopped {
                    break StopReason::StopString;
                }
            }
            if self.cache.len() >= self.cache.ctx_size() {
                break StopReason::ContextFull;
            }
            let at = self.history.len() - 1;
            self.feed(at..at + 1, Logits::Last)?;
        };
        if matches!(
            stop_reason,
            StopReason::EndOfTurn | StopReason::MaxTokens | StopReason::ContextFull
        ) {
            let mut tail = decoder.finish();
            let filtered = stops.push(&tail);
            tail = filtered.emit;
            if !filtered.stopped {
                tail.push_str(&stops.finish());
            }
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        Ok(GenerationStats {
            prompt_tokens: to_feed,
            generated_tokens: generated.len(),
            prompt_secs,
            gen_secs: gen_start.elapsed().as_secs_f64(),
            stop_reason,
            tokens: generated,
        })
    }

    /// Feeds `ids` (with `soft` placed on them) after what the session holds, computing no
    /// logits: a prompt's prefix, or streamed audio, whose answer comes later.
    pub fn append(&mut self, ids: &[u32], soft: &[SoftSpan]) -> Result<()> {
        self.prefill(ids, soft, &SamplingParams::default(), Logits::None)?;
        Ok(())
    }

    /// Appends `new_ids` (and their soft tokens) to the sequence and feeds them, in pieces of
    /// the batch size, with `last` logits of the final piece. Returns how many tokens were fed.
    fn prefill(
        &mut self,
        new_ids: &[u32],
        soft: &[SoftSpan],
        params: &SamplingParams,
        last: Logits,
    ) -> Result<usize> {
        let hidden = self.loaded.model.hidden_size();
        self.check_vocab(new_ids, soft)?;
        if !soft.is_empty() || !self.soft.is_empty() {
            let total = self.history.len() + new_ids.len();
            if total > self.cache.ctx_size() {
                bail!(
                    "the prompt with its media needs {total} tokens but the context size is {} \
                     (use a larger --ctx-size or fewer images; media is never truncated)",
                    self.cache.ctx_size()
                );
            }
        }
        let base = self.history.len();
        self.fit_into_context(new_ids, params)?;
        self.soft.extend(soft.iter().map(|s| SoftSpan {
            start: base + s.start,
            ..s.clone()
        }));
        let fed_before = self.cache.len();
        let end = self.history.len();
        if fed_before == end {
            bail!("nothing to generate from: the prompt is empty");
        }
        // Pieces of `batch_size` tokens bound the activation memory; an image is never cut.
        let mut start = fed_before;
        while start < end {
            let stop = (start + self.loaded.batch_size.max(1)).min(end);
            let stop = chunk_end(&self.soft, hidden, start, stop);
            // Only the last piece's last logits can be sampled from.
            let wanted = if stop == end { last } else { Logits::None };
            self.feed(start..stop, wanted)?;
            start = stop;
        }
        Ok(end - fed_before)
    }

    /// Feeds `ids` (with `soft` placed on them) after what the session holds and returns the
    /// logits of the last position, without sampling: scoring, `gemma logits`.
    pub fn evaluate(&mut self, ids: &[u32], soft: &[SoftSpan]) -> Result<&[f32]> {
        let params = SamplingParams {
            max_tokens: 0,
            ..SamplingParams::default()
        };
        self.generate_with(ids, soft, &params, &mut |_| true)?;
        Ok(&self.logits)
    }

    fn check_vocab(&self, ids: &[u32], soft: &[SoftSpan]) -> Result<()> {
        let vocab = self.loaded.model.vocab_size();
        let hidden = self.loaded.model.hidden_size();
        let placeholder = |i: usize| soft.iter().any(|s| s.range(hidden).contains(&i));
        let bad = ids
            .iter()
            .enumerate()
            .find(|&(i, &id)| id as usize >= vocab && !placeholder(i));
        if let Some((_, bad)) = bad {
            bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
        }
        if let Some(s) = soft.iter().find(|s| s.range(hidden).end > ids.len()) {
            bail!(
                "soft tokens at {:?} pass the end of the {} new tokens",
                s.range(hidden),
                ids.len()
            );
        }
        Ok(())
    }

    /// Appends `new_ids` to the history, making sure the sequence fits the context: either
    /// it does, or `params.truncate` keeps BOS and the most recent tokens, or it is an error.
    fn fit_into_context(&mut self, new_ids: &[u32], params: &SamplingParams) -> Result<()> {
        let ctx = self.cache.ctx_size();
        let total = self.history.len() + new_ids.len();
        if total <= ctx {
            self.history.extend_from_slice(new_ids);
            return Ok(());
        }
        if !params.truncate {
            bail!(
                "prompt has {total} tokens but the context size is {ctx} \
                 (use a larger --ctx-size, a shorter prompt, or --truncate)"
            );
        }
        let mut all = std::mem::take(&mut self.history);
        all.extend_from_slice(new_ids);
        // Leave room to generate: up to max_tokens, but never more than half the context.
        let room = params.max_tokens.min(ctx / 2).max(1);
        let keep = ctx.saturating_sub(room).max(1);
        let bos = self.loaded.bos_id().filter(|&b| all.first() == Some(&b));
        let tail_len = keep - usize::from(bos.is_some() && keep > 1);
        self.cache.clear();
        self.history = bos.filter(|_| keep > 1).into_iter().collect();
        self.history.extend_from_slice(&all[all.len() - tail_len..]);
        Ok(())
    }

    /// Runs the model on the history's positions `range` (the next ones the cache lacks) and
    /// keeps the logits of the last one.
    fn feed(&mut self, range: std::ops::Range<usize>, logits: Logits) -> Result<()> {
        let hidden = self.loaded.model.hidden_size();
        let soft = SoftSpan::within(&self.soft, hidden, range.clone());
        let logits = self.loaded.model.forward_embeds(
            &self.history[range],
            &soft,
            &mut self.cache,
            logits,
        )?;
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        Ok(())
    }
}

/// A multi-turn conversation rendered with the model's chat template. Each turn is fed
/// incrementally when the new rendering extends the text already in the cache; otherwise the
/// whole conversation is fed again (always correct, just slower).
pub struct Chat<'m> {
    session: Session<'m>,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    /// Every image of the conversation, in the order of their slots in the messages.
    images: Vec<PreparedImage>,
    /// How many of `images` the session's tokens hold.
    images_fed: usize,
    /// Every audio clip of the conversation, in the order of their slots, and how many of them
    /// the session's tokens hold.
    audio: Vec<PreparedAudio>,
    audio_fed: usize,
    /// The exact text the session's tokens stand for, when known.
    context_text: Option<String>,
}

/// The result of one chat turn.
pub struct TurnOutput {
    pub answer: String,
    pub stats: GenerationStats,
}

impl<'m> Chat<'m> {
    pub fn new(loaded: &'m LoadedModel, ctx_size: usize, system: Option<String>) -> Result<Self> {
        if loaded.tokenizer.is_none() {
            bail!("chat needs a tokenizer, and this model has none");
        }
        Ok(Chat {
            session: Session::new(loaded, ctx_size)?,
            system,
            messages: Vec::new(),
            images: Vec::new(),
            images_fed: 0,
            audio: Vec::new(),
            audio_fed: 0,
            context_text: None,
        })
    }

    pub fn session(&self) -> &Session<'m> {
        &self.session
    }

    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Starts a new conversation (the system prompt stays).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.images.clear();
        self.images_fed = 0;
        self.audio.clear();
        self.audio_fed = 0;
        self.session.reset();
        self.context_text = None;
    }

    /// Adds the user's message, generates the answer and records it in the conversation.
    pub fn send(
        &mut self,
        user: &str,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<TurnOutput> {
        self.send_with_images(user, Vec::new(), params, on_text)
    }

    /// [`Chat::send`] with images shown before the message's text (one slot each).
    pub fn send_with_images(
        &mut self,
        user: &str,
        images: Vec<PreparedImage>,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<TurnOutput> {
        self.send_with_media(user, images, Vec::new(), params, on_text)
    }

    /// [`Chat::send`] with images, then audio clips, before the message's text (one slot
    /// each).
    pub fn send_with_media(
        &mut self,
        user: &str,
        images: Vec<PreparedImage>,
        audio: Vec<PreparedAudio>,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<TurnOutput> {
        let slots = format!(
            "{}{}",
            crate::vision::IMAGE_MARKER.repeat(images.len()),
            crate::audio::AUDIO_MARKER.repeat(audio.len())
        );
        self.send_with_slots(&slots, user, images, audio, params, on_text)
    }

    /// [`Chat::send`] with media before the message's text in the order of `slots`, which holds
    /// one [`IMAGE_MARKER`](crate::vision::IMAGE_MARKER) per image and one
    /// [`AUDIO_MARKER`](crate::audio::AUDIO_MARKER) per clip (images fill the image slots in
    /// order, clips the audio slots).
    pub fn send_with_slots(
        &mut self,
        slots: &str,
        user: &str,
        images: Vec<PreparedImage>,
        audio: Vec<PreparedAudio>,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<TurnOutput> {
        let loaded = self.session.loaded();
        let (n_new_images, n_new_audio) = (images.len(), audio.len());
        if slots.matches(crate::vision::IMAGE_MARKER).count() != n_new_images
            || slots.matches(crate::audio::AUDIO_MARKER).count() != n_new_audio
        {
            bail!("the media slots do not match the images and clips given");
        }
        self.messages.push(ChatMessage {
            role: "user".into(),
            content: format!("{slots}{user}"),
        });
        self.images.extend(images);
        self.audio.extend(audio);
        let undo = |chat: &mut Self| {
            chat.messages.pop();
            chat.images.truncate(chat.images.len() - n_new_images);
            chat.audio.truncate(chat.audio.len() - n_new_audio);
            chat.context_text = None;
        };
        let rendered = match loaded.render_chat(self.system.as_deref(), &self.messages) {
            Ok(r) => r,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        let continues = self
            .context_text
            .as_deref()
            .filter(|known| !self.session.history().is_empty() && rendered.starts_with(known));
        let encoded = match continues {
            Some(known) => loaded.encode_with_media(
                &rendered[known.len()..],
                &self.images[self.images_fed..],
                &self.audio[self.audio_fed..],
                true,
            ),
            None => {
                self.session.reset();
                self.images_fed = 0;
                self.audio_fed = 0;
                loaded.encode_with_media(&rendered, &self.images, &self.audio, false)
            }
        };
        let mut answer = String::new();
        let result = encoded.and_then(|(new_ids, soft)| {
            self.session
                .generate_with(&new_ids, &soft, params, &mut |text| {
                    answer.push_str(text);
                    on_text(text)
                })
        });
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        self.images_fed = self.images.len();
        self.audio_fed = self.audio.len();
        self.context_text = match stats.stop_reason {
            StopReason::EndOfTurn => {
                let stop_piece = stats
                    .tokens
                    .last()
                    .map(|&id| loaded.token_text(id))
                    .unwrap_or_default();
                Some(format!("{rendered}{answer}{stop_piece}"))
            }
            StopReason::MaxTokens | StopReason::ContextFull => Some(format!("{rendered}{answer}")),
            // Tokens after a stop string or a cancel are in the history but not in `answer`.
            StopReason::StopString | StopReason::Cancelled => None,
        };
        self.messages.push(ChatMessage {
            role: "assistant".into(),
            content: answer.clone(),
        });
        Ok(TurnOutput { answer, stats })
    }
}
