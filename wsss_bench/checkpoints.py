"""Classifier checkpoints: our own format, and PSA / SC-CAM state dicts as released.

Our format is a dict ``{"format": FORMAT, "state_dict": ..., "meta": {...}}`` saved with
``torch.save``.  External files are plain state dicts whose backbone keys sit at the top level
(``conv1a.weight``, ``b2.bn_branch2a.weight``...) and whose heads are named ``fc8`` (PSA),
``fc8_20`` and ``fc8_200`` (SC-CAM).  The mapping is one documented rule:

* ``fc8`` and ``fc8_20`` → ``heads.parent``; ``fc8_200`` → ``heads.sub``;
* a leading ``module.`` (DataParallel) is dropped;
* every other key → ``backbone.<key>``.

Everything is loaded with ``weights_only=True``: no file is unpickled as arbitrary objects.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import io
from .errors import WeightsError

FORMAT = "wsss_bench.classifier/1"
EXTERNAL_HEADS = {"fc8": "heads.parent", "fc8_20": "heads.parent", "fc8_200": "heads.sub"}
# BatchNorm counters exist in state dicts of PyTorch >= 0.4 but carry no weights; files written by
# older code lack them.  They are never required and never reported as missing.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file safely; return ``{"state_dict": ..., "meta": ...}``."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory; give the checkpoint file inside it (e.g. {path}/round0.pth)")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise WeightsError(f"{path}: {describe_load_error(exc)}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state, meta = obj.get("state_dict"), obj.get("meta") or {}
        expected = meta.get("sha256")
        if expected and _digest(state) != expected:
            raise WeightsError(f"{path}: checkpoint content does not match its recorded checksum (corrupted)")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], {}
    else:
        state, meta = obj, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {"state_dict": state, "meta": meta}


def describe_load_error(exc: Exception) -> str:
    """One line for a failed ``torch.load``; a refused pickled object is named, never loaded."""
    import re

    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused is not None:
        return (f"contains a pickled object of class {refused.group(1)}, which is refused: "
                "checkpoints are loaded with weights_only=True and never unpickle code")
    if "Unsupported operand" in text or "invalid load key" in text:
        return "not a PyTorch checkpoint (unrecognised bytes)"
    if "central directory" in text or "corrupted" in text:
        return "truncated or corrupted PyTorch checkpoint (incomplete zip archive)"
    if "Weights only load failed" in text:
        return "contains pickled objects other than tensors, which are refused (weights_only=True)"
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    if "weights_only" in text or "hasRecord" in text:
        # torch's own text may advise `weights_only=False`: never steer a user towards running a
        # file's code.  hasRecord("version"): a zip archive that is not a torch file.
        return "not a PyTorch checkpoint (unrecognised content)"
    return f"not a readable PyTorch checkpoint ({first[:200]})"


def to_internal_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a PSA/SC-CAM state dict onto :class:`~wsss_bench.engine.model.Classifier` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(("backbone.", "heads.")):
            out[key] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{EXTERNAL_HEADS[head]}.{rest}" if head in EXTERNAL_HEADS else f"backbone.{key}"] = value
    return out


def head_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Output sizes of the heads present in a (mapped) state dict."""
    internal = to_internal_keys(state)
    return {key.split(".")[1]: int(v.shape[0]) for key, v in internal.items()
            if key.startswith("heads.") and key.endswith(".weight")}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str,
              allow_missing_heads: bool = False) -> dict[str, list[str]]:
    """Load ``state`` strictly into ``model``; return what was skipped and why.

    Missing or unexpected keys and shape mismatches raise :class:`WeightsError` naming them,
    except BatchNorm counters and, with ``allow_missing_heads``, absent heads (freshly
    initialised).
    """
    internal = to_internal_keys(state)
    own = model.state_dict()
    optional = [k for k in own if k.endswith(OPTIONAL_SUFFIXES)]
    missing = [k for k in own if k not in internal and k not in optional]
    if allow_missing_heads:
        missing = [k for k in missing if not k.startswith("heads.")]
    unexpected = [k for k in internal if k not in own and not k.endswith(OPTIONAL_SUFFIXES)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"{source}: checkpoint does not fit the model: {'; '.join(parts)}")
    for key, value in internal.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(f"{source}: shape of {key} is {tuple(value.shape)} in the file but "
                               f"{tuple(own[key].shape)} in the model (wrong backbone width or classes?)")
    loadable = {k: v for k, v in internal.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    skipped_heads = [k for k in own if k.startswith("heads.") and k not in internal]
    return {"loaded": sorted(loadable), "initialised": skipped_heads}


def _digest(state: Optional[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for key in sorted(state or {}):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """Content hash of a model's weights (identifies it as a stage input)."""
    return _digest(model.state_dict())


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Atomically save ``model``'s weights with metadata and a content checksum."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "state_dict": state, "meta": {**meta, "sha256": _digest(state)}}
    io.write_torch(Path(path), payload)
