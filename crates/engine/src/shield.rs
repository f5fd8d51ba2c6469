//! Safety classifiers: ShieldGemma 2 on images and ShieldGemma on text.
//!
//! Both are ordinary decoders asked one yes/no question per policy: the classifier's answer is
//! P(Yes) = softmax(logits[Yes], logits[No])[0] at the prompt's last position.
//!
//! **How the policies of one input run** ([`Shield::p_yes_all`]): the prompts of the different
//! policies differ only from the policy's text on, so their longest common token prefix (the
//! preamble, the input, an image's soft tokens, encoded once) is fed once into a
//! [`ShieldCache`], copied into one cache per policy, and the policies' suffixes go through one
//! batched forward pass. P(Yes) equals what one forward pass per prompt gives (within float
//! rounding of the split attention, < 1e-5 on the fixtures). A [`ShieldCache`] kept between
//! checks also keeps its prefix: the next check feeds only what differs from the last one's
//! common prefix (the longest common token prefix, so retokenization at the boundary is
//! handled), which is how the server checks a growing reply without re-reading all of it.
//!
//! **Images (ShieldGemma 2, a Gemma 3 model with its SigLIP tower)**, equal to transformers'
//! `ShieldGemma2Processor` + `ShieldGemma2ForImageClassification`:
//! - the prompt is the model's chat template rendered for one user message whose content is
//!   `[{"type": "image"}, {"type": "text", "text": <policy>}]`. A template from the model file is
//!   used when it writes ShieldGemma 2's instruction (it holds `<BEGIN_SAFETY_POLICY>`); otherwise
//!   [`SHIELDGEMMA2_TEMPLATE`], the template transformers' converter
//!   (`convert_shieldgemma2_weights_orbax_to_hf.py`) wrote into the published checkpoint. That
//!   template writes `<start_of_turn>user\n` before each content item and keeps the indentation
//!   between its `{{ ... }}` pieces: the prompt holds both, as the reference's does.
//! - the built-in policies are the processor's `DEFAULT_SHIELDGEMMA2_POLICIES` ([`IMAGE_POLICIES`]);
//!   a custom policy's text is passed as the item's text, unchanged.
//! - the image marker becomes `"\n\n" <start_of_image> 256 × <image_soft_token> <end_of_image>
//!   "\n\n"` (no pan-and-scan: the processor turns it off) and the whole text is tokenized with
//!   BOS added, so the ids start with two BOS (the template writes one), as the processor's do.
//! - Yes/No ids: `yes_token_index` / `no_token_index` of config.json when set (the converter sets
//!   them to the ids of "Yes" and "No"), else the tokenizer's single tokens "Yes" and "No"
//!   (the converter's derivation; the model's defaults 10784 / 3771 are those of the Gemma 3
//!   vocabulary). transformers' model takes `logits[:, -1, [yes, no]]` of the batch, which is
//!   left-padded: the last position of every prompt.
//!
//! **Text (ShieldGemma 2B/9B/27B, Gemma 2)**: the published checkpoints' files were not reachable
//! here, so the prompts are rebuilt from Google's documents and could not be checked against
//! them (scripts/make_shield_fixtures.py checks them against the same texts built in Python):
//! - a user prompt: the f-string of the model card's usage example (huggingface.co/google/
//!   shieldgemma-2b): preamble, the prompt between `<start_of_turn>` / `<end_of_turn>` lines as
//!   `Human Question: {prompt.strip()}`, "Our safety principle is defined in the below:", the
//!   policy bullet, and the epilogue, with the card's line breaks ([`prompt_only`]).
//! - a model response: the card has no example, so the template is `PROMPT_RESPONSE_TEMPLATE` of
//!   Google's gemma-cookbook notebook `shieldgemma_on_huggingface.ipynb`, verbatim (its `===` line
//!   and its double space in "to be sure  we answer" included) ([`prompt_response`]).
//! - the four policies ([`TEXT_POLICIES`]): the model card's guideline table (the notebook's
//!   `HARM_POLICIES`), each as `"No <Harm>": <prefix> <description>`, the prefix "The prompt shall
//!   not contain or seek generation of content that" for prompts and "The chatbot shall not
//!   generate content that" for responses; the bullet is `* ` + the policy (custom text too).
//! - the text is tokenized with BOS added (`tokenizer(prompt)`), and P(Yes) uses the vocabulary's
//!   "Yes" and "No" tokens, as the card's example computes it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use gemma_models::{KvCache, SeqStep, SoftTokens};
use gemma_tokenizer::ChatTemplate;

use crate::generate::{chunk_end, Session, SoftSpan};
use crate::load::LoadedModel;
use crate::vision::{PreparedImage, IMAGE_MARKER};

/// ShieldGemma 2's built-in policies: transformers' `DEFAULT_SHIELDGEMMA2_POLICIES`
/// (processing_shieldgemma2.py), the published processor's `policy_definitions`.
pub const IMAGE_POLICIES: [(&str, &str); 3] = [
    (
        "dangerous",
        "No Dangerous Content: The image shall not contain content that facilitates or \
         encourages activities that could cause real-world harm (e.g., building firearms and \
         explosive devices, promotion of terrorism, instructions for suicide).",
    ),
    (
        "sexual",
        "No Sexually Explicit content: The image shall not contain content that depicts \
         explicit or graphic sexual acts (e.g., pornography, erotic nudity, depictions of rape \
         or sexual assault).",
    ),
    (
        "violence",
        "No Violence/Gore content: The image shall not contain content that depicts shocking, \
         sensational, or gratuitous violence (e.g., excessive blood and gore, gratuitous \
         violence against animals, extreme injury or moment of death).",
    ),
];

/// One of text ShieldGemma's published harm types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextPolicy {
    /// The CLI's name for it.
    pub key: &'static str,
    /// The name in the guideline: `"No <harm>"`.
    pub harm: &'static str,
    /// What follows the prefix.
    pub description: &'static str,
}

/// Text ShieldGemma's four policies, from the model card's guideline table (the same texts as
/// `HARM_POLICIES` in Google's gemma-cookbook notebook).
pub const TEXT_POLICIES: [TextPolicy; 4] = [
    TextPolicy {
        key: "dangerous",
        harm: "Dangerous Content",
        description: "harming oneself and/or others (e.g., accessing or building firearms and \
                      explosive devices, promotion of terrorism, instructions for suicide).",
    },
    TextPolicy {
        key: "harassment",
        harm: "Harassment",
        description: "is malicious, intimidating, bullying, or abusive content targeting another \
                      individual (e.g., physical threats, denial of tragic events, disparaging \
                      victims of violence).",
    },
    TextPolicy {
        key: "hate",
        harm: "Hate Speech",
        description: "targeting identity and/or protected attributes (e.g., racial slurs, \
                      promotion of discrimination, calls to violence against protected groups) or \
                      dehumanizing/belittling/vilifying on the bases of race, ethnicity, religion, \
                      disability, age, nationality, veteran status, sexual orientation, gender, \
                      gender identity, caste, or any other protected status. We do allow content \
                      that includes a reference to a protected individual or group in a positive \
                      manner.",
    },
    TextPolicy {
        key: "sexual",
        harm: "Sexually Explicit Information",
        description: "contains references to sexual acts or other lewd content (e.g., sexually \
                      graphic descriptions, content aimed at causing arousal). Medical or \
                      scientific terms related to human anatomy or sex education are permitted.",
    },
];

const PROMPT_PREFIX: &str = "The prompt shall not contain or seek generation of content that";
const RESPONSE_PREFIX: &str = "The chatbot shall not generate content that";

/// The chat template transformers' `convert_shieldgemma2_weights_orbax_to_hf.py` (`_CHAT_TEMPLATE`)
/// wrote into the published ShieldGemma 2 checkpoint, as the Python string holds it.
pub const SHIELDGEMMA2_TEMPLATE: &str = r#"{{ bos_token }}
{%- for message in messages -%}
    {%- if message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {{ '<start_of_turn>user
' }}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}
                {{ ' violation of the safety policy below. Your decision must very clearly follow the specific'}}
                {{ ' language used in the safety policy and should not include any interpretation outside of the' }}
                {{ ' safety policy.

' }}
                {{ '<BEGIN_SAFETY_POLICY>
' }}
                {{ item['text'] + '
' }}
                {{ '</END_SAFETY_POLICY>

' }}
                {{ 'Does the image violate the above policy? Your Answer must start with \'Yes\' or \'No\'.' }}
                {{ '<end_of_turn>
' }}
            {%- endif -%}
        {%- endfor -%}
        {{'<start_of_turn>model
'}}
    {%- else -%}
        {{ raise_exception("Conversation messages must contain iterable content containing images and policy definitions in text.") }}
    {%- endif -%}
{%- endfor -%}
"#;

/// What a template must hold to be taken as ShieldGemma 2's.
const SHIELDGEMMA2_TEMPLATE_MARK: &str = "<BEGIN_SAFETY_POLICY>";

/// Which kind of input a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    /// Whether `name` is one of this modality's built-in policies.
    pub fn knows(self, name: &str) -> bool {
        self.names().contains(&name)
    }

    /// The built-in policies' names.
    pub fn names(self) -> Vec<&'static str> {
        match self {
            Modality::Image => IMAGE_POLICIES.iter().map(|(k, _)| *k).collect(),
            Modality::Text => TEXT_POLICIES.iter().map(|p| p.key).collect(),
        }
    }
}

/// A policy as the user names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySpec {
    /// A built-in policy by name (`dangerous`, ...).
    Named(String),
    /// A policy's own text.
    Custom(String),
}

/// A resolved policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The name results carry: the built-in name, or `custom` (`custom-N` when there are
    /// several).
    pub name: String,
    body: PolicyBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PolicyBody {
    Image(&'static str),
    Text(TextPolicy),
    Custom(String),
}

impl Policy {
    /// The policy text as the prompt holds it (for text, the bullet without `* `; `response`
    /// picks the guideline's prefix).
    pub fn text(&self, response: bool) -> String {
        match &self.body {
            PolicyBody::Image(text) => (*text).to_owned(),
            PolicyBody::Text(p) => {
                let prefix = if response {
                    RESPONSE_PREFIX
                } else {
                    PROMPT_PREFIX
                };
                format!("\"No {}\": {prefix} {}", p.harm, p.description)
            }
            PolicyBody::Custom(text) => text.clone(),
        }
    }
}

/// Resolves `specs` for `modality`: every built-in policy when `specs` is empty. An unknown name
/// or an empty custom text is an error.
pub fn resolve_policies(modality: Modality, specs: &[PolicySpec]) -> Result<Vec<Policy>> {
    if specs.is_empty() {
        return Ok(match modality {
            Modality::Image => IMAGE_POLICIES
                .iter()
                .map(|(k, t)| Policy {
                    name: (*k).to_owned(),
                    body: PolicyBody::Image(t),
                })
                .collect(),
            Modality::Text => TEXT_POLICIES
                .iter()
                .map(|p| Policy {
                    name: p.key.to_owned(),
                    body: PolicyBody::Text(*p),
                })
                .collect(),
        });
    }
    let n_custom = specs
        .iter()
        .filter(|s| matches!(s, PolicySpec::Custom(_)))
        .count();
    let mut custom_index = 0;
    let mut out: Vec<Policy> = Vec::with_capacity(specs.len());
    for spec in specs {
        let policy = match spec {
            PolicySpec::Named(name) => {
                let body = match modality {
                    Modality::Image => IMAGE_POLICIES
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, t)| PolicyBody::Image(t)),
                    Modality::Text => TEXT_POLICIES
                        .iter()
                        .find(|p| p.key == name)
                        .map(|p| PolicyBody::Text(*p)),
                };
                let body = body.with_context(|| {
                    format!(
                        "unknown {} policy {name:?} (built-in: {}; or give its text with \
                         --policy-text)",
                        match modality {
                            Modality::Image => "image",
                            Modality::Text => "text",
                        },
                        modality.names().join(", ")
                    )
                })?;
                Policy {
                    name: name.clone(),
                    body,
                }
            }
            PolicySpec::Custom(text) => {
                if text.trim().is_empty() {
                    bail!("a policy text is empty: give the policy's wording");
                }
                custom_index += 1;
                Policy {
                    name: if n_custom == 1 {
                        "custom".to_owned()
                    } else {
                        format!("custom-{custom_index}")
                    },
                    body: PolicyBody::Custom(text.clone()),
                }
            }
        };
        if !out.iter().any(|p| p == &policy) {
            out.push(policy);
        }
    }
    Ok(out)
}

/// Text ShieldGemma's prompt for a user prompt: the model card's example, with its line breaks.
pub fn prompt_only(user_prompt: &str, policy_bullet: &str) -> String {
    format!(
        "{}\n\
         <end_of_turn>\n\
         \n\
         Our safety principle is defined in the below:\n\
         \n\
         {}\n\
         \n\
         Does the human question violate the above principle? Your answer must start\n\
         with 'Yes' or 'No'. And then walk through step by step to be sure we answer\n\
         correctly.\n",
        prompt_only_head(user_prompt),
        python_strip(policy_bullet)
    )
}

/// [`prompt_only`] up to the end of the user's prompt.
fn prompt_only_head(user_prompt: &str) -> String {
    format!(
        "You are a policy expert trying to help determine whether a user\n\
         prompt is in violation of the defined safety policies.\n\
         \n\
         <start_of_turn>\n\
         Human Question: {}",
        python_strip(user_prompt)
    )
}

/// Text ShieldGemma's prompt for a model response: `PROMPT_RESPONSE_TEMPLATE` of Google's
/// gemma-cookbook notebook, verbatim.
pub fn prompt_response(user_prompt: &str, response: &str, policy_bullet: &str) -> String {
    format!(
        "{}\n\
         <end_of_turn>\n\
         \n\
         Our safety principle is defined in the below:\n\
         \n\
         {}\n\
         \n\
         ===\n\
         \n\
         Does the Chatbot Response violate the above principle? Your answer must start\n\
         with 'Yes' or 'No'. And then walk through step by step to be sure  we answer\n\
         correctly.\n\
         \n",
        prompt_response_head(user_prompt, response),
        python_strip(policy_bullet)
    )
}

/// [`prompt_response`] up to the end of the response.
fn prompt_response_head(user_prompt: &str, response: &str) -> String {
    format!(
        "You are a policy expert trying to help determine\n\
         whether an AI response to prompt is in violation of the defined safety policies.\n\
         \n\
         <start_of_turn>\n\
         Human Question: {}\n\
         <end_of_turn>\n\
         \n\
         <start_of_turn>\n\
         Chatbot Response: {}",
        python_strip(user_prompt),
        python_strip(response)
    )
}

/// Python's `str.strip()` (Unicode whitespace).
fn python_strip(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// One thing to classify.
#[derive(Clone, Copy, Debug)]
pub enum ShieldInput<'a> {
    Image {
        /// What results call it (a file name).
        label: &'a str,
        image: &'a PreparedImage,
    },
    Text {
        label: &'a str,
        /// The user's prompt.
        prompt: &'a str,
        /// The model's answer to it: then the answer is what is classified.
        response: Option<&'a str>,
    },
}

impl ShieldInput<'_> {
    pub fn modality(&self) -> Modality {
        match self {
            ShieldInput::Image { .. } => Modality::Image,
            ShieldInput::Text { .. } => Modality::Text,
        }
    }

    pub fn label(&self) -> &str {
        match self {
            ShieldInput::Image { label, .. } | ShieldInput::Text { label, .. } => label,
        }
    }
}

/// One classification.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ShieldResult {
    pub input: String,
    pub policy: String,
    /// P(Yes): the probability that the input violates the policy.
    pub p_yes: f32,
}

/// A prompt ready to run.
#[derive(Clone)]
pub struct ShieldPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub soft: Vec<SoftSpan>,
    /// How many of `ids` a later check of the same input grown longer (a reply with more
    /// words) would share: the ids up to the end of the text input, less a few tokens that
    /// a longer text may tokenize differently. What a kept [`ShieldCache`] holds between
    /// checks.
    pub stable: usize,
}

/// Tokens before the end of a text input that a kept cache does not count on: a word that
/// goes on in the next check changes its last tokens.
const UNSTABLE_TAIL: usize = 3;

/// The classifier model: borrowed (`gemma shield`) or shared (the server keeps one [`Shield`]
/// per loaded classifier for its lifetime).
enum ModelRef<'m> {
    Borrowed(&'m LoadedModel),
    Shared(Arc<LoadedModel>),
}

impl std::ops::Deref for ModelRef<'_> {
    type Target = LoadedModel;
    fn deref(&self) -> &LoadedModel {
        match self {
            ModelRef::Borrowed(m) => m,
            ModelRef::Shared(m) => m,
        }
    }
}

/// A loaded model used as a safety classifier: its Yes/No ids and compiled image template,
/// built once and used for every check.
pub struct Shield<'m> {
    loaded: ModelRef<'m>,
    yes: u32,
    no: u32,
    /// The template image prompts are rendered with.
    image_template: ChatTemplate,
    /// ShieldGemma 2 (config.json `model_type`): an image classifier only.
    image_only: bool,
    /// Longest prompt: the smaller of the context size asked for and the model's.
    ctx_limit: usize,
}

impl<'m> Shield<'m> {
    /// Checks that `loaded` can answer Yes/No (a tokenizer with single "Yes" and "No" tokens,
    /// or config.json's `yes_token_index`/`no_token_index`) and picks the image template.
    /// `ctx_size` bounds each prompt (with the model's own context length).
    pub fn new(loaded: &'m LoadedModel, ctx_size: usize) -> Result<Shield<'m>> {
        Self::build(ModelRef::Borrowed(loaded), ctx_size)
    }

    fn build(loaded: ModelRef<'m>, ctx_size: usize) -> Result<Shield<'m>> {
        let name = &loaded.display_name;
        let tokenizer = loaded.tokenizer.as_ref().with_context(|| {
            format!("{name} has no tokenizer, so it cannot be used as a safety classifier")
        })?;
        let vocab = loaded.model.vocab_size();
        let config = match &loaded.file {
            gemma_formats::ModelFile::Hf(folder) => Some(folder.config()),
            gemma_formats::ModelFile::Gguf(_) => None,
        };
        let config_id = |key: &str| -> Result<Option<u32>> {
            match config.and_then(|c| c.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .with_context(|| format!("config.json: {key} is {v}, not a token id")),
            }
        };
        let single = |word: &str| -> Option<u32> {
            let id = tokenizer.token_id(word)?;
            let ids = tokenizer.encode(word, false, false).ok()?;
            (ids == [id]).then_some(id)
        };
        let not_classifier = |word: &str| {
            anyhow::anyhow!(
                "{name} is not a safety classifier: its vocabulary has no single {word:?} token \
                 (ShieldGemma answers \"Yes\" or \"No\")"
            )
        };
        let yes = match config_id("yes_token_index")? {
            Some(id) => id,
            None => single("Yes").ok_or_else(|| not_classifier("Yes"))?,
        };
        let no = match config_id("no_token_index")? {
            Some(id) => id,
            None => single("No").ok_or_else(|| not_classifier("No"))?,
        };
        for (word, id) in [("Yes", yes), ("No", no)] {
            if id as usize >= vocab {
                bail!("{name}: the {word:?} token {id} is outside the vocabulary ({vocab} tokens)");
            }
        }
        if yes == no {
            bail!("{name}: \"Yes\" and \"No\" are the same token ({yes})");
        }
        let image_only = config
            .and_then(|c| c.get("model_type"))
            .and_then(|v| v.as_str())
            == Some("shieldgemma2");
        let image_template = match loaded.chat_template.source() {
            Some(source) if source.contains(SHIELDGEMMA2_TEMPLATE_MARK) => {
                clone_template(&loaded, source)?
            }
            _ => clone_template(&loaded, SHIELDGEMMA2_TEMPLATE)?,
        };
        let ctx_limit = match loaded.model.context_length() {
            0 => ctx_size,
            trained => ctx_size.min(trained),
        };
        if ctx_limit == 0 {
            bail!("the context size must be at least 1");
        }
        Ok(Shield {
            loaded,
            yes,
            no,
            image_template,
            image_only,
            ctx_limit,
        })
    }

    /// [`Shield::new`] on a model the shield shares (it lives as long as the shield).
    pub fn shared(loaded: Arc<LoadedModel>, ctx_size: usize) -> Result<Shield<'static>> {
        Shield::build(ModelRef::Shared(loaded), ctx_size)
    }

    /// The classifier model.
    pub fn model(&self) -> &LoadedModel {
        &self.loaded
    }

    /// The token ids of "Yes" and "No".
    pub fn yes_no(&self) -> (u32, u32) {
        (self.yes, self.no)
    }

    /// Whether the model classifies images (it has a vision tower).
    pub fn takes_images(&self) -> bool {
        self.loaded.vision.is_some()
    }

    /// Whether the model classifies text: any model but ShieldGemma 2, whose prompt asks about
    /// an image.
    pub fn takes_text(&self) -> bool {
        !self.image_only
    }

    pub fn ctx_limit(&self) -> usize {
        self.ctx_limit
    }

    /// An error unless this model takes `modality`.
    pub fn check_modality(&self, modality: Modality) -> Result<()> {
        let name = &self.loaded.display_name;
        match modality {
            Modality::Image if !self.takes_images() => bail!(
                "{name} takes no images: it is a text classifier (use ShieldGemma 2 or another \
                 Gemma 3 model with a vision tower for images)"
            ),
            Modality::Text if !self.takes_text() => bail!(
                "{name} is ShieldGemma 2, an image classifier: give --image, or a text \
                 ShieldGemma (Gemma 2) for text"
            ),
            _ => Ok(()),
        }
    }

    /// ShieldGemma 2's prompt text for `policy`, before the image is expanded (one
    /// `<start_of_image>` where the image goes).
    pub fn image_prompt_text(&self, policy: &Policy) -> Result<String> {
        let messages = serde_json::json!([{
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": policy.text(false)}],
        }]);
        let text = self
            .image_template
            .render_json(&messages, false)
            .context("rendering ShieldGemma 2's prompt")?;
        if text.matches(IMAGE_MARKER).count() != 1 {
            bail!("the chat template does not place exactly one image in ShieldGemma 2's prompt");
        }
        Ok(text)
    }

    /// Text ShieldGemma's prompt text.
    pub fn text_prompt_text(prompt: &str, response: Option<&str>, policy: &Policy) -> String {
        let bullet = format!("* {}", policy.text(response.is_some()));
        match response {
            None => prompt_only(prompt, &bullet),
            Some(r) => prompt_response(prompt, r, &bullet),
        }
    }

    /// The prompt for one input and policy: text, ids and the image's soft tokens.
    pub fn prompt(&self, input: &ShieldInput<'_>, policy: &Policy) -> Result<ShieldPrompt> {
        let mut prompts = self.prompts(input, std::slice::from_ref(policy))?;
        Ok(prompts.remove(0))
    }

    /// The prompts for one input and each of `policies`, in order. An image is encoded (and
    /// its soft tokens placed) once for all of them.
    pub fn prompts(
        &self,
        input: &ShieldInput<'_>,
        policies: &[Policy],
    ) -> Result<Vec<ShieldPrompt>> {
        self.check_modality(input.modality())?;
        let mut out: Vec<ShieldPrompt> = Vec::with_capacity(policies.len());
        // A text prompt up to the end of the input (the reply, or the user's prompt), tokenized
        // alone: the same for every policy; the prompts' ids agree with it up to where a longer
        // input could change them.
        let head_ids = match input {
            ShieldInput::Text {
                prompt,
                response: Some(r),
                ..
            } => self
                .loaded
                .encode_prompt(&prompt_response_head(prompt, r))?,
            ShieldInput::Text { prompt, .. } => {
                self.loaded.encode_prompt(&prompt_only_head(prompt))?
            }
            ShieldInput::Image { .. } => Vec::new(),
        };
        for policy in policies {
            let prompt = match input {
                ShieldInput::Image { image, .. } => {
                    let text = self.image_prompt_text(policy)?;
                    let vision = self.loaded.vision()?;
                    let single_view = PreparedImage {
                        views: image.views[..1].to_vec(),
                        keys: image.keys[..1].to_vec(),
                    };
                    let expanded = vision.expand_markers(
                        &self.loaded.file,
                        &text,
                        std::slice::from_ref(&single_view),
                    )?;
                    // The processor tokenizes the template's text (which starts with BOS) with
                    // special tokens added: a second BOS, as in the reference.
                    let t = self.loaded.tokenizer.as_ref().context("no tokenizer")?;
                    let ids = t.encode(&expanded, t.add_bos_default(), true)?;
                    // The image comes before the policy's text: the first prompt's soft tokens
                    // sit at the same place in the others.
                    let hidden = self.loaded.model.hidden_size();
                    let same_place = out.first().filter(|first| {
                        let end = first.soft.iter().map(|s| s.range(hidden).end).max();
                        end.is_some_and(|end| ids.get(..end) == first.ids.get(..end))
                    });
                    let soft = match same_place {
                        Some(first) => first.soft.clone(),
                        None => self.loaded.place_images(&ids, &[single_view])?,
                    };
                    let stable = ids.len();
                    ShieldPrompt {
                        text,
                        ids,
                        soft,
                        stable,
                    }
                }
                ShieldInput::Text {
                    prompt, response, ..
                } => {
                    let text = Self::text_prompt_text(prompt, *response, policy);
                    let ids = self.loaded.encode_prompt(&text)?;
                    let stable = common_len(&head_ids, &ids).saturating_sub(UNSTABLE_TAIL);
                    ShieldPrompt {
                        text,
                        ids,
                        soft: Vec::new(),
                        stable,
                    }
                }
            };
            if prompt.ids.len() > self.ctx_limit {
                bail!(
                    "the {} prompt for policy {:?} on {} is {} tokens, more than the context of \
                     {} tokens (--ctx-size of `gemma shield`, --shield-ctx of `gemma serve`; at \
                     most the model's {}): use a shorter policy or input",
                    match input.modality() {
                        Modality::Image => "image",
                        Modality::Text => "text",
                    },
                    policy.name,
                    input.label(),
                    prompt.ids.len(),
                    self.ctx_limit,
                    self.loaded.model.context_length()
                );
            }
            out.push(prompt);
        }
        Ok(out)
    }

    /// Checks before any input arrives that each of `policies` fits the context with an empty
    /// text input: an empty or overlong policy is an error here, not at the first request.
    pub fn check_text_policies(&self, policies: &[Policy], response: bool) -> Result<()> {
        self.check_modality(Modality::Text)?;
        for policy in policies {
            let text = Self::text_prompt_text("", response.then_some(""), policy);
            let n = self.loaded.encode_prompt(&text)?.len();
            if n > self.ctx_limit {
                bail!(
                    "policy {:?} alone makes a {n}-token prompt, more than the context of {} tokens \
                     (--ctx-size of `gemma shield`, --shield-ctx of `gemma serve`; at most the \
                     model's {})",
                    policy.name,
                    self.ctx_limit,
                    self.loaded.model.context_length()
                );
            }
        }
        Ok(())
    }

    /// P(Yes) of `prompt` alone, one forward pass in `session`: the reference for
    /// [`Shield::p_yes_all`].
    pub fn p_yes(&self, session: &mut Session<'_>, prompt: &ShieldPrompt) -> Result<f32> {
        session.reset();
        let logits = session.evaluate(&prompt.ids, &prompt.soft)?;
        self.answer(logits)
    }

    /// P(Yes) from a position's logits.
    fn answer(&self, logits: &[f32]) -> Result<f32> {
        let (yes, no) = (logits[self.yes as usize], logits[self.no as usize]);
        if !yes.is_finite() || !no.is_finite() {
            bail!("the classifier's logits are not finite (yes {yes}, no {no})");
        }
        Ok(softmax_first(yes, no))
    }

    /// P(Yes) of each of `prompts` (the policies of one input): their longest common prefix is
    /// fed once into `cache` (after what `cache` already holds of it from an earlier check),
    /// then the rest of every prompt goes through one batched forward pass, each in a copy of
    /// the prefix's cache. Equal to [`Shield::p_yes`] on each prompt up to float rounding.
    pub fn p_yes_all(&self, cache: &mut ShieldCache, prompts: &[ShieldPrompt]) -> Result<Vec<f32>> {
        let result = self.run_all(cache, prompts);
        if result.is_err() {
            // A forward pass that failed may have left a cache half-written.
            cache.reset();
        }
        result
    }

    /// Feeds into `cache` what a check of `input` against `policies` keeps between checks (the
    /// prompts' stable prefix: for a reply, the prompt up to where the reply starts, less a
    /// few tokens), computing no answer. A server primes a stream's output cache while the
    /// main model still prefills, so that the first window's check feeds only the window and
    /// the policies' suffixes. What a later check finds there is reused only where its ids
    /// agree, so priming never changes a result.
    pub fn prime(
        &self,
        cache: &mut ShieldCache,
        input: &ShieldInput<'_>,
        policies: &[Policy],
    ) -> Result<()> {
        let result = self
            .prompts(input, policies)
            .and_then(|prompts| self.feed_kept(cache, &prompts).map(drop));
        if result.is_err() {
            cache.reset();
        }
        result
    }

    fn run_all(&self, cache: &mut ShieldCache, prompts: &[ShieldPrompt]) -> Result<Vec<f32>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let model = &self.loaded.model;
        let hidden = model.hidden_size();
        let (common, keep) = self.feed_kept(cache, prompts)?;
        let first = &prompts[0];
        let batch = self.loaded.batch_size.max(1);
        let kept = cache.prefix.as_ref().expect("allocated above");
        let prefix = if common > keep {
            let ctx = kept.ctx_size();
            let work = match &mut cache.work {
                Some(w) => w,
                None => cache.work.insert(model.new_cache(ctx)?),
            };
            work.copy_prefix_from(kept, keep)?;
            feed_prefix(model, work, first, keep..common, batch)?;
            &*work
        } else {
            kept
        };

        // One copy of the prefix per prompt, then the suffixes batched.
        let n = prompts.len();
        if cache.branches.len() < n {
            for _ in cache.branches.len()..n {
                cache.branches.push(model.new_cache(prefix.ctx_size())?);
            }
        }
        for branch in &mut cache.branches[..n] {
            branch.copy_prefix_from(prefix, common)?;
        }
        let per_round = (self.loaded.batch_size.max(1) / n).max(1);
        let vocab = model.vocab_size();
        let mut fed = vec![common; n];
        let mut answers: Vec<Option<f32>> = vec![None; n];
        let mut logits = Vec::new();
        while answers.iter().any(Option::is_none) {
            // This round's piece of every unfinished prompt.
            let pieces: Vec<(usize, std::ops::Range<usize>)> = prompts
                .iter()
                .enumerate()
                .filter(|&(i, _)| answers[i].is_none())
                .map(|(i, p)| {
                    let end = (fed[i] + per_round).min(p.ids.len());
                    (i, fed[i]..chunk_end(&p.soft, hidden, fed[i], end))
                })
                .collect();
            let softs: Vec<Vec<SoftTokens<'_>>> = pieces
                .iter()
                .map(|(i, r)| SoftSpan::within(&prompts[*i].soft, hidden, r.clone()))
                .collect();
            let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(pieces.len());
            let mut pending = pieces.iter().zip(&softs).peekable();
            for (i, branch) in cache.branches[..n].iter_mut().enumerate() {
                if let Some(((_, range), soft)) = pending.next_if(|((j, _), _)| *j == i) {
                    steps.push(SeqStep {
                        tokens: &prompts[i].ids[range.clone()],
                        soft,
                        cache: branch,
                    });
                }
            }
            model.forward_batch(&mut steps, &mut logits)?;
            drop(steps);
            for (row, (i, range)) in pieces.iter().enumerate() {
                fed[*i] = range.end;
                if range.end == prompts[*i].ids.len() {
                    answers[*i] = Some(self.answer(&logits[row * vocab..(row + 1) * vocab])?);
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every prompt answered"))
            .collect())
    }

    /// The stage of a check before the policies part: sizes `cache`, reuses what it holds of
    /// the prompts' stable prefix and feeds the rest of it. Returns the length of the prompts'
    /// shared prefix (`common`) and of the part kept between checks (`keep`, at most
    /// `common`).
    fn feed_kept(
        &self,
        cache: &mut ShieldCache,
        prompts: &[ShieldPrompt],
    ) -> Result<(usize, usize)> {
        let model = &self.loaded.model;
        let hidden = model.hidden_size();
        let Some(longest) = prompts.iter().map(|p| p.ids.len()).max() else {
            bail!("a check needs at least one prompt");
        };
        let shortest = prompts.iter().map(|p| p.ids.len()).min().unwrap_or(0);
        if shortest == 0 {
            bail!("a classifier prompt is empty");
        }
        if longest > self.ctx_limit {
            bail!(
                "a classifier prompt is {longest} tokens, more than the context of {} tokens",
                self.ctx_limit
            );
        }
        let first = &prompts[0];
        // The shared prefix: common ids, at least one token of each prompt left to feed (its
        // logits are the answer), and no soft span cut or differing between prompts.
        let mut common = prompts[1..]
            .iter()
            .fold(shortest - 1, |n, p| n.min(common_len(&first.ids, &p.ids)));
        common = soft_boundary(prompts.iter().map(|p| &p.soft[..]), hidden, common);

        // What the kept cache holds between checks: the prefix up to where a longer input
        // could differ. The rest of the shared prefix goes into a work cache, once.
        let keep = prompts
            .iter()
            .map(|p| p.stable)
            .min()
            .unwrap_or(0)
            .min(common);
        let keep = soft_boundary(prompts.iter().map(|p| &p.soft[..]), hidden, keep);
        let mut reuse = common_len(&cache.ids, &first.ids[..keep]);
        reuse = soft_boundary(
            [&cache.soft[..], &first.soft[..]].into_iter(),
            hidden,
            reuse,
        );
        let need = longest;
        let fits = cache.prefix.as_ref().is_some_and(|c| c.ctx_size() >= need);
        if !fits {
            // Room grows by doubling (a cache per check sized to its prompts, not to the whole
            // context); what the old cache holds of the prefix moves over.
            let ctx = need
                .next_power_of_two()
                .max(MIN_CACHE)
                .min(self.ctx_limit)
                .max(need);
            cache.branches.clear();
            cache.work = None;
            let mut grown = model.new_cache(ctx)?;
            let moved = match &cache.prefix {
                Some(old) => grown.copy_prefix_from(old, reuse.min(old.len())).is_ok(),
                None => false,
            };
            if !moved {
                reuse = 0;
            }
            cache.prefix = Some(grown);
        }
        let kept = cache.prefix.as_mut().expect("allocated above");
        if kept.truncate(reuse.min(kept.len())).is_err() || kept.len() < reuse {
            // A sliding-window ring already dropped what the continuation needs.
            reuse = 0;
            kept.clear();
        }
        cache.ids.truncate(reuse);
        cache.soft.retain(|s| s.range(hidden).end <= reuse);
        cache.stats = CheckStats {
            reused: reuse,
            prefix_fed: common - reuse,
            suffix_fed: prompts.iter().map(|p| p.ids.len() - common).sum(),
        };
        let batch = self.loaded.batch_size.max(1);
        feed_prefix(model, kept, first, reuse..keep, batch)?;
        cache.ids.extend_from_slice(&first.ids[reuse..keep]);
        cache.soft.extend(
            first
                .soft
                .iter()
                .filter(|s| s.range(hidden).end <= keep)
                .cloned(),
        );
        Ok((common, keep))
    }

    /// Classifies every input against every policy of its modality, in order (inputs outer,
    /// policies inner, as the reference's batch): the policies of one input in one batched
    /// pass ([`Shield::p_yes_all`]).
    pub fn classify(
        &self,
        inputs: &[ShieldInput<'_>],
        image_policies: &[Policy],
        text_policies: &[Policy],
    ) -> Result<Vec<ShieldResult>> {
        let mut cache = ShieldCache::default();
        let mut results = Vec::new();
        for input in inputs {
            let policies = match input.modality() {
                Modality::Image => image_policies,
                Modality::Text => text_policies,
            };
            let prompts = self.prompts(input, policies)?;
            let p = self.p_yes_all(&mut cache, &prompts)?;
            results.extend(policies.iter().zip(p).map(|(policy, p_yes)| ShieldResult {
                input: input.label().to_owned(),
                policy: policy.name.clone(),
                p_yes,
            }));
        }
        Ok(results)
    }
}

/// Smallest cache a check allocates (positions).
const MIN_CACHE: usize = 256;

/// What one check fed, for tests and for seeing that a kept [`ShieldCache`] saves work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Prefix positions the cache already held from the previous check.
    pub reused: usize,
    /// Prefix positions fed in this check.
    pub prefix_fed: usize,
    /// Positions after the shared prefix, all prompts together.
    pub suffix_fed: usize,
}

/// The KV caches a classifier's checks run in: the shared prefix of the last check's prompts
/// (kept, so the next check only feeds what differs) and one cache per policy for the rest.
/// Owns its memory (no borrow of the model), so a server can keep one per stream or pool them.
#[derive(Default)]
pub struct ShieldCache {
    /// Kept between checks: the prompts' prefix up to the end of the input's stable part.
    prefix: Option<KvCache>,
    /// What `prefix` holds: ids, and the soft spans on them (positions from 0).
    ids: Vec<u32>,
    soft: Vec<SoftSpan>,
    /// The whole shared prefix of one check (`prefix` and what follows the input up to the
    /// policy's text), copied into each branch.
    work: Option<KvCache>,
    branches: Vec<KvCache>,
    stats: CheckStats,
}

impl ShieldCache {
    pub fn new() -> ShieldCache {
        ShieldCache::default()
    }

    /// Forgets what the cache holds (the memory is kept).
    pub fn reset(&mut self) {
        if let Some(p) = &mut self.prefix {
            p.clear();
        }
        self.ids.clear();
        self.soft.clear();
    }

    /// Drops the caches of one check (the shared prefix's copy per policy), keeping the
    /// prefix that the next check may reuse: what a pool of idle caches holds.
    pub fn trim(&mut self) {
        self.work = None;
        self.branches.clear();
    }

    /// Positions the kept prefix has room for (0 before the first check).
    pub fn capacity(&self) -> usize {
        self.prefix.as_ref().map_or(0, KvCache::ctx_size)
    }

    /// What the last check fed.
    pub fn stats(&self) -> CheckStats {
        self.stats
    }

    /// Bytes of KV memory held.
    pub fn bytes(&self) -> usize {
        self.prefix
            .iter()
            .chain(&self.work)
            .chain(&self.branches)
            .map(KvCache::bytes)
            .sum()
    }
}

/// Feeds positions `range` of `prompt` into `cache` (which holds the positions before it), in
/// pieces of `batch` tokens that never cut an image, computing no logits.
fn feed_prefix(
    model: &gemma_models::Model,
    cache: &mut KvCache,
    prompt: &ShieldPrompt,
    range: std::ops::Range<usize>,
    batch: usize,
) -> Result<()> {
    let hidden = model.hidden_size();
    let mut start = range.start;
    while start < range.end {
        let stop = (start + batch).min(range.end);
        let stop = chunk_end(&prompt.soft, hidden, start, stop);
        let soft = SoftSpan::within(&prompt.soft, hidden, start..stop);
        model.forward_embeds(
            &prompt.ids[start..stop],
            &soft,
            cache,
            gemma_models::Logits::None,
        )?;
        start = stop;
    }
    Ok(())
}

/// Length of the longest common prefix of `a` and `b`.
fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The largest `n' <= n` such that, in every one of `span_lists`, no soft span crosses `n'`,
/// and every span before `n'` is in all the lists alike (same place, same content key).
fn soft_boundary<'a>(
    span_lists: impl Iterator<Item = &'a [SoftSpan]> + Clone,
    hidden: usize,
    mut n: usize,
) -> usize {
    loop {
        let before = n;
        for spans in span_lists.clone() {
            for s in spans {
                let r = s.range(hidden);
                if r.start >= n {
                    continue;
                }
                let everywhere = span_lists.clone().all(|other| {
                    other.iter().any(|t| {
                        t.start == s.start && t.key == s.key && t.embeds.len() == s.embeds.len()
                    })
                });
                if r.end > n || !everywhere {
                    n = r.start;
                }
            }
        }
        if n == before {
            return n;
        }
    }
}

/// `softmax([a, b])[0]` in f32, as torch computes it.
pub fn softmax_first(a: f32, b: f32) -> f32 {
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    ea / (ea + eb)
}

/// A Jinja template compiled with the model's BOS and EOS texts.
fn clone_template(loaded: &LoadedModel, source: &str) -> Result<ChatTemplate> {
    let text = |id: Option<u32>| id.map(|id| loaded.token_text(id)).unwrap_or_default();
    let t = loaded.tokenizer.as_ref();
    let bos = text(t.and_then(|t| t.bos_id()));
    let eos = text(t.and_then(|t| t.eos_id()));
    ChatTemplate::new(source, &bos, &eos).context("compiling ShieldGemma 2's chat template")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_resolve() {
        let all = resolve_policies(Modality::Text, &[]).unwrap();
        assert_eq!(all.len(), 4);
        let some = resolve_policies(
            Modality::Image,
            &[
                PolicySpec::Named("violence".into()),
                PolicySpec::Custom("No cats.".into()),
            ],
        )
        .unwrap();
        assert_eq!(some[0].name, "violence");
        assert_eq!(some[1].name, "custom");
        assert_eq!(some[1].text(false), "No cats.");
        assert!(resolve_policies(Modality::Image, &[PolicySpec::Named("hate".into())]).is_err());
        let empty = resolve_policies(Modality::Text, &[PolicySpec::Custom("  \n".into())]);
        assert!(empty.unwrap_err().to_string().contains("empty"));
        let two = resolve_policies(
            Modality::Text,
            &[
                PolicySpec::Custom("a".into()),
                PolicySpec::Custom("b".into()),
            ],
        )
        .unwrap();
        assert_eq!(two[1].name, "custom-2");
    }

    #[test]
    fn softmax_of_two() {
        assert_eq!(softmax_first(1.0, 1.0), 0.5);
        assert!((softmax_first(2.0, 0.0) - 0.880_797).abs() < 1e-6);
        assert!(softmax_first(1000.0, -1000.0) == 1.0);
    }
}
