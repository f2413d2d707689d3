"""Checkpoint files as users have them, read lazily, and strict key checking.

Shared by the DiT, VAE and UMT5 loaders. A source is a single weights file (`.safetensors`,
`.pth`/`.pt`/`.bin`/`.ckpt`) or a folder holding one of: a sharded safetensors set with its
`*.safetensors.index.json`, plain `*.safetensors` files, or exactly one torch file, plus an optional
`config.json`. Tensors are read one at a time on access (safetensors through `safe_open`, torch
files memory-mapped), so a 14B checkpoint never sits in host memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CONFIG_NAME = "config.json"
# Containers a training script may wrap a state dict in (`torch.save({"state_dict": sd})`).
_CONTAINER_KEYS = ("state_dict", "model", "module")
# How many keys an error message lists before it says "... and N more".
_LISTED_KEYS = 12


class CheckpointKeyError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where the weights of one model are."""

    files: tuple[Path, ...]
    """Weight files, all read into one state dict (shards of one model)."""
    config: dict[str, Any] | None
    """The folder's config.json, when the source is a folder that has one."""


def resolve_checkpoint(source: str | Path) -> CheckpointSource:
    """Find the weight files (and config.json) of a file or folder source; errors say what was found."""
    path = Path(source).expanduser()
    if path.is_file():
        if not _is_weights_file(path):
            raise ValueError(
                f"{path} is not a weights file; expected *{SAFETENSORS_SUFFIX} or one of {', '.join(TORCH_SUFFIXES)}"
            )
        return CheckpointSource((path,), None)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    config_path = path / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else None
    return CheckpointSource(_weight_files_in(path), config)


def _is_weights_file(path: Path) -> bool:
    return path.suffix == SAFETENSORS_SUFFIX or path.suffix in TORCH_SUFFIXES


def _weight_files_in(folder: Path) -> tuple[Path, ...]:
    indexes = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder} holds several shard indexes ({_names(indexes)}); point at one model")
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{indexes[0]} has no 'weight_map'")
        shards = tuple(folder / name for name in sorted(set(weight_map.values())))
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise FileNotFoundError(f"{indexes[0].name} names shards that are missing: {', '.join(absent)}")
        return shards
    safetensors = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    if safetensors:
        return tuple(safetensors)
    torch_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return (torch_files[0],)
    if torch_files:
        raise ValueError(f"{folder} holds several torch files ({_names(torch_files)}); point at one of them")
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    hint = f"; it has subfolders {', '.join(subfolders)}: point at one of them" if subfolders else ""
    raise FileNotFoundError(f"no weight files in {folder}{hint}")


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(p.name for p in paths)


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class LazyStateDict(Mapping[str, torch.Tensor]):
    """The tensors of one or more weight files, read one at a time on access."""

    def __init__(self, files: Iterable[str | Path]):
        self._safetensors: dict[str, Any] = {}  # key -> open safe_open handle
        self._tensors: dict[str, torch.Tensor] = {}  # key -> mmap-backed tensor from a torch file
        for file in map(Path, files):
            if file.suffix == SAFETENSORS_SUFFIX:
                self._add_safetensors(file)
            else:
                self._add_torch_file(file)

    def _add_safetensors(self, file: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt", device="cpu")
        for key in handle.keys():
            self._claim(key, file)
            self._safetensors[key] = handle

    def _add_torch_file(self, file: Path) -> None:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            data = torch.load(file, map_location="cpu", weights_only=True)
        for key, value in _unwrap_container(data, file).items():
            if isinstance(value, torch.Tensor):
                self._claim(key, file)
                self._tensors[key] = value

    def _claim(self, key: str, file: Path) -> None:
        if key in self._safetensors or key in self._tensors:
            raise ValueError(f"key {key!r} appears in more than one checkpoint file (again in {file.name})")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        return self._safetensors[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data."""
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return tuple(self._safetensors[key].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        yield from self._tensors
        yield from self._safetensors

    def __len__(self) -> int:
        return len(self._tensors) + len(self._safetensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors or key in self._safetensors


def _unwrap_container(data: Any, file: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(data).__name__})")
    if not any(isinstance(v, torch.Tensor) for v in data.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(data.get(key), dict):
                return data[key]
    return data


def open_state_dict(source: str | Path | CheckpointSource) -> LazyStateDict:
    """Lazy state dict of every weight file of `source`."""
    if not isinstance(source, CheckpointSource):
        source = resolve_checkpoint(source)
    return LazyStateDict(source.files)


def format_keys(keys: Iterable[str]) -> str:
    """Sorted keys for an error message, the list cut after a dozen with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = len(keys) - _LISTED_KEYS
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_keys(
    expected: Iterable[str], found: Iterable[str], *, what: str, optional: Iterable[str] = ()
) -> None:
    """Raise CheckpointKeyError listing missing and unexpected keys; `optional` keys may be absent."""
    expected, found = set(expected), set(found)
    missing = expected - found - set(optional)
    unexpected = found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {format_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {format_keys(unexpected)}")
        raise CheckpointKeyError(f"{what} does not match the model: " + "; ".join(parts))


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *, what: str) -> None:
    """Raise CheckpointKeyError listing every key whose shape differs (keys absent from `found` are skipped)."""
    wrong = [
        f"{key}: checkpoint {tuple(found[key])}, model {tuple(shape)}"
        for key, shape in sorted(expected.items())
        if key in found and tuple(found[key]) != tuple(shape)
    ]
    if wrong:
        shown = "; ".join(wrong[:_LISTED_KEYS])
        more = len(wrong) - _LISTED_KEYS
        raise CheckpointKeyError(
            f"{what} has {len(wrong)} tensors of the wrong shape (wrong config?): {shown}"
            + (f"; ... and {more} more" if more > 0 else "")
        )
