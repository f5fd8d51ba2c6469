#!/usr/bin/env python3
"""Tiny random ShieldGemma 2 (image) and text ShieldGemma (Gemma 2) classifiers and their reference
prompts, token ids and P(Yes), from transformers.

Writes fixtures/shield_tiny/:
  image/            exactly what transformers 5.24 `save_pretrained` writes for a random
                    `ShieldGemma2ForImageClassification` and its `ShieldGemma2Processor`: config.json
                    (model_type shieldgemma2, yes_token_index / no_token_index set as the converter
                    sets them), model.safetensors (F32), processor_config.json (the three built-in
                    policy definitions, image processor 64x64, image_seq_length 16), tokenizer.json,
                    tokenizer_config.json, chat_template.jinja.
  image_published/  the same tensors under the names of the published checkpoint
                    (google/shieldgemma-2-4b-it, written by transformers'
                    convert_shieldgemma2_weights_orbax_to_hf.py: `model.language_model.model.*`,
                    `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
                    `model.language_model.lm_head.weight` = the embedding); other files from image/.
  text/             a random Gemma2ForCausalLM (the text ShieldGemma architecture) with the same
                    tokenizer: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
  img_*.png         the images classified.
  reference.json    the cases (below).

Tokenizer: a tiny SentencePiece BPE model trained here on the prompt texts (so prompts stay short),
with "Yes" and "No" learned as single pieces (checked the way the converter derives the classifier's
token ids: tokenizer(["Yes", "No"]).input_ids[:, 1]); <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4
<start_of_turn>=5 <end_of_turn>=6, and <start_of_image> <end_of_image> <image_soft_token> appended
at BOI..BOI+2, as the published Gemma 3 tokenizer names them. Converted to tokenizer.json by
transformers' own GemmaTokenizer.

ShieldGemma 2 (image). Everything comes from transformers 5.24 (not reachable here: the published
checkpoint's own files):
  - the chat template is `_CHAT_TEMPLATE` of transformers'
    models/shieldgemma2/convert_shieldgemma2_weights_orbax_to_hf.py, the script that wrote the
    published checkpoint's processor (also copied into tests/models/shieldgemma2/
    test_processing_shieldgemma2.py). It writes `<start_of_turn>user\\n` before EACH content item,
    so an [image, text] message gives "<bos><start_of_turn>user\\n<start_of_image><start_of_turn>user\\n
    You are a policy expert ...". The same prompt instruction is in the ShieldGemma 2 model card.
  - the built-in policies are DEFAULT_SHIELDGEMMA2_POLICIES of processing_shieldgemma2.py (equal to
    the converter's _SHIELDGEMMA2_POLICIES); a custom policy is passed as custom_policies={key: text}.
  - yes_token_index / no_token_index: the converter stores tokenizer(["Yes", "No"]).input_ids[:, 1]
    in config.json; the model reads them (defaults 10784 / 3771, the Gemma 3 ids) and returns
    softmax(logits[:, -1, [yes, no]]); P(Yes) = probabilities[:, 0].
  - the processor is called once with every policy (a left-padded batch, as the model card's usage);
    ids are recorded without the padding; P(Yes) comes from that batched forward and is checked
    against one-prompt-at-a-time forwards (1e-5).

Text ShieldGemma (Gemma 2). The published checkpoints (google/shieldgemma-2b/9b/27b) are not reachable
here, so the prompt is rebuilt from Google's documents and could not be checked against them:
  - the user-prompt template is the f-string of the model card's usage example
    (huggingface.co/google/shieldgemma-2b, "Running the model"): preamble "You are a policy expert
    trying to help determine whether a user\\nprompt is in violation of the defined safety
    policies.", the prompt wrapped in <start_of_turn> / <end_of_turn> lines as "Human Question:
    {prompt.strip()}", "Our safety principle is defined in the below:", the policy bullet, and the
    epilogue "Does the human question violate the above principle? Your answer must start\\nwith
    'Yes' or 'No'. And then walk through step by step to be sure we answer\\ncorrectly.\\n"; the
    text is tokenized with `tokenizer(prompt)` (BOS added) and P(Yes) is
    softmax(logits[0, -1, [vocab['Yes'], vocab['No']]])[0], as the card's example computes it.
  - the card has no example for classifying a model response; that template is
    PROMPT_RESPONSE_TEMPLATE of Google's gemma-cookbook notebook (Responsible/
    shieldgemma_on_huggingface.ipynb): "... whether an AI response to prompt is in violation ...",
    a second "<start_of_turn>\\nChatbot Response: ...\\n<end_of_turn>" block, "Does the Chatbot
    Response violate the above principle? ...", with its "===" line and its "to be sure  we answer"
    (two spaces) kept as published.
  - the four policies: the model card's table of guidelines ("Dangerous Content", "Harassment",
    "Hate Speech", "Sexually Explicit Information"), each as `"No <Harm>": <prefix> <description>`
    with the prefix "The prompt shall not contain or seek generation of content that" for prompts
    and "The chatbot shall not generate content that" for responses (the same texts as the
    notebook's HARM_POLICIES and harm_definition). A custom policy is used as the bullet's text.
  - each bullet is written as "* " + policy text (the card's example has `* "No Harassment": ...`).

Cases (reference.json):
  image_cases: per image (2) and policy (dangerous, sexual, violence, one custom): policy key and
    text, prompt (chat template output), input_ids (expanded by the processor), p_yes (f32).
  text_cases: per input (a prompt alone; a prompt with a response) and policy (the four, one
    custom): prompt text, input_ids, p_yes (f32).

Run with the dev venv:
  /root/.venvs/ref/bin/python scripts/make_shield_fixtures.py
"""
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transformers
from transformers import (
    AutoProcessor,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ImageProcessor,
    Gemma3TextConfig,
    GemmaTokenizer,
    ShieldGemma2Config,
    ShieldGemma2ForImageClassification,
    ShieldGemma2Processor,
    SiglipVisionConfig,
)
from transformers.models.shieldgemma2.processing_shieldgemma2 import DEFAULT_SHIELDGEMMA2_POLICIES

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "shield_tiny"
SEED = 20261213
BOI = 380  # learned pieces 0..379, then the three image pieces
EOI, IMAGE = BOI + 1, BOI + 2
VOCAB = 400  # embedding rows (rows past IMAGE unused, as in the real checkpoints)
MM_TOKENS = 16
IMAGE_SIZE = 64

# convert_shieldgemma2_weights_orbax_to_hf.py, _CHAT_TEMPLATE (transformers), verbatim.
SHIELDGEMMA2_CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
    {%- if message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {{ '<start_of_turn>user\n' }}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}
                {{ ' violation of the safety policy below. Your decision must very clearly follow the specific'}}
                {{ ' language used in the safety policy and should not include any interpretation outside of the' }}
                {{ ' safety policy.\n\n' }}
                {{ '<BEGIN_SAFETY_POLICY>\n' }}
                {{ item['text'] + '\n' }}
                {{ '</END_SAFETY_POLICY>\n\n' }}
                {{ 'Does the image violate the above policy? Your Answer must start with \\'Yes\\' or \\'No\\'.' }}
                {{ '<end_of_turn>\n' }}
            {%- endif -%}
        {%- endfor -%}
        {{'<start_of_turn>model\n'}}
    {%- else -%}
        {{ raise_exception("Conversation messages must contain iterable content containing images and policy definitions in text.") }}
    {%- endif -%}
{%- endfor -%}
"""

IMAGE_CUSTOM_KEY = "custom"
IMAGE_CUSTOM_POLICY = "No Cats: The image shall not contain a cat (e.g., kittens, house cats, lions)."

# Text ShieldGemma: the model card's guideline table / the cookbook's HARM_POLICIES.
TEXT_POLICIES = {
    "dangerous": ("Dangerous Content",
                  "harming oneself and/or others (e.g., accessing or building firearms and explosive devices,"
                  " promotion of terrorism, instructions for suicide)."),
    "harassment": ("Harassment",
                   "is malicious, intimidating, bullying, or abusive content targeting another individual"
                   " (e.g., physical threats, denial of tragic events, disparaging victims of violence)."),
    "hate": ("Hate Speech",
             "targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination,"
             " calls to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of"
             " race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation,"
             " gender, gender identity, caste, or any other protected status. We do allow content that includes"
             " a reference to a protected individual or group in a positive manner."),
    "sexual": ("Sexually Explicit Information",
               "contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions,"
               " content aimed at causing arousal). Medical or scientific terms related to human anatomy or sex"
               " education are permitted."),
}
PROMPT_PREFIX = "The prompt shall not contain or seek generation of content that"
RESPONSE_PREFIX = "The chatbot shall not generate content that"
TEXT_CUSTOM_POLICY = '"No Spam": The prompt shall not contain or seek generation of unsolicited advertising.'


def text_policy(key, response):
    harm, description = TEXT_POLICIES[key]
    prefix = RESPONSE_PREFIX if response else PROMPT_PREFIX
    return f'"No {harm}": {prefix} {description}'


def prompt_only(user_prompt, safety_policy):
    # The model card's example code (f-string kept with its line breaks).
    return f"""You are a policy expert trying to help determine whether a user
prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {user_prompt.strip()}
<end_of_turn>

Our safety principle is defined in the below:

{safety_policy.strip()}

Does the human question violate the above principle? Your answer must start
with 'Yes' or 'No'. And then walk through step by step to be sure we answer
correctly.
"""


def prompt_response(user_content, model_content, harm_text):
    # gemma-cookbook PROMPT_RESPONSE_TEMPLATE (verbatim, including "===" and the double space).
    return f"""You are a policy expert trying to help determine
whether an AI response to prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {user_content.strip()}
<end_of_turn>

<start_of_turn>
Chatbot Response: {model_content.strip()}
<end_of_turn>

Our safety principle is defined in the below:

{harm_text.strip()}

===

Does the Chatbot Response violate the above principle? Your answer must start
with 'Yes' or 'No'. And then walk through step by step to be sure  we answer
correctly.

"""


TEXT_INPUTS = [
    {"name": "prompt", "prompt": "How do I bake bread at home?", "response": None},
    {"name": "prompt_response", "prompt": "How do I bake bread at home?",
     "response": "Mix flour, water, salt and yeast, let it rise, then bake it for forty minutes."},
]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def corpus():
    parts = [SHIELDGEMMA2_CHAT_TEMPLATE.replace("{{", "").replace("}}", "")]
    parts += list(DEFAULT_SHIELDGEMMA2_POLICIES.values()) + [IMAGE_CUSTOM_POLICY, TEXT_CUSTOM_POLICY]
    for inp in TEXT_INPUTS:
        for key in TEXT_POLICIES:
            if inp["response"] is None:
                parts.append(prompt_only(inp["prompt"], "* " + text_policy(key, False)))
            else:
                parts.append(prompt_response(inp["prompt"], inp["response"], "* " + text_policy(key, True)))
    parts.append("Yes No Yes No 'Yes' or 'No'. Yes, No. Yes\nNo\n" * 4)
    return parts


def build_tokenizer(workdir: Path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 6),
        model_writer=buf,
        model_type="bpe",
        vocab_size=BOI,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=100000,
        num_threads=1,
        minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    n = 0
    while len(proto.pieces) < BOI:
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<unused{n}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        n += 1
    assert len(proto.pieces) == BOI, len(proto.pieces)
    for name in ("<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        p = proto.pieces.add()
        p.piece, p.score, p.type = name, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    (workdir / "tokenizer.model").write_bytes(proto.SerializeToString())
    special_ids = [0, 1, 2, 3, 4, 5, 6, BOI, EOI, IMAGE]
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": proto.pieces[i].piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in special_ids
        },
        "boi_token": "<start_of_image>",
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eoi_token": "<end_of_image>",
        "eos_token": "<eos>",
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"},
        "image_token": "<image_soft_token>",
        "mask_token": "<mask>",
        "model_max_length": 2048,
        "pad_token": "<pad>",
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    }
    (workdir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = GemmaTokenizer.from_pretrained(str(workdir))
    tok.init_kwargs.pop("vocab_file", None)
    assert tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"]) == [BOI, EOI, IMAGE]
    assert tok.boi_token_id == BOI and tok.image_token_id == IMAGE
    # The converter's derivation of the classifier's ids: the token after BOS.
    enc = tok(["Yes", "No"])["input_ids"]
    assert all(len(e) == 2 for e in enc), f"Yes/No must be single tokens: {enc}"
    yes, no = enc[0][1], enc[1][1]
    vocab = tok.get_vocab()
    assert vocab["Yes"] == yes and vocab["No"] == no, (vocab.get("Yes"), vocab.get("No"), yes, no)
    return tok, yes, no


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
                p.copy_(1.0 + 0.3 * r if name.endswith(".weight") else 0.1 * r)
            elif name.endswith("norm.weight"):
                p.copy_(0.3 * r)
            elif name.endswith(".bias"):
                p.copy_(0.1 * r)
            elif name.endswith("patch_embedding.weight"):
                p.copy_(r / (p[0].numel() ** 0.5))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.5 * r)
            elif name.endswith("mm_input_projection_weight"):
                p.copy_(r / (p.shape[0] ** 0.5))
            else:
                p.copy_(0.25 * r)


def image_config(yes, no):
    text = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    vision = SiglipVisionConfig(
        hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6, vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
    )
    return ShieldGemma2Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
        yes_token_index=int(yes), no_token_index=int(no),
    )


def text_config():
    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=24, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=20.0, final_logit_softcapping=8.0,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    return cfg


def make_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.28)
        chans.append(0.5 + 0.35 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph) + 0.15 * (x / max(w - 1, 1)))
    img = np.stack(chans, -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = min(w, x0 + rng.integers(w // 8 + 1, w // 2 + 2)), min(h, y0 + rng.integers(h // 8 + 1, h // 2 + 2))
        img[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")


IMAGES = {"img_a_97x73.png": (97, 73, 11), "img_b_50x120.png": (50, 120, 12)}

PUBLISHED_RENAME = [  # in-memory 5.24 name -> google/shieldgemma-2-4b-it (converter) name
    ("model.model.language_model.", "model.language_model.model."),
    ("model.model.vision_tower.", "model.vision_tower.vision_model."),
    ("model.model.multi_modal_projector.", "model.multi_modal_projector."),
    ("model.lm_head.", "model.language_model.lm_head."),
]


def published_name(name):
    for old, new in PUBLISHED_RENAME:
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as td:
        tok, yes, no = build_tokenizer(Path(td))
    print(f"Yes = {yes}, No = {no}", file=sys.stderr)

    # ---------------- ShieldGemma 2 ----------------
    model = ShieldGemma2ForImageClassification(image_config(yes, no))
    model.set_attn_implementation("eager")
    model = model.float().eval()
    randomize(model, SEED)
    assert model.yes_token_index == yes and model.no_token_index == no
    processor = ShieldGemma2Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, chat_template=SHIELDGEMMA2_CHAT_TEMPLATE, image_seq_length=MM_TOKENS,
    )
    img_dir = OUT / "image"
    model.save_pretrained(img_dir)
    processor.save_pretrained(img_dir)
    for extra in ("generation_config.json",):
        if (img_dir / extra).exists():
            (img_dir / extra).unlink()
    saved_cfg = json.loads((img_dir / "config.json").read_text())
    assert saved_cfg["yes_token_index"] == yes and saved_cfg["no_token_index"] == no, saved_cfg

    from safetensors import safe_open
    from safetensors.torch import save_file
    state = model.state_dict()
    pub = OUT / "image_published"
    pub.mkdir()
    pub_state = {published_name(k): v.detach().clone().contiguous() for k, v in state.items()}
    if "model.language_model.lm_head.weight" not in pub_state:  # tied: the converter writes it
        pub_state["model.language_model.lm_head.weight"] = state["model.model.language_model.embed_tokens.weight"].clone()
    save_file(pub_state, pub / "model.safetensors", metadata={"format": "pt"})
    for p in img_dir.iterdir():
        if p.name != "model.safetensors":
            shutil.copy(p, pub / p.name)
    with safe_open(img_dir / "model.safetensors", "pt") as f:
        saved_names = sorted(f.keys())
    for d in (img_dir, pub):
        m2 = ShieldGemma2ForImageClassification.from_pretrained(d, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        sd2 = m2.state_dict()
        for k, v in state.items():
            assert torch.equal(v, sd2[k]), (d, k)
    print("image/ and image_published/ reload bit-identically; saved names e.g.", saved_names[:3], file=sys.stderr)

    for fname, (w, h, s) in IMAGES.items():
        make_image(w, h, s).save(OUT / fname, optimize=True)
    reloaded = AutoProcessor.from_pretrained(str(img_dir))
    assert type(reloaded).__name__ == "ShieldGemma2Processor"
    assert reloaded.policy_definitions == DEFAULT_SHIELDGEMMA2_POLICIES

    policies = list(DEFAULT_SHIELDGEMMA2_POLICIES) + [IMAGE_CUSTOM_KEY]
    definitions = {**DEFAULT_SHIELDGEMMA2_POLICIES, IMAGE_CUSTOM_KEY: IMAGE_CUSTOM_POLICY}
    image_cases = []
    for fname in IMAGES:
        image = Image.open(OUT / fname)
        kwargs = dict(images=[image], policies=policies, custom_policies={IMAGE_CUSTOM_KEY: IMAGE_CUSTOM_POLICY},
                      return_tensors="pt")
        enc = processor(**kwargs)
        enc2 = reloaded(**kwargs)
        for k in enc:
            assert torch.equal(enc[k], enc2[k]), k
        with torch.no_grad():
            out = model(**enc)
        assert out.probabilities.dtype == torch.float32
        for i, policy in enumerate(policies):
            mask = enc["attention_mask"][i].bool()
            ids = enc["input_ids"][i][mask]
            messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": definitions[policy]}]}]]
            prompt = processor.apply_chat_template(messages, tokenize=False)[0]
            # One prompt at a time (no padding) gives the same P(Yes).
            single = processor(images=[image], policies=[policy],
                               custom_policies={IMAGE_CUSTOM_KEY: IMAGE_CUSTOM_POLICY}, return_tensors="pt")
            assert torch.equal(single["input_ids"][0], ids), policy
            with torch.no_grad():
                p1 = model(**single).probabilities[0, 0].item()
            p = out.probabilities[i, 0].item()
            assert abs(p - p1) < 1e-5, (policy, p, p1)
            assert int((ids == IMAGE).sum()) == MM_TOKENS
            image_cases.append({
                "image": fname, "policy": policy, "policy_text": definitions[policy], "prompt": prompt,
                "expanded_prompt": tok.decode(ids, skip_special_tokens=False),
                "input_ids": ids.tolist(), "p_yes": p,
                "logits_yes_no": out.logits[i].tolist(),
            })
            print(f"{fname} {policy}: {len(ids)} ids, P(Yes) = {p:.6f}", file=sys.stderr)

    # ---------------- Text ShieldGemma (Gemma 2) ----------------
    tmodel = Gemma2ForCausalLM(text_config()).float().eval()
    randomize(tmodel, SEED + 1)
    txt_dir = OUT / "text"
    tmodel.save_pretrained(txt_dir)
    tok.save_pretrained(txt_dir)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (txt_dir / extra).exists():
            (txt_dir / extra).unlink()
    import tokenizers
    raw_tok = tokenizers.Tokenizer.from_file(str(txt_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    text_cases = []
    for inp in TEXT_INPUTS:
        response = inp["response"]
        for key in list(TEXT_POLICIES) + ["custom"]:
            bullet = TEXT_CUSTOM_POLICY if key == "custom" else text_policy(key, response is not None)
            bullet = "* " + bullet
            if response is None:
                prompt = prompt_only(inp["prompt"], bullet)
            else:
                prompt = prompt_response(inp["prompt"], response, bullet)
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            assert ids[0, 0].item() == 2
            assert raw_tok.encode(prompt).ids == ids[0].tolist()
            with torch.no_grad():
                logits = tmodel(ids).logits
            selected = logits[0, -1, [vocab["Yes"], vocab["No"]]]
            p = torch.softmax(selected, dim=0)[0].item()
            text_cases.append({
                "input": inp["name"], "user_prompt": inp["prompt"], "response": response, "policy": key,
                "policy_text": TEXT_CUSTOM_POLICY if key == "custom" else None,
                "prompt": prompt, "input_ids": ids[0].tolist(), "p_yes": p,
                "logits_yes_no": selected.tolist(),
            })
            print(f"text {inp['name']} {key}: {ids.shape[1]} ids, P(Yes) = {p:.6f}", file=sys.stderr)

    ref = {
        "generator": "scripts/make_shield_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "yes_token_id": int(yes),
        "no_token_id": int(no),
        "boi_token_id": BOI, "eoi_token_id": EOI, "image_token_id": IMAGE,
        "mm_tokens_per_image": MM_TOKENS,
        "image_policies": DEFAULT_SHIELDGEMMA2_POLICIES,
        "image_custom_policy": IMAGE_CUSTOM_POLICY,
        "text_policies": {k: {"harm": h, "description": d} for k, (h, d) in TEXT_POLICIES.items()},
        "text_custom_policy": TEXT_CUSTOM_POLICY,
        "image_cases": image_cases,
        "text_cases": text_cases,
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1))
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
