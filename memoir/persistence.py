"""Save and load a MEMOIR memory: ``memoir_memory.safetensors`` (+ ``memoir_config.json``, a copy).

Only the add-on state is written: W_m, the permutation, the mask bank and mu as tensors; the
config, the edit registry, the context prefixes and the fingerprints in the file's header. The
memory file is written in one atomic replace and is complete on its own (format version 2): the
config travels inside it, and ``memoir_config.json`` is a readable copy written after it.

Loading verifies before it touches the model, and a failure leaves the model as it was:

* a SHA-256 checksum over every tensor's bytes and every header entry;
* structure: the expected tensors, dtypes and shapes; finite W_m and mu; an int64 permutation of
  0..D-1; every bank row exactly ``top_k`` bits, no padding bits, no duplicate rows; a registry
  whose counts agree with the bank and the number of edits;
* the fingerprint (see :func:`model_fingerprint`): the memory was made with this model;
* ``memoir_config.json``, when present, equal to the config inside the memory file (a save cut
  between the two writes, or a hand edit, is refused rather than loaded as if whole).

Version 1 files (before the registry and the checksum) still load, with the structural checks.
Nothing is unpickled.
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

__all__ = ["save_editor", "read_memory", "attach_memory", "restore_into", "read_metadata", "read_registry", "write_registry",
           "atomic_write_text", "layer_fingerprint", "model_fingerprint", "MEMORY_FILE", "CONFIG_FILE",
           "MEMORY_FORMAT_VERSION"]

CONFIG_FILE = "memoir_config.json"
MEMORY_FILE = "memoir_memory.safetensors"
# 2: the header holds the config, the edit registry, a model fingerprint and a checksum.
MEMORY_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_REGISTRY_KEY = "edit_registry"
_TENSORS = ("memory", "permutation", "bank_bits", "background_mean")
_SAMPLES_PER_TENSOR = 16


def layer_fingerprint(module: nn.Module) -> str:
    """SHA-256 of the base layer's weight (and bias): shape, dtype and every byte."""
    digest = hashlib.sha256()
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, shape and dtype and of 16 evenly spaced values of each.

    Cheap at any size (a few hundred small gathers) and it tells apart another architecture,
    another size, another dtype and, in practice, any fine-tune or re-quantisation (each changes
    the sampled values). An attached memory does not count: its own W_m is skipped and the wrapped
    module's parameters keep their original names, so the value is the same attached or not.
    """
    from .layer import MemoirLayer

    skipped = {id(m.memory) for m in model.modules() if isinstance(m, MemoirLayer)}
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if id(param) in skipped:
            continue
        flat = param.detach().reshape(-1)
        sample = flat[sample_positions(flat.numel()).to(flat.device)].to("cpu").contiguous()
        digest.update(f"{name.replace('.base_layer.', '.')}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sample_positions(size: int, count: int = _SAMPLES_PER_TENSOR) -> torch.Tensor:
    """``count`` evenly spaced indices of ``0..size-1``, first and last included (int64 arithmetic:
    a float linspace rounds past the end for tensors of tens of millions of elements)."""
    count = min(count, size)
    if count <= 1:
        return torch.zeros(count, dtype=torch.int64)
    return torch.arange(count, dtype=torch.int64) * (size - 1) // (count - 1)


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the header entries (but the checksum itself) and every tensor's name, dtype,
    shape and bytes."""
    digest = hashlib.sha256()
    entries = sorted((k, v) for k, v in metadata.items() if k != "checksum")
    digest.update(json.dumps(entries, ensure_ascii=False).encode("utf-8"))
    for name in sorted(tensors):
        data = tensors[name].contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _write_memory_file(directory: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    metadata = {**metadata, "checksum": _checksum(metadata, tensors)}
    _atomic_write(directory / MEMORY_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_editor(editor, path, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the editor's memory to directory ``path`` (created if needed).

    The memory file is one atomic write holding everything (tensors, config, registry, prefixes,
    fingerprints, ``extra_metadata`` such as a checkpoint's progress, and their checksum); the
    config copy ``memoir_config.json`` follows it.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    layer = editor.layer
    tensors = {
        "memory": layer.memory.detach().cpu().contiguous(),
        "permutation": layer.permutation.cpu().contiguous(),
        "bank_bits": layer.bank_bits.cpu().contiguous(),
        "background_mean": layer.background_mean.cpu().contiguous(),
    }
    config_json = editor.config.to_json()
    metadata = {
        "format_version": str(MEMORY_FORMAT_VERSION),
        "config": config_json,
        "fingerprint": layer_fingerprint(layer.base_layer),
        "model_fingerprint": model_fingerprint(editor.model),
        "target_module": editor.config.target_module,
        "has_background": json.dumps(layer.has_background),
        "context_prefixes": json.dumps(editor.context_prefixes),
        "num_edits": str(editor.num_edits),
        _REGISTRY_KEY: editor.registry.to_json(),
        **(extra_metadata or {}),
    }
    _write_memory_file(directory, tensors, metadata)
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_json + "\n", encoding="utf-8"))


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
    """``(config, metadata, tensors)`` of the memory at ``path``, checksum and config copy verified."""
    from safetensors import safe_open

    config_path, memory_path = path / CONFIG_FILE, path / MEMORY_FILE
    if not memory_path.is_file():
        raise FileNotFoundError(f"no MEMOIR memory at {path}: {MEMORY_FILE} is missing")
    try:
        with safe_open(str(memory_path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a corrupted header/body
        raise ValueError(f"{memory_path} is corrupted or not a safetensors file: {error}") from error
    version = _format_version(metadata, memory_path)
    if version >= 2:
        if metadata.get("checksum") != _checksum(metadata, tensors):
            raise ValueError(f"{memory_path} is corrupted: its checksum does not match its contents")
        config = _parse_config(metadata.get("config"), f"the config inside {memory_path}")
        if config_path.is_file():
            _check_config_copy(config, config_path)
    else:  # version 1: the config lives only in memoir_config.json
        if not config_path.is_file():
            raise FileNotFoundError(f"no MEMOIR memory at {path}: {CONFIG_FILE} is missing")
        config = _parse_config(_read_text(config_path), str(config_path))
    return config, metadata, tensors


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as text: {error}") from error


def _format_version(metadata: dict, where) -> int:
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError as error:
        raise ValueError(f"{where}: format_version is not a number") from error
    if version not in _READABLE_VERSIONS:
        raise ValueError(f"{where}: memory format version {version} is not supported (this version reads "
                         f"{', '.join(map(str, _READABLE_VERSIONS))}; a newer memoir wrote it?)")
    return version


def _parse_config(text, where: str):
    from .config import CONFIG_FORMAT_VERSION, MemoirConfig

    try:
        data = json.loads(text) if isinstance(text, str) else None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > CONFIG_FORMAT_VERSION:
            raise ValueError(f"config version {version!r} is newer than this memoir's {CONFIG_FORMAT_VERSION}")
        # Settings added after a memory was written were off when it was made: the faithful recipe.
        data = {"rehearse": 0, "answer_end": "none", **data}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown key is a file from elsewhere: refuse it here
            return MemoirConfig.from_dict(data)
    except (ValueError, TypeError, UserWarning) as error:
        raise ValueError(f"{where} is not a valid MEMOIR config: {error}") from error


def _check_config_copy(config, config_path: Path) -> None:
    copy = _parse_config(_read_text(config_path), str(config_path))
    mine, theirs = config.to_dict(), copy.to_dict()
    differing = sorted(key for key in mine if mine[key] != theirs.get(key))
    if differing:
        raise ValueError(f"{config_path} differs from the config inside {MEMORY_FILE} ({', '.join(differing)}): "
                         "a save was interrupted, or the copy was edited by hand. The memory file is the "
                         f"authority: delete {CONFIG_FILE} to load it as saved")


def _validate(config, metadata: dict, tensors: dict, layer, model: nn.Module | None = None) -> None:
    """Structural checks of a read memory against ``layer`` (and, for version 2, ``model``)."""
    version = _format_version(metadata, "the memory file")
    present = set(tensors)
    if present != set(_TENSORS):
        raise ValueError(f"the memory file holds tensors {sorted(present)}, expected {sorted(_TENSORS)}")
    if metadata.get("target_module") != config.target_module:
        raise ValueError("memory file and config disagree on the target module")
    if metadata.get("fingerprint") != layer_fingerprint(layer.base_layer):
        raise ValueError(f"this memory was saved for a different base layer at {config.target_module} "
                         "(fingerprint mismatch): load it onto the model it was made with")
    if version >= 2 and model is not None and metadata.get("model_fingerprint") != model_fingerprint(model):
        raise ValueError("this memory was saved for another model (the model fingerprint differs: other weights, "
                         "dtype or architecture): load it onto the model it was made with, or replay its edits "
                         "(python -m memoir edits DIR --export FILE, then edit_many(FILE))")
    _check_tensors(config, tensors, layer)
    _check_header(metadata, tensors["bank_bits"].shape[0], version)


def _check_tensors(config, tensors: dict, layer) -> None:
    from memoir_kernels import num_words

    expected = {  # name: (dtype, shape)
        "memory": (layer.memory.dtype, tuple(layer.memory.shape)),
        "permutation": (torch.int64, (layer.in_features,)),
        "background_mean": (layer.background_mean.dtype, tuple(layer.background_mean.shape)),
    }
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
    for name in ("memory", "background_mean"):
        if not bool(torch.isfinite(tensors[name]).all()):
            raise ValueError(f"tensor {name} holds NaN or infinite values")
    perm = tensors["permutation"]
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.shape[0])):
        raise ValueError("the stored permutation is not a permutation of 0..D-1")
    bank, words = tensors["bank_bits"], num_words(layer.in_features)
    if bank.dtype != torch.int64 or bank.dim() != 2 or bank.shape[1] != words:
        raise ValueError(f"bank_bits must be int64 [N, {words}], got {bank.dtype} {tuple(bank.shape)}")
    _check_bank(bank, layer.in_features, config.top_k)


def _check_bank(bank: torch.Tensor, dim: int, top_k: int) -> None:
    from memoir_kernels._bits import popcount_bytes

    if not bank.shape[0]:
        return
    spare = bank.shape[1] * 64 - dim
    if spare:
        keep = (1 << (64 - spare)) - 1  # the last word's valid bits; the others are padding
        if bool((bank[:, -1] & ~torch.tensor(keep, dtype=torch.int64)).any()):
            raise ValueError("bank_bits has set padding bits beyond D")
    counts = popcount_bytes(bank)  # [N] set bits per row
    wrong = (counts != top_k).nonzero().flatten()
    if wrong.numel():
        raise ValueError(f"bank rows {wrong[:5].tolist()} do not have exactly top_k = {top_k} bits "
                         "(the config and the stored masks disagree, or the bank is corrupted)")
    if torch.unique(bank, dim=0).shape[0] != bank.shape[0]:
        raise ValueError("bank_bits holds duplicate rows")


def _check_header(metadata: dict, num_rows: int, version: int) -> None:
    try:
        has_background = json.loads(metadata.get("has_background", "false"))
        prefixes = json.loads(metadata.get("context_prefixes", "null"))
        num_edits = int(metadata.get("num_edits", "0"))
    except ValueError as error:
        raise ValueError(f"the memory file's header is malformed: {error}") from error
    if not isinstance(has_background, bool):
        raise ValueError("has_background must be true or false")
    if prefixes is not None and not (isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)):
        raise ValueError("context_prefixes must be a list of strings")
    registry = _registry_of(metadata, num_rows)
    if num_edits < 0 or (version >= 2 and (len(registry) + registry.unrecorded != num_edits or num_rows > num_edits)):
        raise ValueError(f"the counts disagree: {num_edits} edits, {len(registry)} records "
                         f"(+{registry.unrecorded} unrecorded), {num_rows} bank rows")


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
    _validate(config, metadata, tensors, editor.layer, editor.model)
    _restore(editor, metadata, tensors)


def read_memory(path):
    """``(config, metadata, tensors)`` of the memory saved at ``path``, read and checksum-verified
    (the structure is checked against a layer by :func:`attach_memory`)."""
    return _read(Path(path))


def attach_memory(editor, metadata: dict, tensors: dict) -> None:
    """Check a read memory against ``editor``'s layer and model, then put it into the editor.

    Raises before changing anything when a check fails (see the module docstring).
    """
    _validate(editor.config, metadata, tensors, editor.layer, editor.model)
    _restore(editor, metadata, tensors)


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
    _, metadata, tensors = _read(Path(path))
    if "bank_bits" not in tensors:
        raise ValueError(f"{Path(path) / MEMORY_FILE} holds no bank_bits tensor")
    return _registry_of(metadata, tensors["bank_bits"].shape[0])


def write_registry(path, registry) -> None:
    """Replace the edit registry of the memory saved at ``path`` in one atomic rewrite of its file
    (tensors and every other header entry unchanged)."""
    config, metadata, tensors = _read(Path(path))
    if int(metadata.get("format_version", "0")) < 2:
        raise ValueError(f"the memory at {path} was saved before the edit registry: load it and save it again "
                         "to update its format")
    _check_header({**metadata, _REGISTRY_KEY: registry.to_json()}, tensors["bank_bits"].shape[0], 2)
    _write_memory_file(Path(path), tensors, {**metadata, _REGISTRY_KEY: registry.to_json()})
