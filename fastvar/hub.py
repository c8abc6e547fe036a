"""Finding, reading and loading checkpoints: the Hugging Face Hub or local files, safetensors first."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load_file

SUFFIXES = (".safetensors", ".pth")  # in order of preference
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("trainer", "model", "state_dict", "module")
_REMOTE_MISSING = getattr(hub_errors, "RemoteEntryNotFoundError", hub_errors.EntryNotFoundError)


class WeightsUnavailableError(OSError):
    """The checkpoint could be neither downloaded nor found locally."""


def _unavailable(repo_id: str, filename: str, err: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch {filename} from the Hugging Face Hub repo {repo_id} ({type(err).__name__}: {err}); "
        "download it yourself and pass its path (--weights PATH in the CLI)"
    )


def download_file(repo_id: str, filename: str) -> Path:
    """One file of a Hub repo; the hub's own errors propagate."""
    return Path(huggingface_hub.hf_hub_download(repo_id, filename))


def download(repo_id: str, stem: str) -> Path:
    """Download ``stem.safetensors``, or ``stem.pth`` where the repo has no safetensors, from the Hub."""
    for suffix in SUFFIXES:
        try:
            return download_file(repo_id, stem + suffix)
        except _REMOTE_MISSING as err:
            if not isinstance(err, hub_errors.LocalEntryNotFoundError):  # offline: old hubs file it here too
                continue
            raise _unavailable(repo_id, stem + suffix, err) from err
        except (OSError, hub_errors.HfHubHTTPError, ValueError) as err:
            raise _unavailable(repo_id, stem + suffix, err) from err
    raise WeightsUnavailableError(f"the Hub repo {repo_id} has none of {[stem + s for s in SUFFIXES]}")


def locate(path: str | Path, stem: str) -> Path:
    """A checkpoint file, or the preferred ``stem`` file inside a directory."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in SUFFIXES:
            if (path / (stem + suffix)).is_file():
                return path / (stem + suffix)
        raise WeightsUnavailableError(f"{path} holds none of {[stem + s for s in SUFFIXES]}")
    raise WeightsUnavailableError(f"no checkpoint at {path}")


def read_state_dict(path: str | Path, wrapper_keys: Iterable[str] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth`` read with ``weights_only=True``.

    A training checkpoint that nests the weights (``{"trainer": {"var_wo_ddp": {...}}}``) is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"unsupported checkpoint format {path.name!r}: accepted are .safetensors, {TORCH_SUFFIXES}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in wrapper_keys if k in state), None)
        if key is None:
            raise ValueError(f"{path} holds no state dict: top-level keys {list(state)[:10]}")
        state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def fetch_state_dict(repo_id: str, stem: str, local: str | Path | None = None,
                     wrapper_keys: Iterable[str] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """The state dict of checkpoint ``stem``: from ``local`` (file or directory) if given, else the Hub."""
    path = download(repo_id, stem) if local is None else locate(local, stem)
    return read_state_dict(path, wrapper_keys)


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], derived: Iterable[str] = ()
) -> None:
    """Load strictly, except for ``derived`` buffers (constants the module rebuilds) that may be absent.

    Raises ``ValueError`` naming every missing, unexpected and mis-shaped key.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(derived))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if state_dict[k].shape != own[k].shape
    )
    problems = [
        f"{name} keys: {_listing(keys)}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"checkpoint does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=False)


SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # the transformers layout


def fetch_sharded_state_dict(repo_id: str, folder: str, local: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict of a sharded checkpoint (an index JSON naming its shard files, as written
    by transformers): the ``folder`` of a Hub repo, or the local directory ``local``."""

    def fetch(name: str) -> Path:
        return download_file(repo_id, f"{folder}/{name}") if local is None else Path(local) / name

    index = None
    for name in SHARD_INDEXES:
        try:
            path = fetch(name)
        except _REMOTE_MISSING as err:
            if isinstance(err, hub_errors.LocalEntryNotFoundError):
                raise _unavailable(repo_id, f"{folder}/{name}", err) from err
            continue
        except (OSError, hub_errors.HfHubHTTPError, ValueError) as err:
            raise _unavailable(repo_id, f"{folder}/{name}", err) from err
        if path.is_file():
            index = path
            break
    if index is None:
        where = local if local is not None else f"{repo_id}/{folder}"
        raise WeightsUnavailableError(f"{where} holds none of {list(SHARD_INDEXES)}")
    state = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(read_state_dict(fetch(name)))
    return state
