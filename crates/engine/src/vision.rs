//! Images in a prompt: the lazily loaded vision tower, preprocessing (through `gemma-media`),
//! and turning images into soft tokens placed on the prompt's image-token runs.
//!
//! A prompt with images is assembled the way the reference processor does it: the chat template
//! writes one `<start_of_image>` per image; each becomes `"\n\n" + <start_of_image> +
//! tokens_per_image × <image_soft_token> + <end_of_image> + "\n\n"` (with pan-and-scan: the
//! original and its crops, each such a block, inside the reference's sentence); the whole text
//! is tokenized at once; then every maximal run of the image-token id is one view (an image or a
//! crop), filled in order with the tower's output. Filling runs of an id list is also the
//! tokenizer-free path (`gemma logits --ids`).

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use gemma_formats::{GgufFile, ModelFile};
use gemma_media::{Frame, ImageLimits, PanAndScan, Preprocess, RgbImage};
use gemma_models::vision::Gemma3Vision;
use sha2::{Digest, Sha256};

use crate::audio::PreparedAudio;
use crate::encoded::EncodedCache;
use crate::generate::SoftSpan;
use crate::load::LoadedModel;

/// The marker a chat message's text holds where an image goes (what Gemma 3's chat template
/// writes for an image part).
pub const IMAGE_MARKER: &str = "<start_of_image>";
const END_OF_IMAGE: &str = "<end_of_image>";
const IMAGE_SOFT_TOKEN: &str = "<image_soft_token>";

/// Token ids of Gemma 3's image blocks (the published checkpoints' values unless the config or
/// tokenizer says otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTokenIds {
    pub boi: u32,
    pub eoi: u32,
    /// The placeholder id each soft token sits on.
    pub image: u32,
}

impl Default for ImageTokenIds {
    fn default() -> Self {
        ImageTokenIds {
            boi: 255_999,
            eoi: 256_000,
            image: 262_144,
        }
    }
}

/// How images are turned into model inputs, per request.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// Add the reference's pan-and-scan crops of non-square images (off by default, as in
    /// transformers).
    pub pan_and_scan: bool,
    pub limits: ImageLimits,
}

/// Where the tower's weights are.
enum TowerSource {
    /// In the model's own Hugging Face folder (`vision_config` in config.json).
    Folder,
    /// llama.cpp's mmproj GGUF next to a text GGUF (`--mmproj`).
    Mmproj(Box<GgufFile>),
}

/// The vision side of a loaded model. The tower's weights stay memory-mapped and are read for
/// the first time when an image arrives.
pub struct Vision {
    source: TowerSource,
    pub ids: ImageTokenIds,
    tower: OnceLock<Gemma3Vision>,
    loading: Mutex<()>,
    /// Encoded views by content key: a conversation re-fed after a reset, or the same image
    /// sent again, is not encoded twice.
    encoded: EncodedCache,
    /// Print each view's encode time on stderr (`LoadOptions::verbose`).
    pub verbose: bool,
}

/// How many encoded views `Vision` keeps (each `tokens_per_image × hidden` floats: 2.5 MiB
/// for a 4B model).
const ENCODED_CACHE_ENTRIES: usize = 32;

/// One image, preprocessed: the views the model sees (the whole image, then pan-and-scan crops).
#[derive(Clone)]
pub struct PreparedImage {
    /// `[3, size, size]` pixel values per view.
    pub views: Vec<Vec<f32>>,
    /// Content key of each view (image bytes, view index, preprocessing).
    pub keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for PreparedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedImage({} views)", self.views.len())
    }
}

impl PreparedImage {
    pub fn n_crops(&self) -> usize {
        self.views.len().saturating_sub(1)
    }
}

impl Vision {
    /// Finds the model's vision tower: `vision_config` in a Hugging Face folder, or an mmproj
    /// file. `None` for text-only models.
    pub fn detect(file: &ModelFile, mmproj: Option<&Path>) -> Result<Option<Vision>> {
        let source = match (mmproj, file) {
            (Some(path), _) => {
                let gguf = GgufFile::open(path)
                    .with_context(|| format!("cannot open the mmproj file {}", path.display()))?;
                TowerSource::Mmproj(Box::new(gguf))
            }
            (None, ModelFile::Hf(folder)) if folder.config().get("vision_config").is_some() => {
                TowerSource::Folder
            }
            _ => return Ok(None),
        };
        let mut ids = ImageTokenIds::default();
        if let ModelFile::Hf(folder) = file {
            let cfg = folder.config();
            let id = |keys: [&str; 2], default: u32| -> Result<u32> {
                match keys.iter().find_map(|k| cfg.get(*k)) {
                    None => Ok(default),
                    Some(v) => v
                        .as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .with_context(|| format!("config.json: {} is not a token id", keys[0])),
                }
            };
            ids = ImageTokenIds {
                boi: id(["boi_token_index", "boi_token_id"], ids.boi)?,
                eoi: id(["eoi_token_index", "eoi_token_id"], ids.eoi)?,
                image: id(["image_token_index", "image_token_id"], ids.image)?,
            };
        }
        Ok(Some(Vision {
            source,
            ids,
            tower: OnceLock::new(),
            loading: Mutex::new(()),
            encoded: EncodedCache::new(ENCODED_CACHE_ENTRIES),
            verbose: false,
        }))
    }

    /// Whether the tower has been read (it is on the first image).
    pub fn is_loaded(&self) -> bool {
        self.tower.get().is_some()
    }

    /// Where the weights come from, for messages.
    pub fn source_name(&self) -> &'static str {
        match self.source {
            TowerSource::Folder => "the model folder",
            TowerSource::Mmproj(_) => "the mmproj file",
        }
    }

    /// The tower, loaded on first use.
    pub fn tower(&self, file: &ModelFile) -> Result<&Gemma3Vision> {
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let _guard = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let tower = match (&self.source, file) {
            (TowerSource::Mmproj(gguf), _) => Gemma3Vision::load_gguf(gguf),
            (TowerSource::Folder, ModelFile::Hf(folder)) => {
                Gemma3Vision::load_hf(folder.config(), folder)
            }
            (TowerSource::Folder, ModelFile::Gguf(_)) => {
                unreachable!("a folder tower is only detected for folders")
            }
        }
        .with_context(|| format!("cannot load the vision tower from {}", self.source_name()))?;
        Ok(self.tower.get_or_init(|| tower))
    }

    /// Decodes and preprocesses one image file's bytes for this model's tower.
    pub fn prepare(
        &self,
        file: &ModelFile,
        bytes: &[u8],
        opts: &ImageOptions,
    ) -> Result<PreparedImage> {
        let size = self.tower(file)?.image_size();
        prepare_image(bytes, size, opts)
    }

    /// Soft tokens of every view, in order (`tokens_per_image × hidden` each), encoded once
    /// per content key.
    pub fn encode(&self, file: &ModelFile, image: &PreparedImage) -> Result<Vec<Arc<[f32]>>> {
        let tower = self.tower(file)?;
        let n = image.views.len();
        let views = image.views.iter().zip(&image.keys).enumerate();
        views
            .map(|(i, (view, key))| {
                let what = || format!("image view {}/{n}", i + 1);
                self.encoded.get_or_encode(key, self.verbose, &what, || {
                    let mut buf = Vec::new();
                    tower.encode(view, &mut buf)?;
                    Ok(buf)
                })
            })
            .collect()
    }

    /// The text that stands for one image in a prompt, as the reference processor writes it.
    pub fn image_text(&self, tokens_per_image: usize, n_crops: usize) -> String {
        let block = format!(
            "\n\n{IMAGE_MARKER}{}{END_OF_IMAGE}\n\n",
            IMAGE_SOFT_TOKEN.repeat(tokens_per_image)
        );
        if n_crops == 0 {
            return block;
        }
        // processing_gemma3.py: the original, then the crops joined by spaces.
        format!(
            "Here is the original image {block} and here are some crops to help you see better {}",
            vec![block.as_str(); n_crops].join(" ")
        )
    }

    /// Replaces each image marker of `text` with its image's full text; the count must match.
    pub fn expand_markers(
        &self,
        file: &ModelFile,
        text: &str,
        images: &[PreparedImage],
    ) -> Result<String> {
        let n_markers = text.matches(IMAGE_MARKER).count();
        if n_markers != images.len() {
            bail!(
                "the prompt has {n_markers} image slot(s) ({IMAGE_MARKER}) for {} image(s)",
                images.len()
            );
        }
        if images.is_empty() {
            return Ok(text.to_string());
        }
        let per_image = self.tower(file)?.tokens_per_image();
        let mut out = String::with_capacity(text.len() + images.len() * per_image * 20);
        for (i, piece) in text.split(IMAGE_MARKER).enumerate() {
            if i > 0 {
                out.push_str(&self.image_text(per_image, images[i - 1].n_crops()));
            }
            out.push_str(piece);
        }
        Ok(out)
    }

    /// Soft-token spans for `ids`: each maximal run of the image-token id is one view, filled
    /// in order from `images` (an image's original first, then its crops). Every run must be
    /// exactly one view long and there must be as many runs as views.
    pub fn place(
        &self,
        file: &ModelFile,
        ids: &[u32],
        images: &[PreparedImage],
    ) -> Result<Vec<SoftSpan>> {
        let runs = token_runs(ids, self.ids.image);
        let n_views: usize = images.iter().map(|i| i.views.len()).sum();
        if runs.is_empty() && n_views == 0 {
            return Ok(Vec::new());
        }
        let tower = self.tower(file)?;
        let per_image = tower.tokens_per_image();
        if runs.len() != n_views {
            bail!(
                "the prompt has {} run(s) of the image token {} but the images make {n_views} \
                 view(s) (an image with pan-and-scan crops fills one run per crop after its own)",
                runs.len(),
                self.ids.image
            );
        }
        if let Some(r) = runs.iter().find(|r| r.len() != per_image) {
            bail!(
                "a run of the image token at position {} is {} tokens long; this model's images \
                 are {per_image} tokens",
                r.start,
                r.len()
            );
        }
        let mut spans = Vec::with_capacity(runs.len());
        let mut runs = runs.into_iter();
        for image in images {
            let embeds = self.encode(file, image)?;
            for (embeds, key) in embeds.into_iter().zip(&image.keys) {
                let run = runs.next().expect("as many runs as views");
                spans.push(SoftSpan {
                    start: run.start,
                    embeds,
                    bidirectional: true,
                    key: *key,
                });
            }
        }
        Ok(spans)
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let mut rows = vec![(
            "vision".to_string(),
            format!(
                "SigLIP tower from {}: memory-mapped, {} (image token {}, start {}, end {})",
                self.source_name(),
                if self.is_loaded() {
                    "loaded"
                } else {
                    "read on the first image"
                },
                self.ids.image,
                self.ids.boi,
                self.ids.eoi
            ),
        )];
        if let TowerSource::Mmproj(gguf) = &self.source {
            rows.push((
                "vision weights".into(),
                format!(
                    "{} tensors, {}",
                    gguf.tensors().len(),
                    crate::human_bytes(gguf.file_size())
                ),
            ));
        }
        rows
    }
}

/// Maximal runs of `id` in `ids`.
pub fn token_runs(ids: &[u32], id: u32) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != id {
            i += 1;
            continue;
        }
        let start = i;
        while i < ids.len() && ids[i] == id {
            i += 1;
        }
        runs.push(start..i);
    }
    runs
}

/// Decodes `bytes` and makes the views for a tower of `size × size` pixels.
pub fn prepare_image(bytes: &[u8], size: usize, opts: &ImageOptions) -> Result<PreparedImage> {
    let img = gemma_media::decode_image(bytes, &opts.limits)?;
    Ok(prepare_rgb(&img, Sha256::digest(bytes).into(), size, opts))
}

/// Makes the views of a decoded image (Gemma 3's normalisation: mean = std = 0.5); `content`
/// identifies the image (a hash of its bytes or pixels) for the view keys.
pub fn prepare_rgb(
    img: &RgbImage,
    content: [u8; 32],
    size: usize,
    opts: &ImageOptions,
) -> PreparedImage {
    let pre = Preprocess::gemma3_with_size(size as u32);
    let mut views = vec![gemma_media::pixel_values(img, &pre)];
    if opts.pan_and_scan {
        for crop in gemma_media::pan_and_scan(img, &PanAndScan::default()) {
            views.push(gemma_media::pixel_values(&crop, &pre));
        }
    }
    let keys = (0..views.len())
        .map(|v| {
            let mut h = Sha256::new();
            h.update(content);
            h.update((v as u64).to_le_bytes());
            h.update((size as u64).to_le_bytes());
            h.update([u8::from(opts.pan_and_scan)]);
            h.finalize().into()
        })
        .collect();
    PreparedImage { views, keys }
}

/// Sampled video frames as prepared images plus the text that introduces each (its `mm:ss`
/// timestamp followed by an image slot).
pub fn prepare_frames(
    frames: &[Frame],
    size: usize,
    opts: &ImageOptions,
) -> (Vec<PreparedImage>, String) {
    let mut text = String::new();
    let images = frames
        .iter()
        .map(|f| {
            text.push_str(&format!(
                "{} {IMAGE_MARKER}",
                gemma_media::mmss(f.timestamp_secs)
            ));
            let content = Sha256::digest(f.image.as_raw()).into();
            prepare_rgb(&f.image, content, size, opts)
        })
        .collect();
    (images, text)
}

impl LoadedModel {
    /// The vision side, or an error saying why there is none.
    pub fn vision(&self) -> Result<&Vision> {
        self.vision.as_ref().with_context(|| {
            format!(
                "this {} model takes no images (text only); Gemma 3 4B, 12B and 27B do, from a \
                 Hugging Face folder or a text GGUF with its --mmproj file",
                self.model.architecture()
            )
        })
    }

    /// The side of the square images this model's tower takes (loads the tower).
    pub fn image_size(&self) -> Result<usize> {
        Ok(self.vision()?.tower(&self.file)?.image_size())
    }

    /// Decodes and preprocesses an image file's bytes for this model.
    pub fn prepare_image(&self, bytes: &[u8], opts: &ImageOptions) -> Result<PreparedImage> {
        self.vision()?.prepare(&self.file, bytes, opts)
    }

    /// Tokenizes a whole prompt holding one [`IMAGE_MARKER`] per image, expanding each to its
    /// image's tokens, and places the images' soft tokens.
    pub fn encode_with_images(
        &self,
        text: &str,
        images: &[PreparedImage],
    ) -> Result<(Vec<u32>, Vec<SoftSpan>)> {
        self.encode_media(text, images, false)
    }

    /// [`LoadedModel::encode_with_images`], or with `continuation` the text that continues a
    /// sequence (no BOS).
    pub fn encode_media(
        &self,
        text: &str,
        images: &[PreparedImage],
        continuation: bool,
    ) -> Result<(Vec<u32>, Vec<SoftSpan>)> {
        self.encode_with_media(text, images, &[], continuation)
    }

    /// Tokenizes a whole prompt holding one [`IMAGE_MARKER`] per image and one
    /// [`AUDIO_MARKER`](crate::audio::AUDIO_MARKER) per clip, expanding each to its tokens, and
    /// places the images' and clips' soft tokens. With `continuation` the text continues a
    /// sequence (no BOS).
    pub fn encode_with_media(
        &self,
        text: &str,
        images: &[PreparedImage],
        audio: &[PreparedAudio],
        continuation: bool,
    ) -> Result<(Vec<u32>, Vec<SoftSpan>)> {
        let encode = |t: &str| {
            if continuation {
                self.encode_continuation(t)
            } else {
                self.encode_prompt(t)
            }
        };
        let mut expanded = std::borrow::Cow::Borrowed(text);
        if images.is_empty() {
            if self.vision.is_some() && text.contains(IMAGE_MARKER) {
                bail!("the prompt has an image slot ({IMAGE_MARKER}) but no image was given");
            }
        } else {
            expanded = self
                .vision()?
                .expand_markers(&self.file, &expanded, images)?
                .into();
        }
        if let Some(h) = &self.audio {
            expanded = h.expand_markers(&expanded, audio)?.into();
        } else if !audio.is_empty() {
            self.hearing()?;
        }
        let ids = encode(&expanded)?;
        let soft = self.place_media(&ids, images, audio)?;
        Ok((ids, soft))
    }

    /// Places the images' soft tokens on the image-token runs of `ids` (no tokenizer needed).
    pub fn place_images(&self, ids: &[u32], images: &[PreparedImage]) -> Result<Vec<SoftSpan>> {
        if images.is_empty() {
            if let Some(v) = &self.vision {
                if ids.contains(&v.ids.image) {
                    bail!(
                        "the ids hold image tokens ({}) but no image was given",
                        v.ids.image
                    );
                }
            }
            return Ok(Vec::new());
        }
        self.vision()?.place(&self.file, ids, images)
    }

    /// Places images and clips on `ids` (image-token runs, audio-token runs, `embed_audio`'s
    /// hard ids), sorted by position.
    pub fn place_media(
        &self,
        ids: &[u32],
        images: &[PreparedImage],
        audio: &[PreparedAudio],
    ) -> Result<Vec<SoftSpan>> {
        let mut spans = self.place_images(ids, images)?;
        spans.extend(self.place_audio(ids, audio)?);
        spans.sort_by_key(|s| s.start);
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_maximal() {
        assert_eq!(
            token_runs(&[1, 7, 7, 2, 7, 3, 7, 7, 7], 7),
            vec![1..3, 4..5, 6..9]
        );
        assert!(token_runs(&[1, 2], 7).is_empty());
    }
}
