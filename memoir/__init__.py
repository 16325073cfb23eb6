"""memoir: MEMOIR lifelong model editing for Hugging Face causal language models.

Example:
    >>> import memoir
    >>> editor = memoir.attach(model, tokenizer)
    >>> editor.edit("The Eiffel Tower is in", "Rome")
    >>> editor.save("memory/"); editor.detach()
    >>> editor = memoir.load(model, tokenizer, "memory/")
"""

from .config import MemoirConfig
from .editor import MemoirEditor, attach, load
from .layer import MemoirLayer
from .registry import EditRecord
from .training import EditResult, NonFiniteEditError

__version__ = "0.1.0"

__all__ = ["EditRecord", "EditResult", "NonFiniteEditError", "MemoirConfig", "MemoirEditor", "MemoirLayer", "attach", "load", "__version__"]
