//! Speech that arrives while it is spoken (Gemma 3n): samples in, audio tokens into the KV cache
//! as they are produced, an answer when the speaker stops.
//!
//! [`LiveAudio::push`] runs the new samples through the streaming front end
//! ([`MelStream`]), the streaming encoder ([`AudioStream`]) and `embed_audio`, and feeds the
//! tokens they complete to the decoder at once, after the prompt's prefix (the user turn up to
//! `<start_of_audio>`). Each sample is analysed and encoded once; when the speaker stops
//! ([`LiveAudio::answer`]) only the last few tokens (the convolutions' look-ahead), the end of
//! the audio block and the instruction remain to prefill.
//!
//! Where this differs from the reference's whole-clip path (the default for files): the prompt
//! holds exactly the tokens the audio produced, not a fixed 188 padded with the embedding of the
//! last audio id, because the length is not known in advance. Everything else (front end,
//! encoder, embedder, the prompt text around the audio) is the same: fed the same samples, the
//! audio tokens equal the whole-clip encoder's. A window of the model's clip length (30 s) is
//! the most one answer covers; [`LiveAudio::window_full`] says when to answer and the next push
//! starts a new window, as the whole-clip path cuts long files.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use gemma_media::mel::SAMPLE_RATE;
use gemma_media::{MelExtractor, MelStream};
use gemma_models::audio::AudioStream;
use gemma_models::Gemma3nAudio;
use sha2::{Digest, Sha256};

use crate::audio::{Hearing, AUDIO_MARKER};
use crate::generate::{GenerationStats, Session, SoftSpan};
use crate::load::LoadedModel;
use crate::sampling::SamplingParams;

/// One window being heard, and the conversation it goes into.
pub struct LiveAudio<'m> {
    hearing: &'m Hearing,
    tower: &'m Gemma3nAudio,
    extractor: Arc<MelExtractor>,
    mel: MelStream,
    encoder: AudioStream<'m>,
    session: Session<'m>,
    /// The user turn up to and including `<start_of_audio>` (with BOS), and from
    /// `<end_of_audio>` to the model's turn.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Samples of the current window so far, and the most a window takes.
    window_samples: usize,
    max_window: usize,
    /// Audio tokens of the current window in the cache.
    tokens: usize,
    /// Windows answered so far (a content-key salt).
    windows_done: u64,
}

impl<'m> LiveAudio<'m> {
    /// Starts listening for `instruction` (e.g. [`AudioTask::instruction`](crate::audio::AudioTask::instruction)),
    /// with a KV cache of `ctx_size` tokens. Loads the audio tower.
    pub fn new(loaded: &'m LoadedModel, instruction: &str, ctx_size: usize) -> Result<Self> {
        let hearing = loaded.hearing()?;
        let tower = hearing.tower(&loaded.file)?;
        let rendered = loaded.audio_prompt(instruction)?;
        let (before, after) = rendered
            .split_once(AUDIO_MARKER)
            .context("the chat template dropped the audio marker")?;
        // The reference processor's block around the audio tokens, less the tokens themselves.
        let block = hearing.window_text();
        let open = &block[..block.find(AUDIO_MARKER).expect("a block holds the marker")];
        let close = &block
            [block.rfind(AUDIO_MARKER).expect("a block holds the marker") + AUDIO_MARKER.len()..];
        let prefix = loaded.encode_prompt(&format!("{before}{open}"))?;
        let suffix = loaded.encode_continuation(&format!("{close}{after}"))?;
        let c = &hearing.config;
        if prefix.last() != Some(&c.boa_token_id) || suffix.first() != Some(&c.eoa_token_id) {
            bail!("the tokenizer does not know <start_of_audio> / <end_of_audio> as single tokens");
        }
        let extractor = Arc::new(MelExtractor::new());
        Ok(LiveAudio {
            hearing,
            tower,
            mel: MelStream::new(extractor.clone()),
            extractor,
            encoder: tower.stream(),
            session: Session::new(loaded, ctx_size)?,
            prefix,
            suffix,
            window_samples: 0,
            max_window: hearing.window_samples(),
            tokens: 0,
            windows_done: 0,
        })
    }

    /// Audio tokens of the current window in the KV cache.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Seconds of audio in the current window.
    pub fn window_seconds(&self) -> f64 {
        self.window_samples as f64 / SAMPLE_RATE as f64
    }

    /// Whether the current window is full: call [`LiveAudio::answer`] before pushing more.
    pub fn window_full(&self) -> bool {
        self.window_samples >= self.max_window
    }

    /// Feeds 16 kHz mono samples. Returns how many of them were taken: all, unless the window
    /// filled up first (then answer, and push the rest).
    pub fn push(&mut self, samples: &[f32]) -> Result<usize> {
        if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
            bail!("the audio holds a non-finite sample at {i}");
        }
        let take = samples.len().min(self.max_window - self.window_samples);
        if take == 0 {
            return Ok(0);
        }
        if self.session.history().is_empty() {
            let prefix = self.prefix.clone();
            self.session.append(&prefix, &[])?;
        }
        self.window_samples += take;
        let frames = self.mel.push(&samples[..take]);
        let encoded = self.encoder.push(&frames)?;
        self.feed(&encoded)?;
        Ok(take)
    }

    /// Projects encoder tokens and appends them to the conversation.
    fn feed(&mut self, encoded: &[f32]) -> Result<()> {
        let n = encoded.len() / self.tower.config().usm.hidden_size;
        if n == 0 {
            return Ok(());
        }
        let c = &self.hearing.config;
        let embeds: Arc<[f32]> = self.tower.project(encoded).into();
        let mut key = Sha256::new();
        key.update(b"gemma3n-live-audio");
        key.update(self.windows_done.to_le_bytes());
        key.update((self.tokens as u64).to_le_bytes());
        for v in encoded {
            key.update(v.to_le_bytes());
        }
        let span = SoftSpan {
            start: 0,
            embeds,
            bidirectional: false,
            key: key.finalize().into(),
        };
        self.session.append(&vec![c.audio_token_id; n], &[span])?;
        self.tokens += n;
        Ok(())
    }

    /// The speaker stopped (or the window is full): encodes the last frames, appends
    /// `<end_of_audio>` and the instruction, and generates the answer (`on_text` as in
    /// [`Session::generate`]). The next push starts a new window in a new conversation.
    pub fn answer(
        &mut self,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        if self.window_samples == 0 {
            bail!("no audio was heard");
        }
        let frames = self.mel.finish();
        let mut encoded = self.encoder.push(&frames)?;
        encoded.extend(self.encoder.finish()?);
        self.feed(&encoded)?;
        let eoa = self.hearing.config.eoa_token_id;
        let span = self.hearing.hard_span(self.tower, 0, eoa)?;
        let suffix = self.suffix.clone();
        let stats = self
            .session
            .generate_with(&suffix, &[span], params, on_text);
        // A fresh window whatever happened.
        self.mel = MelStream::new(self.extractor.clone());
        self.encoder = self.tower.stream();
        self.session.reset();
        self.window_samples = 0;
        self.tokens = 0;
        self.windows_done += 1;
        stats
    }
}
