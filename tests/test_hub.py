"""Finding, reading and loading checkpoints (fastvar.hub), on tiny local files and a stand-in Hub."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import huggingface_hub
import pytest
import torch
from conftest import random_state, write_hub_cache
from huggingface_hub import errors as hub_errors
from safetensors.torch import save_file

from fastvar import hub

CKPT = hub.Checkpoint("org/repo", "x", "vae_weights")
SHARDS = hub.Checkpoint("org/repo", "weights/", "weights")


class Arbitrary:
    """A plain Python object: a weights-only load must refuse to unpickle it."""


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


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A reachable Hub serving the files under tmp_path/hub (not cached); returns the requested filenames."""
    root = tmp_path / "hub"
    root.mkdir()
    calls = []

    def hf_hub_download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise hub_errors.LocalEntryNotFoundError("not cached")
        calls.append(filename)
        if (root / filename).is_file():
            return str(root / filename)
        raise hub_errors.EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    return root, calls


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_read_state_dict_round_trips(tmp_path, suffix):
    state = {"w": torch.randn(3, 4), "step": torch.arange(5)}
    assert_same(hub.read_state_dict(save(state, tmp_path / f"x{suffix}")), state)


def test_pth_is_read_weights_only_and_pickled_code_is_refused_with_our_message(tmp_path, monkeypatch):
    save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    save({"w": torch.ones(2), "obj": Arbitrary()}, tmp_path / "pickled.pth")
    kwargs, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: kwargs.append(kw) or real_load(*a, **kw))
    hub.read_state_dict(tmp_path / "ok.pth")
    assert kwargs[0]["weights_only"] is True
    with pytest.raises(ValueError, match=r"pickled .*test_hub\.Arbitrary besides tensors, and fastvar never unpickles "
                                         r"code: convert it to \.safetensors") as info:
        hub.read_state_dict(tmp_path / "pickled.pth")
    assert "weights_only" not in str(info.value).replace(str(tmp_path), "")  # not torch's advice to turn it off


def test_read_state_dict_unwraps_trainer_checkpoint(tmp_path):
    sd, vsd = {"a": torch.randn(2)}, {"b": torch.randn(3)}
    path = save({"trainer": {"var_wo_ddp": sd, "vae_local": vsd}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert_same(hub.read_state_dict(path, wrapper_keys=("trainer", "var_wo_ddp")), sd)
    assert_same(hub.read_state_dict(path, wrapper_keys=("trainer", "vae_local")), vsd)


@pytest.mark.parametrize("name, expected", [
    ("x.npz", r"unsupported checkpoint format 'x\.npz'.*\.safetensors"),
    ("x.safetensors", r"x\.safetensors is not a readable safetensors file"),
    ("x.pth", r"x\.pth is not a readable torch checkpoint"),
])
def test_unreadable_files_are_refused_clearly(tmp_path, name, expected):
    (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=expected):
        hub.read_state_dict(tmp_path / name)


def write_shards(folder, state, index_name="model.safetensors.index.json"):
    """Split ``state`` over two shard files with a transformers-style index, as the 8B checkpoint is."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.pth": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / index_name


@pytest.mark.parametrize("index_name", hub.SHARD_INDEXES)
def test_sharded_checkpoint_is_merged(tmp_path, index_name):
    state = random_state(torch.nn.Linear(4, 3))
    index = write_shards(tmp_path / "weights", state, index_name)
    assert SHARDS.find(tmp_path / "weights") == index  # the shard folder itself
    assert SHARDS.find(tmp_path) == index  # the folder holding it
    assert_same(hub.read_state_dict(index), state)


# ----------------------------------------------------------------------------- finding


def test_a_given_file_or_folder_is_used_and_safetensors_preferred(tmp_path):
    pth = save({"w": torch.ones(1)}, tmp_path / "x.pth")
    assert CKPT.find(tmp_path) == pth
    assert CKPT.find(pth) == pth
    assert CKPT.find(tmp_path / "x.pth") == pth
    safetensors = save({"w": torch.ones(1)}, tmp_path / "x.safetensors")
    assert CKPT.find(tmp_path) == safetensors


def test_a_given_path_without_the_checkpoint_is_an_error_not_a_download(tmp_path, fake_hub):
    with pytest.raises(hub.WeightsUnavailableError, match=r"\(vae_weights\) holds none of \['x\.safetensors', "):
        CKPT.find(tmp_path)
    with pytest.raises(hub.WeightsUnavailableError, match=r"vae_weights=.*nowhere: no such file or folder"):
        CKPT.find(tmp_path / "nowhere")
    assert fake_hub[1] == []


def test_search_folders_come_before_the_hub(tmp_path, fake_hub):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    found = save({"w": torch.ones(1)}, tmp_path / "b" / "x.pth")
    assert CKPT.find(None, [None, tmp_path / "a", tmp_path / "b"]) == found
    assert fake_hub[1] == []


def test_download_prefers_safetensors_and_falls_back_to_pth(fake_hub):
    root, calls = fake_hub
    pth = save({"w": torch.ones(1)}, root / "x.pth")
    assert CKPT.find() == pth
    assert calls == ["x.safetensors", "x.pth"]


def test_shards_are_downloaded_beside_their_index(fake_hub):
    root, calls = fake_hub
    state = random_state(torch.nn.Linear(4, 3))
    write_shards(root / "weights", state, "pytorch_model.bin.index.json")
    index = SHARDS.find()
    assert calls == ["weights/model.safetensors.index.json", "weights/pytorch_model.bin.index.json",
                     "weights/part-1.safetensors", "weights/part-2.pth"]
    assert_same(hub.read_state_dict(index), state)


def test_the_hugging_face_cache_is_used_without_a_connection(tmp_path, monkeypatch, hub_offline):
    file = save({"w": torch.ones(1)}, tmp_path / "x.pth")
    write_hub_cache(tmp_path / "cache", "org/repo", {"x.pth": file})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    found = CKPT.find()
    assert found.read_bytes() == file.read_bytes() and "cache" in str(found)


@pytest.mark.parametrize("offline_env", [True, False])
def test_offline_fails_at_once_naming_the_file_and_the_parameter(tmp_path, monkeypatch, hub_offline, offline_env):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    downloads = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            downloads.append(args)
        return real(*args, local_files_only=local_files_only, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(hub.WeightsUnavailableError) as info:
        CKPT.find(None, [tmp_path])
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert "\n" not in message and not downloads
    reason = "HF_HUB_OFFLINE is set" if offline_env else "cannot be reached"
    assert re.search(rf"^x \(x\.safetensors or x\.pth\) is not in {re.escape(str(tmp_path))}, the Hugging Face cache, "
                     rf"and .*{reason}.*; download it from https://huggingface.co/org/repo and pass vae_weights=PATH "
                     r"\(CLI: --vae-weights PATH\)$", message), message


# ----------------------------------------------------------------------------- loading


class WithBuffer(torch.nn.Linear):
    derived_buffers = ("table",)

    def __init__(self):
        super().__init__(3, 2)
        self.register_buffer("table", torch.arange(4.0))


@pytest.mark.parametrize("edit, listed", [
    (lambda sd: sd.pop("bias"), "missing keys: bias"),
    (lambda sd: sd.update(extra=torch.ones(1), other=torch.ones(1)), "unexpected keys: extra, other"),
    (lambda sd: sd.update(weight=torch.ones(2, 5)), "mis-shaped keys: weight (2, 5) != (2, 3)"),
])
def test_load_checkpoint_names_bad_keys(edit, listed):
    module = torch.nn.Linear(3, 2)
    state = random_state(module)
    edit(state)
    with pytest.raises(ValueError, match="^checkpoint does not fit Linear: " + re.escape(listed) + "$"):
        hub.load_checkpoint(module, state)


def test_derived_buffers_may_be_absent_and_are_kept():
    module = WithBuffer()
    state = random_state(module)
    del state["table"]
    hub.load_checkpoint(module, state)
    assert_same(module.state_dict(), {**state, "table": torch.arange(4.0)})
    del state["bias"]
    with pytest.raises(ValueError, match="missing keys: bias$"):
        hub.load_checkpoint(module, state)


def test_the_modules_adapt_state_dict_maps_official_spellings():
    class Renaming(torch.nn.Linear):
        def adapt_state_dict(self, state):
            return {k.removeprefix("vae."): v for k, v in state.items() if not k.startswith("disc.")}

    module = Renaming(3, 2)
    state = random_state(module)
    hub.load_checkpoint(module, {**{f"vae.{k}": v for k, v in state.items()}, "disc.w": torch.ones(1)})
    assert_same(module.state_dict(), state)


def test_meta_built_modules_load_into_their_own_dtypes_and_the_device():
    with hub.parameters_on_meta():
        module = torch.nn.Sequential(WithBuffer(), torch.nn.Linear(2, 2))
    assert all(p.is_meta for p in module.parameters()) and not module[0].table.is_meta
    module[1].to(torch.bfloat16)  # as a pipeline keeps some blocks in half precision
    state = random_state(module)
    hub.load_checkpoint(module, state, device="cpu")
    assert not any(t.is_meta for t in module.state_dict().values())
    assert module[0].weight.dtype == torch.float32 and module[1].weight.dtype == torch.bfloat16
    assert torch.equal(module[1].weight, state["1.weight"].to(torch.bfloat16))
    assert torch.equal(module[0].weight, state["0.weight"]) and module[0].weight.requires_grad
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the context is left


LOAD_PEAK = """
import sys, torch
from fastvar.pipelines import VARPipeline


def peak_kib():  # this process's high-water mark (ru_maxrss would include the parent's, across exec)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))


before = peak_kib()
pipe = VARPipeline.from_pretrained("var-d16", weights=sys.argv[1], progress=False)
weights = [*pipe.transformer.state_dict().values(), *pipe.vae.state_dict().values()]
for t in weights:  # memory-mapped tensors are read on first use: read them all
    t.sum()
print(peak_kib() - before, sum(t.numel() * t.element_size() for t in weights))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_full_size_var_d16_needs_about_one_copy_of_the_weights(tmp_path):
    """Built on the meta device and loaded memory-mapped: no random initialisation, no second copy."""
    from fastvar.models.var import build

    with hub.parameters_on_meta():
        vae, var = build(16)
    for name, module in (("var_d16", var), ("vae_ch160v4096z32", vae)):
        state = {k: torch.empty(v.shape, dtype=v.dtype).normal_() if v.is_floating_point() else torch.zeros_like(
            v, device="cpu") for k, v in module.state_dict().items()}
        save_file(state, tmp_path / f"{name}.safetensors")
        del state
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    peak_kib, weight_bytes = (int(v) for v in out.stdout.split())
    ratio = peak_kib * 1024 / weight_bytes
    print(f"peak host memory while loading VAR-d16: {peak_kib / 1024:.0f} MiB = {ratio:.2f}x its fp32 weights")
    assert 0.9 < ratio < 1.3  # the weights were read, and about once
