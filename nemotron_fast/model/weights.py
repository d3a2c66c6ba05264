"""Reading safetensors checkpoints (single file or sharded with an index) with strict key and shape checks.

Both our model's loader and the checking twin's use these, so a checkpoint is validated one way everywhere:
shapes are read from the file headers and checked against the model before any tensor is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["checkpoint_files", "read_safetensors", "check_keys", "load_state_dict_strict"]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order when sharded."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard files that do not exist in {root}: {missing}")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")


def read_safetensors(path: str | Path, *, shapes_only: bool = False,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor | torch.Size]:
    """Every tensor of the checkpoint in ``path`` (single file or sharded via ``model.safetensors.index.json``),
    or only their shapes when ``shapes_only``. A key stored twice, or an index entry pointing at a shard without
    that key, raises :class:`CheckpointError`."""
    from safetensors import safe_open

    root = Path(path)
    files = checkpoint_files(root)
    index = root / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index.is_file() else None
    out: dict[str, torch.Tensor | torch.Size] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as handle:
                for key in handle.keys():
                    if key in out:
                        raise CheckpointError(f"tensor '{key}' is stored in more than one shard ({f.name})")
                    if weight_map is not None and weight_map.get(key) != f.name:
                        raise CheckpointError(f"tensor '{key}' in {f.name} is not mapped to that file by "
                                              f"{index.name} (maps to {weight_map.get(key)!r})")
                    if shapes_only:
                        out[key] = torch.Size(handle.get_slice(key).get_shape())
                    else:
                        out[key] = handle.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {f}: {exc}") from exc
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(out))
        if absent:
            raise CheckpointError(f"{index.name} lists tensors missing from their shards: {_short(absent)}")
    return out


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})"
                       for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_short(misshaped)}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def load_state_dict_strict(module: torch.nn.Module, path: str | Path, *, device: torch.device | str,
                           dtype: torch.dtype) -> None:
    """Assign the checkpoint's tensors to ``module``'s parameters (cast to ``dtype``, on ``device``).

    Every missing, unexpected or mis-shaped tensor is named in one :class:`CheckpointError`, before any tensor
    data is read.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_keys(expected, read_safetensors(path, shapes_only=True))  # type: ignore[arg-type]
    tensors = read_safetensors(path, device=device)
    bad = sorted(k for k, t in tensors.items() if not t.is_floating_point())  # type: ignore[union-attr]
    if bad:
        raise CheckpointError(f"tensors that are not floating point: {_short(bad)}")
    module.load_state_dict({k: t.to(dtype) for k, t in tensors.items()}, strict=True, assign=True)
