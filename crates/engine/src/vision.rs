//! Images in a prompt: the lazily loaded vision tower (Gemma 3's SigLIP, Gemma 3n's
//! MobileNet-V5), preprocessing (through `gemma-media`), and turning images into soft tokens
//! placed on the prompt's image-token runs.
//!
//! Gemma 3 and Gemma 3n write the same block for an image (below; Gemma 3n's chat template
//! writes `<image_soft_token>` for an image part and `Gemma3nProcessor` replaces it with that
//! block). They differ in preprocessing (Gemma 3: 896², normalised to [-1, 1]; Gemma 3n: 768²,
//! rescaled to [0, 1] only), in attention (Gemma 3's image blocks are bidirectional, Gemma 3n's
//! text model is causal everywhere) and in `<end_of_image>`: for Gemma 3n it is the first id of
//! `embed_vision`'s own vocabulary, so, as in `Gemma3nModel.get_input_embeddings`, it (and any
//! other id of that range but the placeholder) takes `embed_vision`'s hard embedding, not the
//! text table's row. The placeholder ids get the tower's soft tokens.
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

use gemma_models::vision::{Gemma3nVision, Gemma3nVisionConfig};

use crate::audio::PreparedAudio;
use crate::encoded::EncodedCache;
use crate::generate::SoftSpan;
use crate::load::LoadedModel;

/// The marker a chat message's text holds where an image goes (what Gemma 3's chat template
/// writes for an image part).
pub const IMAGE_MARKER: &str = "<start_of_image>";
const END_OF_IMAGE: &str = "<end_of_image>";
const IMAGE_SOFT_TOKEN: &str = "<image_soft_token>";
/// Gemma 3n's tower tensors in a Hugging Face folder.
const GEMMA3N_TOWER_PREFIX: &str = "model.vision_tower.timm_model.";

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

/// Which vision tower a model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionFamily {
    /// Gemma 3 (4B, 12B, 27B): SigLIP + projector, bidirectional image blocks.
    Gemma3,
    /// Gemma 3n (E2B, E4B): MobileNet-V5 + `embed_vision`, causal, `<end_of_image>` through
    /// `embed_vision`'s hard path.
    Gemma3n,
}

impl VisionFamily {
    fn tower_name(self) -> &'static str {
        match self {
            VisionFamily::Gemma3 => "SigLIP",
            VisionFamily::Gemma3n => "MobileNet-V5",
        }
    }

    /// The preprocessing of this family at `size`.
    pub fn preprocess(self, size: usize) -> Preprocess {
        match self {
            VisionFamily::Gemma3 => Preprocess::gemma3_with_size(size as u32),
            VisionFamily::Gemma3n => Preprocess::gemma3n_with_size(size as u32),
        }
    }
}

/// A loaded tower of either family.
enum Tower {
    Siglip(Box<Gemma3Vision>),
    MobileNet(Box<Gemma3nVision>),
}

impl Tower {
    fn image_size(&self) -> usize {
        match self {
            Tower::Siglip(t) => t.image_size(),
            Tower::MobileNet(t) => t.config().image_size,
        }
    }

    fn tokens_per_image(&self) -> usize {
        match self {
            Tower::Siglip(t) => t.tokens_per_image(),
            Tower::MobileNet(t) => t.config().tokens_per_image,
        }
    }

    fn encode(&self, view: &[f32]) -> Result<Vec<f32>> {
        match self {
            Tower::Siglip(t) => {
                let mut buf = Vec::new();
                t.encode(view, &mut buf)?;
                Ok(buf)
            }
            Tower::MobileNet(t) => Ok(t.encode_image(view)?),
        }
    }
}

/// `--vision-cache`: a frame nearly equal to the last one encoded reuses its encoding.
///
/// The test runs on the preprocessed pixels (what the tower would see), in 8-bit levels: a view
/// is "unchanged" when the mean absolute difference from the anchor (the last view actually
/// encoded) is below `threshold` levels **and** no cell of a 16×16 grid over the image differs
/// by more than 4 × `threshold` on average (so a small object that moves is not averaged
/// away). Comparing with the anchor rather than the previous frame keeps slow drift from
/// accumulating: once the scene has moved far enough from what was encoded, it is encoded again.
pub struct FrameReuse {
    /// Mean absolute difference, in 8-bit levels, below which a view is reused.
    pub threshold: f32,
    anchor: Mutex<Option<Anchor>>,
    reused: std::sync::atomic::AtomicUsize,
}

/// The last view actually encoded (its pixel values) and its encoding.
type Anchor = (Vec<f32>, Arc<[f32]>);

/// The default `--vision-cache` threshold: 2 levels of 255 on average (sensor noise and JPEG
/// re-encoding of a still scene stay under it; a change of lighting or a moved object does not).
pub const DEFAULT_VISION_CACHE_THRESHOLD: f32 = 2.0;

impl FrameReuse {
    pub fn new(threshold: f32) -> FrameReuse {
        FrameReuse {
            threshold,
            anchor: Mutex::new(None),
            reused: Default::default(),
        }
    }

    /// How many views reused an earlier encoding.
    pub fn reused(&self) -> usize {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `view` is within the threshold of `anchor` (`levels_per_unit`: 8-bit levels per
    /// unit of pixel value, 255 for Gemma 3n's [0, 1], 127.5 for Gemma 3's [-1, 1]).
    pub fn near(&self, view: &[f32], anchor: &[f32], size: usize, levels_per_unit: f32) -> bool {
        if view.len() != anchor.len() || size == 0 || view.len() != 3 * size * size {
            return false;
        }
        const GRID: usize = 16;
        let cells = GRID.min(size);
        let mut cell_sum = vec![0f64; cells * cells];
        let mut cell_n = vec![0u32; cells * cells];
        let mut total = 0f64;
        let plane = size * size;
        for (i, (a, b)) in view.iter().zip(anchor).enumerate() {
            let d = f64::from((a - b).abs());
            if !d.is_finite() {
                return false;
            }
            total += d;
            let p = i % plane;
            let (y, x) = (p / size, p % size);
            let cell = y * cells / size * cells + x * cells / size;
            cell_sum[cell] += d;
            cell_n[cell] += 1;
        }
        let scale = f64::from(levels_per_unit);
        let t = f64::from(self.threshold);
        let mean = total / view.len() as f64 * scale;
        let worst_cell = cell_sum
            .iter()
            .zip(&cell_n)
            .map(|(s, &n)| s / f64::from(n.max(1)) * scale)
            .fold(0.0, f64::max);
        mean < t && worst_cell < 4.0 * t
    }
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
    pub family: VisionFamily,
    source: TowerSource,
    pub ids: ImageTokenIds,
    /// Gemma 3n from a folder: the tower's config, known without reading the tower.
    config3n: Option<Gemma3nVisionConfig>,
    tower: OnceLock<Tower>,
    loading: Mutex<()>,
    /// Encoded views by content key: a conversation re-fed after a reset, or the same image
    /// sent again, is not encoded twice.
    encoded: EncodedCache,
    /// Print each view's encode time on stderr (`LoadOptions::verbose`).
    pub verbose: bool,
    /// `--vision-cache`: reuse the encoding of a nearly unchanged frame.
    pub reuse: Option<FrameReuse>,
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
        Self::detect_family(file, mmproj, VisionFamily::Gemma3)
    }

    /// [`Vision::detect`] for a model of `family`. A Gemma 3n folder has a tower when its
    /// config has a `vision_config` and it holds `model.vision_tower.timm_model.*` tensors
    /// (checkpoints saved without the tower, such as the audio test fixture, have none).
    pub fn detect_family(
        file: &ModelFile,
        mmproj: Option<&Path>,
        family: VisionFamily,
    ) -> Result<Option<Vision>> {
        let folder_has_tower = |folder: &gemma_formats::HfFolder| match family {
            VisionFamily::Gemma3 => folder.config().get("vision_config").is_some(),
            VisionFamily::Gemma3n => {
                folder
                    .config()
                    .get("vision_config")
                    .is_some_and(|v| v.is_object())
                    && gemma_formats::TensorSource::tensor_names(folder)
                        .iter()
                        .any(|n| n.starts_with(GEMMA3N_TOWER_PREFIX))
            }
        };
        let source = match (mmproj, file) {
            (Some(path), _) => {
                let gguf = GgufFile::open(path)
                    .with_context(|| format!("cannot open the mmproj file {}", path.display()))?;
                TowerSource::Mmproj(Box::new(gguf))
            }
            (None, ModelFile::Hf(folder)) if folder_has_tower(folder) => TowerSource::Folder,
            _ => return Ok(None),
        };
        let mut ids = match family {
            VisionFamily::Gemma3 => ImageTokenIds::default(),
            VisionFamily::Gemma3n => ImageTokenIds {
                boi: 255_999,
                eoi: 262_144,
                image: 262_145,
            },
        };
        let mut config3n = None;
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
            if family == VisionFamily::Gemma3n && matches!(source, TowerSource::Folder) {
                let c = Gemma3nVisionConfig::from_hf_config(cfg)
                    .context("config.json vision_config")?;
                if c.image_size == 0 || c.tokens_per_image == 0 {
                    bail!("config.json: the Gemma 3n vision tower has an empty image or no tokens");
                }
                config3n = Some(c);
            }
        }
        Ok(Some(Vision {
            family,
            source,
            ids,
            config3n,
            tower: OnceLock::new(),
            loading: Mutex::new(()),
            encoded: EncodedCache::new(ENCODED_CACHE_ENTRIES),
            verbose: false,
            reuse: None,
        }))
    }

    /// Gemma 3n's tower config when known without reading the tower (from a folder).
    pub fn config3n(&self) -> Option<&Gemma3nVisionConfig> {
        self.config3n.as_ref()
    }

    /// Gemma 3n: the ids of `embed_vision`'s own vocabulary (`<end_of_image>` first), when known
    /// without reading the tower; `None` for Gemma 3.
    fn hard_range(&self) -> Option<std::ops::Range<u32>> {
        if self.family != VisionFamily::Gemma3n {
            return None;
        }
        let c = match (&self.config3n, self.tower.get()) {
            (Some(c), _) => c,
            (None, Some(Tower::MobileNet(t))) => t.config(),
            // An mmproj not read yet: `<end_of_image>` is the first id of the range.
            _ => return Some(self.ids.eoi..self.ids.eoi.saturating_add(1)),
        };
        let end = c.vocab_offset.saturating_add(c.vocab_size as u32);
        Some(c.vocab_offset..end)
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

    /// The side of the square images the tower takes (Gemma 3 and an unread mmproj: reads the
    /// tower).
    pub fn image_size(&self, file: &ModelFile) -> Result<usize> {
        match &self.config3n {
            Some(c) => Ok(c.image_size),
            None => Ok(self.tower(file)?.image_size()),
        }
    }

    /// Soft tokens per image (reads the tower unless a folder's config says).
    pub fn tokens_per_image(&self, file: &ModelFile) -> Result<usize> {
        match &self.config3n {
            Some(c) => Ok(c.tokens_per_image),
            None => Ok(self.tower(file)?.tokens_per_image()),
        }
    }

    /// The tower, loaded on first use.
    fn tower(&self, file: &ModelFile) -> Result<&Tower> {
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let _guard = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let what = || {
            format!(
                "cannot load the {} vision tower from {}",
                self.family.tower_name(),
                self.source_name()
            )
        };
        let tower = match (self.family, &self.source, file) {
            (VisionFamily::Gemma3, TowerSource::Mmproj(gguf), _) => {
                Tower::Siglip(Box::new(Gemma3Vision::load_gguf(gguf).with_context(what)?))
            }
            (VisionFamily::Gemma3, TowerSource::Folder, ModelFile::Hf(folder)) => {
                let tower = Gemma3Vision::load_hf(folder.config(), folder).with_context(what)?;
                Tower::Siglip(Box::new(tower))
            }
            (VisionFamily::Gemma3n, TowerSource::Mmproj(gguf), _) => {
                Tower::MobileNet(Box::new(Gemma3nVision::from_gguf(gguf).with_context(what)?))
            }
            (VisionFamily::Gemma3n, TowerSource::Folder, ModelFile::Hf(folder)) => {
                Tower::MobileNet(Box::new(Gemma3nVision::from_hf(folder).with_context(what)?))
            }
            (_, TowerSource::Folder, ModelFile::Gguf(_)) => {
                bail!("a vision tower in the model folder needs a Hugging Face folder")
            }
        };
        if let (Tower::MobileNet(t), Some(c)) = (&tower, &self.config3n) {
            let (a, b) = (t.config(), c);
            if a.image_size != b.image_size || a.tokens_per_image != b.tokens_per_image {
                bail!(
                    "the MobileNet-V5 tower makes {} tokens from {}² images but config.json says \
                     {} from {}²",
                    a.tokens_per_image,
                    a.image_size,
                    b.tokens_per_image,
                    b.image_size
                );
            }
        }
        Ok(self.tower.get_or_init(|| tower))
    }

    /// Decodes and preprocesses one image file's bytes for this model's tower.
    pub fn prepare(
        &self,
        file: &ModelFile,
        bytes: &[u8],
        opts: &ImageOptions,
    ) -> Result<PreparedImage> {
        if opts.pan_and_scan && self.family == VisionFamily::Gemma3n {
            bail!("pan-and-scan crops are Gemma 3's; Gemma 3n's processor takes none");
        }
        let size = self.image_size(file)?;
        let img = gemma_media::decode_image(bytes, &opts.limits)?;
        Ok(prepare_rgb_for(
            &img,
            Sha256::digest(bytes).into(),
            size,
            opts,
            self.family,
        ))
    }

    /// Sampled video frames prepared for this tower, and the text that introduces each (its
    /// `mm:ss` timestamp followed by an image slot).
    pub fn prepare_frames(
        &self,
        file: &ModelFile,
        frames: &[Frame],
        opts: &ImageOptions,
    ) -> Result<(Vec<PreparedImage>, String)> {
        if opts.pan_and_scan && self.family == VisionFamily::Gemma3n {
            bail!("pan-and-scan crops are Gemma 3's; Gemma 3n's processor takes none");
        }
        let size = self.image_size(file)?;
        Ok(prepare_frames_for(frames, size, opts, self.family))
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
                    let Some(reuse) = &self.reuse else {
                        return tower.encode(view);
                    };
                    let size = tower.image_size();
                    let levels = match self.family {
                        VisionFamily::Gemma3 => 127.5,
                        VisionFamily::Gemma3n => 255.0,
                    };
                    let mut anchor = reuse.anchor.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((pixels, encoded)) = anchor.as_ref() {
                        if reuse.near(view, pixels, size, levels) {
                            reuse
                                .reused
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if self.verbose {
                                eprintln!("gemma: {} unchanged, its encoding reused", what());
                            }
                            return Ok(encoded.to_vec());
                        }
                    }
                    let encoded = tower.encode(view)?;
                    *anchor = Some((view.clone(), encoded.as_slice().into()));
                    Ok(encoded)
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
        let per_image = self.tokens_per_image(file)?;
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
        // Gemma 3n: `<end_of_image>` and the rest of `embed_vision`'s ids take its hard path.
        let hard: Vec<usize> = match self.hard_range() {
            Some(range) => ids
                .iter()
                .enumerate()
                .filter(|&(_, &id)| id != self.ids.image && range.contains(&id))
                .map(|(i, _)| i)
                .collect(),
            None => Vec::new(),
        };
        if runs.is_empty() && n_views == 0 && hard.is_empty() {
            return Ok(Vec::new());
        }
        let per_image = self.tokens_per_image(file)?;
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
                    bidirectional: self.family == VisionFamily::Gemma3,
                    key: *key,
                });
            }
        }
        if !hard.is_empty() {
            let Tower::MobileNet(tower) = self.tower(file)? else {
                unreachable!("hard ids are Gemma 3n's")
            };
            // A range read before the tower (an mmproj) is checked against the tower's own.
            let range = self.hard_range().expect("Gemma 3n");
            for i in hard.into_iter().filter(|&i| range.contains(&ids[i])) {
                let mut key = [0u8; 32];
                key[..14].copy_from_slice(b"gemma3n-hard-v");
                key[28..].copy_from_slice(&ids[i].to_le_bytes());
                spans.push(SoftSpan {
                    start: i,
                    embeds: tower.embed_hard(&[ids[i]])?.into(),
                    bidirectional: false,
                    key,
                });
            }
            spans.sort_by_key(|s| s.start);
        }
        Ok(spans)
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let mut rows = vec![(
            "vision".to_string(),
            format!(
                "{} tower from {}: memory-mapped, {} (image token {}, start {}, end {})",
                self.family.tower_name(),
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

/// Decodes `bytes` and makes the views for a Gemma 3 tower of `size × size` pixels.
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
    prepare_rgb_for(img, content, size, opts, VisionFamily::Gemma3)
}

/// [`prepare_rgb`] with `family`'s preprocessing (Gemma 3n: rescale to [0, 1] only, no crops).
pub fn prepare_rgb_for(
    img: &RgbImage,
    content: [u8; 32],
    size: usize,
    opts: &ImageOptions,
    family: VisionFamily,
) -> PreparedImage {
    let pre = family.preprocess(size);
    let mut views = vec![gemma_media::pixel_values(img, &pre)];
    if opts.pan_and_scan && family == VisionFamily::Gemma3 {
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
            if family == VisionFamily::Gemma3n {
                h.update(b"gemma3n-rescale");
            }
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
    prepare_frames_for(frames, size, opts, VisionFamily::Gemma3)
}

/// [`prepare_frames`] with `family`'s preprocessing.
pub fn prepare_frames_for(
    frames: &[Frame],
    size: usize,
    opts: &ImageOptions,
    family: VisionFamily,
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
            prepare_rgb_for(&f.image, content, size, opts, family)
        })
        .collect();
    (images, text)
}

impl LoadedModel {
    /// The vision side, or an error saying why there is none.
    pub fn vision(&self) -> Result<&Vision> {
        self.vision.as_ref().with_context(|| {
            format!(
                "this {} model takes no images (no vision tower found); Gemma 3 4B, 12B and 27B \
                 and Gemma 3n E2B and E4B do, from a Hugging Face folder that holds the tower or \
                 a text GGUF with its --mmproj file",
                self.model.architecture()
            )
        })
    }

    /// The side of the square images this model's tower takes (loads the tower).
    pub fn image_size(&self) -> Result<usize> {
        self.vision()?.image_size(&self.file)
    }

    /// Sampled video frames prepared for this model's tower, with their timestamped slots.
    pub fn prepare_frames(
        &self,
        frames: &[Frame],
        opts: &ImageOptions,
    ) -> Result<(Vec<PreparedImage>, String)> {
        self.vision()?.prepare_frames(&self.file, frames, opts)
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
        self.encode_with_media_in(text, images, audio, continuation, usize::MAX)
    }

    /// [`LoadedModel::encode_with_media`], refusing a prompt of more than `ctx_size` tokens
    /// before any tower runs (too many images, frames or clips for the context).
    pub fn encode_with_media_in(
        &self,
        text: &str,
        images: &[PreparedImage],
        audio: &[PreparedAudio],
        continuation: bool,
        ctx_size: usize,
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
        if ids.len() > ctx_size && !(images.is_empty() && audio.is_empty()) {
            bail!(
                "the prompt with its media needs {} tokens but the context size is {ctx_size} \
                 ({} image view(s), {} audio window(s); use a larger --ctx-size or fewer \
                 images, frames or clips: media is never truncated)",
                ids.len(),
                images.iter().map(|i| i.views.len()).sum::<usize>(),
                audio.iter().map(|a| a.windows.len()).sum::<usize>()
            );
        }
        let soft = self.place_media(&ids, images, audio)?;
        Ok((ids, soft))
    }

    /// Places the images' soft tokens on the image-token runs of `ids` (no tokenizer needed).
    pub fn place_images(&self, ids: &[u32], images: &[PreparedImage]) -> Result<Vec<SoftSpan>> {
        if images.is_empty() {
            let Some(v) = &self.vision else {
                return Ok(Vec::new());
            };
            if ids.contains(&v.ids.image) {
                bail!(
                    "the ids hold image tokens ({}) but no image was given",
                    v.ids.image
                );
            }
            if v.family == VisionFamily::Gemma3 {
                return Ok(Vec::new());
            }
            // Gemma 3n: a lone `<end_of_image>` still takes `embed_vision`'s embedding.
            return v.place(&self.file, ids, images);
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

    /// `--vision-cache`'s difference test: noise under the threshold is "unchanged", a global
    /// change or a small local one is not.
    #[test]
    fn frame_reuse_threshold() {
        let size = 64;
        let reuse = FrameReuse::new(DEFAULT_VISION_CACHE_THRESHOLD);
        let base: Vec<f32> = (0..3 * size * size)
            .map(|i| ((i * 7919) % 256) as f32 / 255.0)
            .collect();
        assert!(reuse.near(&base, &base, size, 255.0));
        // ±1 level of noise everywhere: mean 1 level < 2.
        let noisy: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 1.0 } else { -1.0 } / 255.0)
            .collect();
        assert!(reuse.near(&noisy, &base, size, 255.0));
        // A lighting change of 3 levels everywhere.
        let brighter: Vec<f32> = base.iter().map(|v| v + 3.0 / 255.0).collect();
        assert!(!reuse.near(&brighter, &base, size, 255.0));
        // A small object (one 4×4 cell of 64², 1/256 of the image) moved: the mean barely
        // moves (0.6 levels) but its cell changes by 160 levels.
        let mut moved = base.clone();
        for c in 0..3 {
            for y in 0..4 {
                for x in 0..4 {
                    moved[c * size * size + y * size + x] += 160.0 / 255.0;
                }
            }
        }
        assert!(!reuse.near(&moved, &base, size, 255.0));
        // Gemma 3's [-1, 1] values: 127.5 levels per unit.
        let g3_noise: Vec<f32> = base.iter().map(|v| v + 1.0 / 127.5).collect();
        assert!(reuse.near(&g3_noise, &base, size, 127.5));
        // Shapes that differ, or NaN, are never "unchanged".
        assert!(!reuse.near(&base[..3], &base, size, 255.0));
        let mut nan = base.clone();
        nan[5] = f32::NAN;
        assert!(!reuse.near(&nan, &base, size, 255.0));
    }
}
