"""The family pipelines: loading as users have the weights, precision, inputs checked before any compute."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import tiny_infinity, tiny_text_encoder, tiny_var, write_hub_cache, write_official_files

import fastvar
import fastvar.models.var as var_module
from fastvar import InfinityPipeline, VARPipeline
from fastvar.extras import install_hint
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines.base import resolve_device, to_pil
from fastvar.pipelines.infinity import schedule_for

pytest.importorskip("transformers")


def assert_state(module, expected):
    own = module.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key


def arrays(images):
    return [np.asarray(im) for im in images]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    return folder, write_official_files(folder)


@pytest.fixture
def var_pipe():
    return VARPipeline(tiny_var(depth=2))


@pytest.fixture
def inf_pipe():
    model, vae = tiny_infinity(depth=4)
    return InfinityPipeline(model, vae, *tiny_text_encoder())


def count_block_calls(model):
    calls = []
    blocks = model.blocks if hasattr(model, "blocks") else model.unregistered_blocks
    blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("how", ["folder", "weights folder", "files"])
def test_var_loads_the_official_files_as_downloaded(official, tiny_official, hub_offline, how):
    folder, states = official
    if how == "folder":
        pipe = VARPipeline.from_pretrained(folder, progress=False)
    elif how == "weights folder":  # the VAE is looked for in the --weights folder too
        pipe = VARPipeline.from_pretrained("var-d16", weights=folder, progress=False)
    else:
        pipe = VARPipeline.from_pretrained("var-d16", weights=folder / "var_d16.pth",
                                           vae_weights=folder / "vae_ch160v4096z32.pth", progress=False)
    assert_state(pipe.transformer, states["var_d16"])
    assert_state(pipe.vae, states["vae_ch160v4096z32"])
    assert not pipe.transformer.training and not any(p.requires_grad for p in pipe.transformer.parameters())


def test_var_loads_from_the_hub_cache_and_by_download(official, tiny_official, tmp_path, monkeypatch, hub_offline):
    folder, states = official
    write_hub_cache(tmp_path, "FoundationVision/var", {f: folder / f for f in ("var_d16.pth", "vae_ch160v4096z32.pth")})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert_state(VARPipeline.from_pretrained("var-d16", progress=False).transformer, states["var_d16"])

    asked = []

    def download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        asked.append(filename)
        if not (folder / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr("fastvar.hub.hub_unreachable_reason", lambda: None)
    pipe = VARPipeline.from_pretrained("var-d16", progress=False)
    assert_state(pipe.vae, states["vae_ch160v4096z32"])
    assert asked == ["var_d16.safetensors", "var_d16.pth", "vae_ch160v4096z32.safetensors", "vae_ch160v4096z32.pth"]


def test_var_offline_names_the_missing_file_and_its_parameter(tmp_path, tiny_official, hub_offline, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    torch.save({}, tmp_path / "var_d16.pth")
    with pytest.raises(WeightsUnavailableError, match=r"^vae_ch160v4096z32 .*is not in .*, the Hugging Face cache, .*"
                                                      r"pass vae_weights=PATH \(CLI: --vae-weights PATH\)$"):
        VARPipeline.from_pretrained("var-d16", weights=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no var_d\*\.pth / var_d\*\.safetensors; name the model"):
        VARPipeline.from_pretrained(tmp_path / "empty")


def test_infinity_loads_the_official_files_as_downloaded(official, tiny_official, hub_offline):
    folder, states = official
    pipe = InfinityPipeline.from_pretrained(folder, text_encoder=folder / "flan-t5-xl", progress=False)
    assert_state(pipe.transformer, states["infinity_2b_reg"])
    assert_state(pipe.vae, states["infinity_vae_d32reg"])
    same = InfinityPipeline.from_pretrained("infinity-2b", weights=folder / "infinity_2b_reg.pth",
                                            vae_weights=folder, text_encoder=folder / "flan-t5-xl", progress=False)
    kwargs = dict(seed=2, size=(256, 256), progress=False)
    assert np.array_equal(arrays(pipe("a red cat", **kwargs))[0], arrays(same("a red cat", **kwargs))[0])


def test_infinity_offline_text_encoder_names_its_parameter(official, tiny_official, hub_offline, tmp_path, monkeypatch):
    folder, _ = official
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"^google/flan-t5-xl is not in the Hugging Face cache, and .*"
                                                      r"pass text_encoder=PATH \(CLI: --text-encoder PATH\)$"):
        InfinityPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"holds no official Infinity transformer"):
        InfinityPipeline.from_pretrained(folder / "flan-t5-xl")


def test_half_precision_is_stored_as_the_official_inference_stores_it(official, tiny_official, hub_offline):
    folder, _ = official
    pipe = InfinityPipeline.from_pretrained(folder, text_encoder=folder / "flan-t5-xl", dtype="bf16", progress=False)
    assert {p.dtype for b in pipe.transformer.unregistered_blocks for p in b.parameters()} == {torch.bfloat16}
    assert pipe.transformer.head.weight.dtype == pipe.vae.decoder.conv_in.conv.weight.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float16
    var = VARPipeline.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    assert var.dtype == torch.bfloat16 and {p.dtype for p in var.transformer.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match=r"infinity dtype 'fp16' is not supported; supported: fp32 \(torch.float32\), "
                                         r"bf16 \(torch.bfloat16\)"):
        InfinityPipeline.from_pretrained(folder, dtype="fp16")


# ----------------------------------------------------------------------------- precision


def record_var_logits(monkeypatch):
    seen, sample = [], var_module.sample_with_top_k_top_p_

    def recording(logits, **kwargs):
        seen.append(logits.float().clone())
        return sample(logits, **kwargs)

    monkeypatch.setattr(var_module, "sample_with_top_k_top_p_", recording)
    return seen


def test_bf16_var_draws_the_fp32_tokens_where_the_logits_are_clear(monkeypatch):
    var = tiny_var(depth=2, patch_nums=(1, 2, 3, 4, 6))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        seen = record_var_logits(monkeypatch)
        VARPipeline(var, dtype)([3, 17], top_k=1, top_p=0.0, progress=False)  # top-1: the argmax is drawn
        runs[dtype] = seen
        monkeypatch.undo()
    compared = 0
    for fp32, bf16 in zip(runs[torch.float32][:3], runs[torch.bfloat16][:3]):
        top2 = fp32.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 0.1
        assert torch.equal(fp32.argmax(-1)[clear], bf16.argmax(-1)[clear])
        compared += int(clear.sum())
    assert compared >= 10
    assert not torch.equal(runs[torch.float32][-1], runs[torch.bfloat16][-1])  # bf16 did run in bf16


def test_bf16_infinity_runs_and_its_first_bits_agree_with_fp32(inf_pipe):
    seen = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, vae = tiny_infinity(depth=4)
        if dtype == torch.bfloat16:
            for block in model.unregistered_blocks:
                block.to(dtype)
        pipe = InfinityPipeline(model, vae, inf_pipe.text_encoder, inf_pipe.tokenizer, dtype)
        logits = {}
        model.autoregressive_infer_cfg = wrap_logits(model.autoregressive_infer_cfg, logits)
        pipe("a red cat", seed=0, size=(256, 256), top_k=1, top_p=0.0, progress=False)
        seen[dtype] = logits
    for si in range(3):
        l32, l16 = seen[torch.float32][si].float(), seen[torch.bfloat16][si].float()
        clear = (l32[..., 1] - l32[..., 0]).abs() > 0.2
        assert torch.equal(l32.argmax(-1)[clear], l16.argmax(-1)[clear]) and clear.sum() > 0


def wrap_logits(call, store):
    def wrapped(*args, **kwargs):
        return call(*args, on_scale_logits=lambda si, lg: store.__setitem__(si, lg.clone()), **kwargs)
    return wrapped


# ----------------------------------------------------------------------------- generation


def test_var_pipeline_returns_the_official_calls_images(var_pipe):
    images = var_pipe([3, 17], seed=5, cfg=2.0, preset="default", progress=False)
    expected = var_pipe.transformer.autoregressive_infer_cfg(B=2, label_B=torch.tensor([3, 17]), g_seed=5, cfg=2.0,
                                                            top_k=900, top_p=0.95)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(images), arrays(to_pil(expected))))
    assert fastvar.summary(var_pipe.transformer).preset == "default"
    var_pipe(3, preset=None, progress=False)
    assert not fastvar.is_patched(var_pipe.transformer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_ids=[5000]), r"class id 5000 is out of range: ImageNet class ids are 0\.\.999$"),
    (dict(class_ids=[1000]), r"class id 1000 is out of range"),
    (dict(class_ids=[3, -2]), r"class id -2 is out of range"),
    (dict(class_ids=[]), r"class_ids must be an int or a non-empty list of ints"),
    (dict(class_ids=["3"]), r"class_ids must be an int or a non-empty list of ints"),
    (dict(class_ids=3, top_k=-1), r"top_k = -1: must be an int >= 0 \(0 keeps every entry\)"),
    (dict(class_ids=3, top_p=1.5), r"top_p = 1\.5: must be a number in \[0, 1\]"),
    (dict(class_ids=3, cfg=-1.0), r"cfg = -1\.0: the guidance scale must be a number >= 0"),
    (dict(class_ids=3, cfg=math.nan), r"cfg = nan"),
])
def test_var_inputs_are_checked_before_any_compute(var_pipe, kwargs, message):
    calls = count_block_calls(var_pipe.transformer)
    with pytest.raises(ValueError, match=message):
        var_pipe(**kwargs, progress=False)
    assert calls == []


def test_var_official_call_checks_labels_and_batch(var_pipe):
    var = var_pipe.transformer
    with pytest.raises(ValueError, match=r"label_B has 2 class ids for B = 3 images"):
        var.autoregressive_infer_cfg(B=3, label_B=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"B = 0: the batch size must be an int >= 1"):
        var.autoregressive_infer_cfg(B=0, label_B=None)
    assert var.autoregressive_infer_cfg(B=1, label_B=-1, g_seed=0).shape[0] == 1  # upstream's unconditional


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=3), r"prompt must be a non-empty string or a non-empty list of them, got 3"),
    (dict(prompt=["a cat", None]), r"prompt must be a non-empty string"),
    (dict(prompt=""), r"prompt must be a non-empty string"),
    (dict(prompt="a cat", negative_prompt=["x", "y"]), r"negative_prompt has 2 entries for 1 prompts"),
    (dict(prompt="a cat", tau=0), r"tau = 0: the temperature must be a number > 0"),
    (dict(prompt="a cat", cfg=-3), r"cfg = -3: the guidance scale must be a number >= 0"),
    (dict(prompt="a cat", top_p=-0.1), r"top_p = -0\.1"),
    (dict(prompt="a cat", aspect_ratio=math.nan), r"aspect_ratio must be a positive number \(height / width\), "
                                                  r"got nan"),
    (dict(prompt="a cat", aspect_ratio="wide"), r"aspect_ratio must be a positive number .*'wide'"),
    (dict(prompt="a cat", aspect_ratio=0.9), r"unsupported aspect ratio \(height / width\) 0\.9; supported: \[0\.333"),
    (dict(prompt="a cat", size=(256, 256), aspect_ratio=1.0), r"give size or aspect_ratio \(with pixels\), not both"),
    (dict(prompt="a cat", size="256 by 256"), r"size must be \(width, height\) or 'WIDTHxHEIGHT'"),
    (dict(prompt="a cat", size=(1000, 1000)), r"unsupported size 1000x1000 \(width x height\); nearest supported: "
                                              r"1024x1024, "),
    (dict(prompt="a cat", aspect_ratio=1.0, pixels="2M"), r"unknown pixel budget '2M'"),
])
def test_infinity_inputs_are_checked_before_any_compute(inf_pipe, kwargs, message):
    calls = count_block_calls(inf_pipe.transformer)
    with pytest.raises(ValueError, match=message):
        inf_pipe(**kwargs, progress=False)
    assert calls == []


def test_infinity_size_text_aspect_ratio_and_negative_prompts(inf_pipe):
    kwargs = dict(seed=1, preset=None, progress=False)
    as_text = inf_pipe(["a red cat", "the dog"], size="256x256", **kwargs)
    as_pair = inf_pipe(["a red cat", "the dog"], size=(256, 256), **kwargs)
    assert [im.size for im in as_text] == [(256, 256)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(arrays(as_text), arrays(as_pair)))
    wide = inf_pipe("a cat", aspect_ratio=0.5, pixels="0.06M", **kwargs)
    assert wide[0].size == (22 * 16, 11 * 16)  # the 0.06M scale of the 1:2 template: 11 x 22 tokens
    negative = inf_pipe(["a red cat", "the dog"], size="256x256", negative_prompt="the moon", **kwargs)
    assert not np.array_equal(arrays(negative)[0], arrays(as_text)[0])
    assert schedule_for(1440, 720)[-1] == (1, 45, 90)


def test_text_is_packed_as_the_official_script_does(inf_pipe):
    kv, lens, cu, max_len = inf_pipe.encode_prompts(["a cat", "the red dog on the moon"])
    assert lens == [2, 6] and max_len == 6 and cu.tolist() == [0, 2, 8] and cu.dtype == torch.int32
    single = inf_pipe.encode_prompts(["a cat"])[0]
    torch.testing.assert_close(kv[:2], single, atol=1e-5, rtol=0)


def test_random_pipelines_generate_without_any_file(tiny_official):
    var = VARPipeline.random(depth=2)
    assert var([1, 2], progress=False)[0].size == (96, 96)
    inf = InfinityPipeline.random(depth=2)
    assert inf.text_encoder is None
    assert inf("a cat", size=(256, 256), progress=False)[0].size == (256, 256)
    cat, again, dog = (inf.encode_prompts([p])[0] for p in ("a cat", "a cat", "a dog"))
    assert torch.equal(cat, again) and not torch.equal(cat, dog)  # seeded by the prompt
    assert cat.shape == (3, inf.transformer.Ct5)  # its words and the end token


def test_devices_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device = 'gpu' is not a torch device"):
        resolve_device("gpu")
    assert resolve_device("auto").type == "cpu"


def test_a_patched_model_refuses_pickling_with_advice(var_pipe):
    var = var_pipe.transformer
    fastvar.patch(var)
    with pytest.raises(TypeError, match=r"fastvar-patched VAR cannot be pickled .*call fastvar\.unpatch\(model\) "
                                        r"first, or save model\.state_dict\(\)"):
        pickle.dumps(var)
    fastvar.unpatch(var)
    assert type(pickle.loads(pickle.dumps(var))).__name__ == "VAR"


def test_model_offload_moves_each_module_only_while_it_works(tiny_official, monkeypatch):
    pipe = InfinityPipeline.random()
    expected = pipe("a cat", seed=1, size=(256, 256), top_k=2, progress=False)
    assert pipe.enable_model_cpu_offload("cpu") is pipe and pipe.device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="already on"):
        pipe.enable_model_cpu_offload("cpu")
    names = {id(pipe.transformer): "transformer", id(pipe.vae): "vae", id(pipe.vae.quantizer): "quantizer"}
    moves, to = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(names.get(id(self))) or to(
        self, *a, **k))
    images = pipe("a cat", seed=1, size=(256, 256), top_k=2, progress=False)
    assert [m for m in moves if m] == ["transformer", "quantizer", "transformer", "quantizer", "vae", "vae"]
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))
    moves.clear()
    pipe.to("cpu")  # offload off: nothing moves during a call
    pipe("a cat", seed=1, size=(256, 256), top_k=2, progress=False)
    assert [m for m in moves if m] == ["transformer", "vae"]  # those of to() itself


def test_a_missing_optional_package_names_what_to_install(monkeypatch):
    """The hint lists the extra's packages as pyproject.toml has them: it works from a wheel and a clone."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"the Infinity text encoder needs transformers: pip install") as info:
        InfinityPipeline.from_pretrained("infinity-2b")
    assert str(info.value).split(": ", 1)[1] == "pip install " + " ".join(f"'{p}'" for p in extras["infinity"])
    assert install_hint("compare") == "pip install " + " ".join(f"'{p}'" for p in extras["compare"])
