"""Reading safetensors checkpoints (single file or sharded with an index) with strict key and shape checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["checkpoint_files", "iter_tensors", "load_state_dict_strict"]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order when sharded."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")


def iter_tensors(path: str | Path, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every tensor in the checkpoint, loaded onto ``device``."""
    from safetensors import SafetensorError, safe_open

    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for key in sf.keys():
                    yield key, sf.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {f.name}: {exc}") from exc


def load_state_dict_strict(module: torch.nn.Module, path: str | Path, *, device: torch.device | str,
                           dtype: torch.dtype) -> None:
    """Assign the checkpoint's tensors to ``module``'s parameters (cast to ``dtype``, on ``device``).

    Every missing, unexpected or mis-shaped tensor is named in one :class:`CheckpointError`.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    for key, t in iter_tensors(path, device):
        if key not in expected:
            unexpected.append(key)
        elif tuple(t.shape) != expected[key]:
            misshaped.append(f"{key}: checkpoint {tuple(t.shape)} vs model {expected[key]}")
        elif not t.is_floating_point():
            misshaped.append(f"{key}: dtype {t.dtype} is not floating point")
        else:
            loaded[key] = t.to(dtype)
    missing = sorted(set(expected) - set(loaded) - {m.split(':')[0] for m in misshaped})
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config - " + " | ".join(problems))
    module.load_state_dict(loaded, strict=True, assign=True)
