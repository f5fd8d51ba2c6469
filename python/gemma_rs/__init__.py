"""gemma_rs: run Gemma models locally on the CPU with the gemma-rs engine.

>>> import gemma_rs
>>> model = gemma_rs.Model()              # the default model, fetched and cached on first use
>>> model.generate("The sky is blue because", max_tokens=32, temperature=0)
>>> model.chat([{"role": "user", "content": "Say hi."}])
>>> for piece in model.stream("Once upon a time", max_tokens=64):
...     print(piece, end="", flush=True)
"""

from ._gemma_rs import (
    DEFAULT_MODEL_FILE,
    GemmaError,
    Model,
    TextStream,
    cache_dir,
    default_model_path,
)

__all__ = [
    "DEFAULT_MODEL_FILE",
    "GemmaError",
    "Model",
    "TextStream",
    "cache_dir",
    "default_model_path",
]
