"""Checkpoint finding, reading and loading (fastvar.hub) and VAR.from_pretrained, on tiny local files."""

from __future__ import annotations

import json
import pickle
import re

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import save_file

import fastvar.models.var as var_module
from fastvar import hub
from fastvar.models.var import VAR, VQVAE

PATCH_NUMS = (1, 2, 3)
REMOTE_MISSING = getattr(hub_errors, "RemoteEntryNotFoundError", hub_errors.EntryNotFoundError)


class RemoteMissing(REMOTE_MISSING):
    """The Hub's 'no such file in the repo' error, without the HTTP response its constructor wants."""

    def __init__(self, message):
        Exception.__init__(self, message)


class Arbitrary:
    """A plain Python object: a weights-only load must refuse to unpickle it."""


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=PATCH_NUMS)
    return vae, VAR(vae, depth=1, embed_dim=64, num_heads=1, attn_l2_norm=True, patch_nums=PATCH_NUMS)


def random_state(module):
    """The module's state dict with every float tensor redrawn, so a load visibly changes the module."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(actual[k], v), k


def fake_hub(monkeypatch, root):
    """Serve the files under ``root`` as the Hub would; returns the list of (repo_id, filename) requested."""
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if (root / filename).is_file():
            return str(root / filename)
        raise RemoteMissing(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


@pytest.fixture
def tiny_build(monkeypatch):
    """Make ``build`` (the official, huge architecture) return a tiny model with fresh weights."""
    monkeypatch.setattr(var_module, "build", lambda depth: tiny_pair(seed=1))


# ----------------------------------------------------------------------------- read_state_dict


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_read_state_dict_round_trips(tmp_path, suffix):
    state = {"w": torch.randn(3, 4), "step": torch.arange(5)}
    assert_same(hub.read_state_dict(save(state, tmp_path / f"x{suffix}")), state)


def test_read_state_dict_loads_pth_weights_only(tmp_path, monkeypatch):
    save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    save({"w": torch.ones(2), "obj": Arbitrary()}, tmp_path / "pickled.pth")
    kwargs, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: kwargs.append(kw) or real_load(*a, **kw))
    hub.read_state_dict(tmp_path / "ok.pth")
    assert kwargs[0]["weights_only"] is True
    with pytest.raises(pickle.UnpicklingError):
        hub.read_state_dict(tmp_path / "pickled.pth")


def test_read_state_dict_unwraps_trainer_checkpoint(tmp_path):
    sd, vsd = {"a": torch.randn(2)}, {"b": torch.randn(3)}
    path = save({"trainer": {"var_wo_ddp": sd, "vae_local": vsd}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert_same(hub.read_state_dict(path, wrapper_keys=("trainer", "var_wo_ddp")), sd)
    assert_same(hub.read_state_dict(path, wrapper_keys=("trainer", "vae_local")), vsd)


def test_read_state_dict_rejects_unknown_format(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.npz.*\.safetensors.*\.pth"):
        hub.read_state_dict(tmp_path / "x.npz")


# ----------------------------------------------------------------------------- locate and download


def test_locate_prefers_safetensors(tmp_path):
    pth = save({"w": torch.ones(1)}, tmp_path / "x.pth")
    assert hub.locate(tmp_path, "x") == pth
    assert hub.locate(pth, "ignored") == pth
    safetensors = save({"w": torch.ones(1)}, tmp_path / "x.safetensors")
    assert hub.locate(tmp_path, "x") == safetensors


def test_locate_reports_missing_checkpoint(tmp_path):
    with pytest.raises(hub.WeightsUnavailableError, match=r"x\.safetensors.*x\.pth"):
        hub.locate(tmp_path, "x")
    with pytest.raises(hub.WeightsUnavailableError, match="nowhere"):
        hub.locate(tmp_path / "nowhere", "x")


def test_download_falls_back_to_pth(tmp_path, monkeypatch):
    pth = save({"w": torch.ones(1)}, tmp_path / "x.pth")
    calls = fake_hub(monkeypatch, tmp_path)
    assert hub.download("org/repo", "x") == pth
    assert calls == [("org/repo", "x.safetensors"), ("org/repo", "x.pth")]


def test_download_offline_raises_weights_unavailable(monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(hub.WeightsUnavailableError, match=r"x\.safetensors.*org/repo.*pass its path") as info:
        hub.download("org/repo", "x")
    assert isinstance(info.value.__cause__, hub_errors.LocalEntryNotFoundError)


# ----------------------------------------------------------------------------- load_checkpoint


def module_with_buffer():
    module = torch.nn.Linear(3, 2)
    module.register_buffer("table", torch.zeros(4))
    return module


@pytest.mark.parametrize("edit, listed", [
    (lambda sd: sd.pop("bias"), "missing keys: bias"),
    (lambda sd: sd.update(extra=torch.ones(1), other=torch.ones(1)), "unexpected keys: extra, other"),
    (lambda sd: sd.update(weight=torch.ones(2, 5)), "mis-shaped keys: weight (2, 5) != (2, 3)"),
])
def test_load_checkpoint_names_bad_keys(edit, listed):
    module = module_with_buffer()
    state = random_state(module)
    edit(state)
    with pytest.raises(ValueError, match="^checkpoint does not fit Linear: " + re.escape(listed) + "$"):
        hub.load_checkpoint(module, state)


def test_load_checkpoint_loads_and_allows_absent_derived_keys():
    module = module_with_buffer()
    state = random_state(module)
    del state["table"]
    with pytest.raises(ValueError, match="missing keys: table"):
        hub.load_checkpoint(module, state)
    hub.load_checkpoint(module, state, derived=("table",))
    assert_same(module.state_dict(), {**state, "table": torch.zeros(4)})


# ----------------------------------------------------------------------------- VAR.from_pretrained


def save_official(root, var_suffix=".safetensors", vae_suffix=".pth", drop=()):
    """Random weights for the tiny model as ``var_d16`` and ``vae_ch160v4096z32`` files under ``root``."""
    vae, var = tiny_pair(seed=0)
    var_state, vae_state = random_state(var), random_state(vae)
    save({k: v for k, v in var_state.items() if k not in drop}, root / f"var_d16{var_suffix}")
    save(vae_state, root / f"vae_ch160v4096z32{vae_suffix}")
    return var_state, vae_state


def assert_loaded(var, var_state, vae_state):
    assert_same(var.state_dict(), var_state)
    assert_same(var.vae_proxy[0].state_dict(), vae_state)
    assert not var.training and not any(p.requires_grad for p in var.parameters())


@pytest.mark.parametrize("as_files", [False, True])
def test_from_pretrained_local(tmp_path, tiny_build, as_files):
    var_state, vae_state = save_official(tmp_path)
    weights = tmp_path / "var_d16.safetensors" if as_files else tmp_path
    vae_weights = tmp_path / "vae_ch160v4096z32.pth" if as_files else tmp_path
    assert_loaded(VAR.from_pretrained(depth=16, weights=weights, vae_weights=vae_weights), var_state, vae_state)


def test_from_pretrained_downloads_official_files(tmp_path, monkeypatch, tiny_build):
    var_state, vae_state = save_official(tmp_path, var_suffix=".pth", vae_suffix=".pth")
    calls = fake_hub(monkeypatch, tmp_path)
    assert_loaded(VAR.from_pretrained(depth=16), var_state, vae_state)
    assert sorted(calls) == [("FoundationVision/var", f"{stem}{suffix}")
                             for stem in ("vae_ch160v4096z32", "var_d16") for suffix in (".pth", ".safetensors")]


def test_from_pretrained_without_derived_buffer(tmp_path, tiny_build):
    var_state, vae_state = save_official(tmp_path, drop=("attn_bias_for_masking",))
    var = VAR.from_pretrained(depth=16, weights=tmp_path, vae_weights=tmp_path)
    var_state["attn_bias_for_masking"] = tiny_pair()[1].attn_bias_for_masking  # rebuilt, not loaded
    assert_loaded(var, var_state, vae_state)


# ----------------------------------------------------------------------------- sharded checkpoints


def write_shards(folder, state, index_name="model.safetensors.index.json"):
    """Split ``state`` over two shard files with a transformers-style index, as the 8B checkpoint is."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.pth": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_sharded_checkpoint_from_a_local_folder(tmp_path, index_name):
    state = random_state(tiny_pair()[1])
    write_shards(tmp_path / "shards", state, index_name)
    assert_same(hub.fetch_sharded_state_dict("any/repo", "shards", tmp_path / "shards"), state)
    with pytest.raises(hub.WeightsUnavailableError, match="holds none of"):
        hub.fetch_sharded_state_dict("any/repo", "shards", tmp_path)


def test_sharded_checkpoint_from_the_hub(tmp_path, monkeypatch):
    state = random_state(tiny_pair()[1])
    write_shards(tmp_path / "weights", state, "pytorch_model.bin.index.json")
    calls = fake_hub(monkeypatch, tmp_path)
    assert_same(hub.fetch_sharded_state_dict("org/model", "weights"), state)
    assert [f for _, f in calls] == ["weights/model.safetensors.index.json", "weights/pytorch_model.bin.index.json",
                                     "weights/part-1.safetensors", "weights/part-2.pth"]
