"""Getting official checkpoints into models: local files, the Hugging Face cache or the Hub, safetensors
first, each tensor straight into its final dtype and device.

Models are built with ``parameters_on_meta()`` (no memory, no initialisation) and filled by
``load_checkpoint``, so loading needs about one copy of the weights in host memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

SUFFIXES = (".safetensors", ".pth")  # in order of preference
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # the transformers layout
WRAPPER_KEYS = ("trainer", "model", "state_dict", "module")


class WeightsUnavailableError(OSError):
    """A checkpoint is neither where the user pointed, nor in the Hugging Face cache, nor on a reachable Hub."""


# ----------------------------------------------------------------------------- the Hub


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be used now, or None. ``HF_HUB_OFFLINE`` is honoured; otherwise one TCP connection
    with a one-second timeout decides, rather than the Hub client's retries (about 25 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return _probe(urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co")


@functools.cache
def _probe(host: str) -> str | None:
    try:
        socket.create_connection((host, 443), timeout=1.0).close()
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None


def cached_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of a Hub repo if the Hugging Face cache holds it."""
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=True))
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError):
        return None


def hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of a Hub repo, from the cache or else downloaded; None when the repo has no such file.

    Raises ``WeightsUnavailableError`` when it is not cached and the Hub cannot be reached.
    """
    cached = cached_file(repo_id, filename)
    if cached is not None:
        return cached
    reason = hub_unreachable_reason()
    if reason is not None:
        raise WeightsUnavailableError(reason)
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename))
    except hub_errors.EntryNotFoundError as err:  # the file is not in the repo
        if isinstance(err, hub_errors.LocalEntryNotFoundError):  # the connection dropped
            raise WeightsUnavailableError(f"the download failed ({err})") from err
        return None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as err:
        raise WeightsUnavailableError(f"the download failed ({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------- finding a checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """One file of an official release, and the keyword that points fastvar at a local copy.

    ``name`` is a file stem (``var_d16``: ``var_d16.safetensors`` or ``var_d16.pth``), a file name
    (``llm/config.json``), or, ending in ``/``, a folder of shards with a transformers-style index
    (``infinity_8b_weights/``); ``alternatives`` are other names the release may use for it.
    """

    repo_id: str
    name: str
    parameter: str  # the from_pretrained keyword; the CLI flag is the same with dashes
    alternatives: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.parameter.replace("_", "-")

    @property
    def sharded(self) -> bool:
        return self.name.endswith("/")

    @property
    def files(self) -> list[str]:
        """The file names fastvar looks for, in order of preference."""
        if self.sharded:
            names = [self.name + index for index in SHARD_INDEXES]
        elif Path(self.name).suffix in (".json", ".safetensors", *TORCH_SUFFIXES):
            names = [self.name]
        else:
            names = [self.name + suffix for suffix in SUFFIXES]
        return names + list(self.alternatives)

    def find(self, given: str | Path | None = None, search: Iterable[str | Path | None] = ()) -> Path:
        """The file (for shards: the index): ``given`` (the file, or a folder holding it, also as the folder of
        the release it sits in) when the user gave one; else the first ``search`` folder holding it; else the
        Hugging Face cache or the Hub."""
        if given is not None:
            given = Path(given)
            if given.is_file():
                return given
            if not given.is_dir():
                raise WeightsUnavailableError(f"{self.parameter}={given}: no such file or folder")
            found = self.in_folder(given, explicit=True)
            if found is None:
                names = self.names_in(explicit=True)
                raise WeightsUnavailableError(f"{given} ({self.parameter}) holds none of {names}")
            return found
        folders = [Path(p) for p in search if p is not None]
        for folder in folders:
            found = self.in_folder(folder)
            if found is not None:
                return found
        try:
            found = self._from_hub()
        except WeightsUnavailableError as err:
            where = "".join(f"{f}, " for f in folders)
            raise WeightsUnavailableError(
                f"{self.name} ({' or '.join(self.files)}) is not in {where}the Hugging Face cache, and {err}; "
                f"download it from https://huggingface.co/{self.repo_id} and pass {self.parameter}=PATH "
                f"(CLI: {self.flag} PATH)") from None
        if found is None:
            raise WeightsUnavailableError(f"the Hub repo {self.repo_id} has none of {self.files}")
        return found

    def in_folder(self, folder: Path, explicit: bool = False) -> Path | None:
        """The file inside ``folder`` laid out as the release, if it is there. A folder the user points at
        may also be the release's subfolder itself (the shard folder, HART's ``llm/``)."""
        return next((folder / name for name in self.names_in(explicit) if (folder / name).is_file()), None)

    def names_in(self, explicit: bool) -> list[str]:
        """The names looked for in a folder: as laid out in the release, and in a folder the user points at
        (``explicit``) also bare, that folder being the file's own."""
        bare = [Path(n).name for n in self.files if Path(n).name != n] if explicit else []
        return self.files + bare

    def _from_hub(self) -> Path | None:
        found = next((p for name in self.files if (p := cached_file(self.repo_id, name)) is not None), None)
        if found is None:
            found = next((p for name in self.files if (p := hub_file(self.repo_id, name)) is not None), None)
        if found is not None and self.sharded:  # the shards land beside their index
            for shard in sorted(set(json.loads(found.read_text())["weight_map"].values())):
                if hub_file(self.repo_id, self.name + shard) is None:
                    raise WeightsUnavailableError(f"the Hub repo {self.repo_id} lacks the shard {self.name + shard}")
        return found


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path, wrapper_keys: Sequence[str] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, a ``.pth`` (read with ``weights_only=True``) or a shard index,
    memory-mapped: nothing is read into memory until a tensor is used.

    A training checkpoint that nests the weights (``{"trainer": {"var_wo_ddp": {...}}}``) is unwrapped along
    ``wrapper_keys``. Raises ``ValueError`` for files that are not checkpoints or hold pickled code.
    """
    path = Path(path)
    if path.name in SHARD_INDEXES:
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_state_dict(path.parent / shard, wrapper_keys).items()}
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"unsupported checkpoint format {path.name!r}: accepted are .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)} and shard indexes {SHARD_INDEXES}")
    state = _torch_load(path)
    while isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in wrapper_keys if k in state), None)
        if key is None:
            raise ValueError(f"{path} holds no state dict: top-level keys {list(state)[:10]}")
        state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _torch_load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as err:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if not found:
            raise ValueError(f"{path} is not a readable torch checkpoint (not a pickle of tensors)") from None
        raise ValueError(
            f"{path} holds pickled {', '.join(found)} besides tensors, and fastvar never unpickles code: "
            "convert it to .safetensors (a flat dict of tensors) and pass that file") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({err})") from err


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters take no memory and no initialisation time, to be filled by
    ``load_checkpoint``. Buffers, constants derived from the configuration, are built for real."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


ALIGNMENT = 64  # bytes; what torch's allocator gives, so loaded weights compute as freshly built ones


def load_checkpoint(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                    device: str | torch.device | None = None, progress: bool = False) -> None:
    """Load strictly into ``module``, built for real or by ``parameters_on_meta``.

    Each tensor takes the dtype the module's own tensor has and ``device`` (default: where the module's
    tensor is, or the CPU for meta tensors), one tensor at a time. The module's ``adapt_state_dict``, if
    it has one, first maps the official key spelling onto its own; its ``derived_buffers`` (constants it
    rebuilds) may be absent. Raises ``ValueError`` naming every missing, unexpected and mis-shaped key.
    """
    if hasattr(module, "adapt_state_dict"):
        state_dict = module.adapt_state_dict(dict(state_dict))
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(getattr(module, "derived_buffers", ())))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                       for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    problems = [f"{name} keys: {_listing(keys)}" for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise ValueError(f"checkpoint does not fit {type(module).__name__}: " + "; ".join(problems))
    converted = {}
    for key in tqdm(sorted(state_dict), desc=f"loading {type(module).__name__}", disable=not progress, leave=False):
        target = own[key]
        where = device if device is not None else ("cpu" if target.is_meta else target.device)
        tensor = state_dict[key].to(device=where, dtype=target.dtype)
        if tensor.data_ptr() % ALIGNMENT:  # views into a safetensors buffer: BLAS kernels round by alignment
            tensor = tensor.clone()
        converted[key] = tensor
    module.load_state_dict(converted, strict=False, assign=True)
    if device is not None:
        module.to(device)  # the buffers that were built rather than loaded
