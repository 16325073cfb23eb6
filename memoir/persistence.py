"""Save and load a MEMOIR memory: ``memoir_config.json`` + ``memoir_memory.safetensors``.

Only the add-on state is written (W_m, permutation, mask bank, mu) with a fingerprint of the base
layer, so loading onto another model fails loudly. Nothing is unpickled. Loading validates the
whole file before touching the model; a failure leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["save_editor", "load", "restore_into", "read_metadata", "read_registry", "write_registry",
           "atomic_write_text", "layer_fingerprint", "MEMORY_FILE", "CONFIG_FILE", "MEMORY_FORMAT_VERSION"]

CONFIG_FILE = "memoir_config.json"
MEMORY_FILE = "memoir_memory.safetensors"
# 2: the header holds the edit registry ("edit_registry"); version 1 files still load (no records).
MEMORY_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_REGISTRY_KEY = "edit_registry"


def layer_fingerprint(module: nn.Module) -> str:
    """SHA-256 of the base layer's weight (and bias): shape, dtype and bytes."""
    digest = hashlib.sha256()
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_editor(editor, path, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the editor's memory to directory ``path`` (created if needed), atomically per file.

    ``extra_metadata`` (str to str) is stored in the memory file's header, in the same atomic write
    as the tensors (checkpoints keep their progress there).
    """
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    layer = editor.layer
    tensors = {
        "memory": layer.memory.detach().cpu().contiguous(),
        "permutation": layer.permutation.cpu().contiguous(),
        "bank_bits": layer.bank_bits.cpu().contiguous(),
        "background_mean": layer.background_mean.cpu().contiguous(),
    }
    metadata = {
        "format_version": str(MEMORY_FORMAT_VERSION),
        "fingerprint": layer_fingerprint(layer.base_layer),
        "target_module": editor.config.target_module,
        "has_background": json.dumps(layer.has_background),
        "context_prefixes": json.dumps(editor.context_prefixes),
        "num_edits": str(editor.num_edits),
        _REGISTRY_KEY: editor.registry.to_json(),
        **(extra_metadata or {}),
    }
    # The config first: the memory file is the last thing written, so its presence means complete.
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(editor.config.to_json() + "\n"))
    _atomic_write(directory / MEMORY_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically: a reader sees the old file or the new one."""
    _atomic_write(Path(final), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic_write(final: Path, write) -> None:
    # A process killed mid-write leaves its temporary file behind: the next write removes it
    # (one writer per memory directory is the supported use).
    for stale in final.parent.glob(f".{final.name}.*"):
        stale.unlink(missing_ok=True)
    handle, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
    os.close(handle)
    try:
        write(tmp)
        # mkstemp creates 0600 files; a saved memory gets the permissions of any file the user writes.
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _new_file_mode() -> int:
    """Permissions ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _read(path: Path):
    from safetensors import safe_open

    from .config import MemoirConfig

    config_path, memory_path = path / CONFIG_FILE, path / MEMORY_FILE
    for file in (config_path, memory_path):
        if not file.is_file():
            raise FileNotFoundError(f"no MEMOIR memory at {path}: {file.name} is missing")
    try:
        config = MemoirConfig.load(config_path)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path} is not a valid MEMOIR config: {error}") from error
    try:
        with safe_open(str(memory_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a corrupted header/body
        raise ValueError(f"{memory_path} is corrupted or not a safetensors file: {error}") from error
    return config, metadata, tensors


def _validate(config, metadata: dict, tensors: dict, layer) -> None:
    missing = {"memory", "permutation", "bank_bits", "background_mean"} - set(tensors)
    if missing:
        raise ValueError(f"the memory file lacks tensors {sorted(missing)}")
    version = int(metadata.get("format_version", "0"))
    if version not in _READABLE_VERSIONS:
        raise ValueError(f"memory format version {version} is not supported (this version reads "
                         f"{', '.join(map(str, _READABLE_VERSIONS))})")
    _registry_of(metadata, tensors["bank_bits"].shape[0])  # raises for a malformed registry
    if metadata.get("target_module") != config.target_module:
        raise ValueError("memory file and config disagree on the target module")
    expected = layer_fingerprint(layer.base_layer)
    if metadata.get("fingerprint") != expected:
        raise ValueError(
            f"this memory was saved for a different base layer at {config.target_module} "
            "(fingerprint mismatch): load it onto the model it was made with"
        )
    shapes = {
        "memory": tuple(layer.memory.shape),
        "permutation": tuple(layer.permutation.shape),
        "background_mean": tuple(layer.background_mean.shape),
    }
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    bank = tensors["bank_bits"]
    if bank.dtype != torch.int64 or bank.dim() != 2 or bank.shape[1] != layer.bank_bits.shape[1]:
        raise ValueError(f"bank_bits must be int64 [N, {layer.bank_bits.shape[1]}], got {bank.dtype} {tuple(bank.shape)}")
    perm = tensors["permutation"]
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.shape[0])):
        raise ValueError("the stored permutation is not a permutation")


def read_metadata(path) -> dict[str, str]:
    """The header metadata of the memory saved at ``path`` (no tensor is read)."""
    from safetensors import safe_open

    memory_path = Path(path) / MEMORY_FILE
    try:
        with safe_open(str(memory_path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for a corrupted header
        raise ValueError(f"{memory_path} is corrupted or not a safetensors file: {error}") from error


def restore_into(editor, path) -> None:
    """Replace ``editor``'s memory with the one saved at ``path`` (same model, same settings).

    Used to resume an interrupted stream of edits. Raises before changing anything when the
    file is missing, corrupted, made for another base layer or with other settings.
    """
    config, metadata, tensors = _read(Path(path))
    mine, theirs = editor.config.to_dict(), config.to_dict()
    differing = sorted(key for key in mine if mine[key] != theirs.get(key))
    if differing:
        raise ValueError(f"the memory at {path} was made with other settings ({', '.join(differing)}); "
                         "attach with the same MemoirConfig to resume from it")
    _validate(config, metadata, tensors, editor.layer)
    _restore(editor, metadata, tensors)


def load(model: nn.Module, tokenizer, path):
    """Attach the memory saved at ``path`` to ``model`` and return its editor.

    Raises ``FileNotFoundError`` / ``ValueError`` (wrong model, corrupted file) before changing the
    model: on any failure the model is left as it was.

    Example:
        >>> editor = memoir.load(model, tokenizer, "my_memory/")
    """
    from .editor import MemoirEditor

    path = Path(path)
    config, metadata, tensors = _read(path)
    editor = MemoirEditor(model, tokenizer, config)
    try:
        _validate(config, metadata, tensors, editor.layer)
        _restore(editor, metadata, tensors)
    except BaseException:
        editor.detach()
        raise
    return editor


@torch.no_grad()
def _restore(editor, metadata: dict, tensors: dict) -> None:
    layer = editor.layer
    layer.memory.copy_(tensors["memory"].to(layer.memory))
    layer.permutation = tensors["permutation"].to(layer.permutation.device)
    layer.bank_bits = tensors["bank_bits"].to(layer.bank_bits.device)
    layer.background_mean = tensors["background_mean"].to(layer.background_mean)
    layer.has_background = bool(json.loads(metadata.get("has_background", "false")))
    prefixes = json.loads(metadata.get("context_prefixes", "null"))
    editor.context_prefixes = list(prefixes) if prefixes is not None else None
    editor.num_edits = int(metadata.get("num_edits", "0"))
    editor.registry = _registry_of(metadata, layer.bank_bits.shape[0])
    if _REGISTRY_KEY not in metadata and editor.num_edits:
        warnings.warn(f"MEMOIR: this memory was saved before the edit registry: its {editor.num_edits} edits "
                      "are not listed (they keep routing; they cannot be withdrawn or rehearsed)", stacklevel=3)
    editor.sync_routing()


def _registry_of(metadata: dict, num_rows: int):
    """The edit registry stored in ``metadata``; a file without one gives an empty registry whose
    ``unrecorded`` count is the file's number of edits."""
    from .registry import EditRegistry

    text = metadata.get(_REGISTRY_KEY)
    if text is None:
        return EditRegistry(unrecorded=int(metadata.get("num_edits", "0")))
    registry = EditRegistry.from_json(text)
    bad = [r.index for r in registry if r.mask_row >= num_rows]
    if bad:
        raise ValueError(f"edit records {bad[:5]} point at mask rows beyond the bank's {num_rows}")
    return registry


def read_registry(path):
    """The edit registry of the memory saved at ``path`` (no model needed)."""
    from safetensors import safe_open

    memory_path = Path(path) / MEMORY_FILE
    metadata = read_metadata(path)
    with safe_open(str(memory_path), framework="pt") as handle:
        num_rows = handle.get_slice("bank_bits").get_shape()[0]
    return _registry_of(metadata, num_rows)


def write_registry(path, registry) -> None:
    """Replace the edit registry of the memory saved at ``path`` in one atomic rewrite of its file
    (tensors and every other header entry unchanged)."""
    from safetensors.torch import save_file

    config, metadata, tensors = _read(Path(path))
    _registry_of(metadata, tensors["bank_bits"].shape[0])
    if _REGISTRY_KEY not in metadata and int(metadata.get("num_edits", "0")):
        raise ValueError(f"the memory at {path} was saved before the edit registry: its edits are not listed")
    metadata = {**metadata, _REGISTRY_KEY: registry.to_json(), "format_version": str(MEMORY_FORMAT_VERSION)}
    _atomic_write(Path(path) / MEMORY_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
