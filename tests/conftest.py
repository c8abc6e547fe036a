"""Shared fixtures: where the upstream reference data lies, and tiny VAR models."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvar.hub import load_checkpoint
from fastvar.models.bsq_vae import BSQVAE
from fastvar.models.hart import HART, HARTTokenizer
from fastvar.models.infinity import Infinity
from fastvar.models.infinitystar import Checkpoint, InfinityStar, Official
from fastvar.models.var import VAR, VQVAE
from fastvar.models.video_vae import VideoVAE, VideoVAEConfig
from fastvar.pruning import token_scores

REFERENCE_ENV = "FASTVAR_REFERENCE"
DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def reference_root() -> Path:
    """The reference directory; skips outside CI when absent, fails in CI."""
    root = Path(os.environ.get(REFERENCE_ENV, DEFAULT_REFERENCE))
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data missing at {root} (CI is set); set {REFERENCE_ENV} or provide ../shared")
        pytest.skip(f"reference data not found at {root}; set {REFERENCE_ENV} to run parity tests")
    return root


def reference_sets(family: str) -> list:
    """pytest params, one per set folder of ``family`` (every folder with a ``config.json``: held-out sets
    dropped in beside the public ones are checked the same way), named by the folder. Without the reference
    data, one param whose test skips (or fails in CI) through ``reference_root``."""
    root = Path(os.environ.get(REFERENCE_ENV, DEFAULT_REFERENCE)) / family
    sets = sorted(p for p in root.glob("*") if (p / "config.json").is_file())
    return [pytest.param(p, id=p.name) for p in sets] or [pytest.param(None, id="no-reference")]


def reference_cases(family: str, where=lambda case: True) -> list:
    """pytest params (set folder, case), one per case of every set's ``cases.json`` that ``where`` accepts,
    named 'set/case'."""
    params = []
    for param in reference_sets(family):
        set_dir = param.values[0]
        if set_dir is None:
            return [pytest.param(None, None, id="no-reference")]
        params += [pytest.param(set_dir, case, id=f"{set_dir.name}/{case['name']}")
                   for case in read_cases(set_dir)[0] if where(case)]
    return params


def read_cases(set_dir: Path) -> tuple[list[dict], list[dict]]:
    """The cases of a set's ``cases.json`` (a list, or ``{"cases": [...], "probes": [...]}``), and its probes:
    calls the upstream code failed on."""
    data = json.loads((set_dir / "cases.json").read_text())
    return (data["cases"], data.get("probes", [])) if isinstance(data, dict) else (data, [])


def checked_set(set_dir: Path | None) -> Path:
    """``set_dir``, or the skip (CI: failure) that says the reference data is missing."""
    if set_dir is None:
        reference_root()
        pytest.fail(f"no {REFERENCE_ENV} set folders found")  # the root exists but holds no set of this family
    return set_dir


class VarReference:
    """One VAR reference set: config, cases, outputs and the models loaded with its weights."""

    def __init__(self, set_dir: Path):
        self.dir = set_dir
        self.config = json.loads((set_dir / "config.json").read_text())
        files = self.config["files"]
        self.cases = json.loads((set_dir / files["cases"]).read_text())
        self.outputs = load_file(set_dir / files["outputs"])
        self.var_state = load_file(set_dir / files["var"])
        self.vae_state = load_file(set_dir / files["vae"])

    def build(self) -> VAR:
        vae = VQVAE(**self.config["vae"])
        var = VAR(vae, **self.config["var"])
        load_checkpoint(vae, self.vae_state)
        assert set(self.config["var_omitted_buffers"]) <= set(VAR.derived_buffers)
        load_checkpoint(var, self.var_state)
        return var.eval().requires_grad_(False)


@functools.cache
def load_reference(kind: type, set_dir: Path | None):
    """The reference set ``kind(set_dir)`` (VarReference, InfinityReference ...), read once per session; the
    reference ran on 2 torch threads."""
    torch.set_num_threads(2)
    return kind(checked_set(set_dir))


class InfinityReference:
    """One ``infinity`` set: constructor arguments, weights, text inputs, cases and outputs."""

    def __init__(self, set_dir: Path):
        self.dir = set_dir
        config = json.loads((set_dir / "config.json").read_text())
        self.args = config["vae"]["autoencoder_args"]
        self.transformer_kwargs = config["transformer"]["kwargs"]
        self.cases, self.probes = read_cases(set_dir)
        self.vae_state = load_file(set_dir / "vae.safetensors")
        self.infinity_state = load_file(set_dir / "infinity.safetensors")
        self.text = load_file(set_dir / "text.safetensors")
        self.outputs = load_file(set_dir / "outputs.safetensors")
        fastvar_outputs = set_dir / "fastvar_outputs.safetensors"  # the official FastVAR code's, where it ran
        self.fastvar_outputs = load_file(fastvar_outputs) if fastvar_outputs.exists() else {}

    def build_vae(self) -> BSQVAE:
        """A BSQVAE from the namespace handed to the upstream ``AutoEncoder``, with the set's weights."""
        args = self.args
        assert args["encoder_ch_mult"] == args["decoder_ch_mult"]
        assert args["codebook_size"] == 2 ** args["codebook_dim"]
        vae = BSQVAE(
            codebook_dim=args["codebook_dim"], patch_size=args["patch_size"], base_ch=args["base_ch"],
            ch_mult=args["decoder_ch_mult"], num_res_blocks=args["num_res_blocks"],
        )
        load_checkpoint(vae, self.vae_state)
        return vae.eval().requires_grad_(False)

    def build(self) -> tuple[Infinity, BSQVAE]:
        vae = self.build_vae()
        model = Infinity(vae, **self.transformer_kwargs)
        load_checkpoint(model, self.infinity_state)
        return model.eval().requires_grad_(False), vae

    def text_input(self, name: str) -> tuple:
        """The packed text tuple (kv_compact, lens, cu_seqlens_k, max_seqlen_k) of a case."""
        t = self.text
        return (t[f"{name}.kv_compact"], t[f"{name}.lens"].tolist(), t[f"{name}.cu_seqlens_k"],
                int(t[f"{name}.max_seqlen_k"]))


# The architecture choices fastvar implements, as upstream's namespace spells them (all of video_vae_model()'s).
FIXED_CHOICES = dict(norm_type="rms", act_fn="silu", up_block_mode="dc", up_layer="3d-dc", up_norm=True,
                     pad_mode="constant", use_post_quant_conv=False, use_feat_proj=2, decoder_dtype="fp32")

# The namespace fields each config field is read from.
NAMESPACE_SOURCES = dict(latent_channels="latent_channels", out_channels="out_channels",
                         block_out_channels="block_out_channels", layers_per_block="layers_per_block",
                         spatial_upsamplings="spatial_compression_list",
                         temporal_upsamplings="temporal_compression_list")


def config_from_namespace(ns: dict) -> VideoVAEConfig:
    """The decoder config of the argparse namespace upstream built ``AutoencoderKLCogVideoX`` from."""
    assert {k: ns[k] for k in FIXED_CHOICES} == FIXED_CHOICES
    assert set(ns["spatial_compression_list"]) == set(ns["temporal_compression_list"]) == {2}
    assert len(ns["up_block_types"]) == len(ns["block_out_channels"]) - 1
    return VideoVAEConfig(
        latent_channels=ns["latent_channels"], out_channels=ns["out_channels"],
        block_out_channels=tuple(ns["block_out_channels"]), layers_per_block=ns["layers_per_block"],
        spatial_upsamplings=len(ns["spatial_compression_list"]),
        temporal_upsamplings=len(ns["temporal_compression_list"]))


class InfinityStarReference:
    """One ``infinitystar`` set: the transformer's and the VAE's configuration, weights, texts, cases, outputs."""

    def __init__(self, set_dir: Path):
        self.dir = set_dir
        config = json.loads((set_dir / "config.json").read_text())
        self.args, self.transformer_config, self.vae_config = config["args"], config["transformer"], config["vae"]
        self.config = config_from_namespace(self.vae_config["namespace"])
        self.cases, _ = read_cases(set_dir)
        self.vae_state = load_file(set_dir / "vae.safetensors")
        self.state = load_file(set_dir / "infinitystar.safetensors")
        self.text = load_file(set_dir / "text.safetensors")
        self.outputs = load_file(set_dir / "outputs.safetensors")

    @functools.cached_property
    def model(self) -> InfinityStar:
        sizes, kwargs = self.transformer_config["size_overrides"], self.transformer_config["kwargs"]
        model = InfinityStar(
            text_channels=kwargs["text_channels"], text_maxlen=kwargs["text_maxlen"], embed_dim=sizes["embed_dim"],
            depth=sizes["depth"], num_heads=sizes["num_heads"], num_key_value_heads=sizes["num_key_value_heads"],
            mlp_ratio=sizes["mlp_ratio"], block_chunks=sizes["block_chunks"],
            codebook_dim=self.transformer_config["d_vae"],
            semantic_scale_dim=self.vae_config["namespace"]["semantic_scale_dim"])
        load_checkpoint(model, self.state)
        return model.eval().requires_grad_(False)

    @property
    def checkpoint(self) -> Checkpoint:
        args = self.args
        return Checkpoint(args["semantic_scales"], tuple(json.loads(args["image_scale_repetition"])),
                          tuple(json.loads(args["video_scale_repetition"])))

    def texts(self, name: str) -> tuple[tuple, tuple | None]:
        """The packed prompt (kv_compact, lens, cu_seqlens_k, max_seqlen_k) of a case, and its negative."""
        t = self.text

        def packed(prefix: str) -> tuple:
            return (t[f"{prefix}kv_compact"], t[f"{prefix}lens"].tolist(), t[f"{prefix}cu_seqlens_k"],
                    int(t[f"{prefix}max_seqlen_k"]))
        negative = f"{name}.negative_kv_compact" in t
        return packed(f"{name}."), (packed(f"{name}.negative_") if negative else None)

    @functools.cached_property
    def vae(self) -> VideoVAE:
        vae = VideoVAE(self.config)
        load_checkpoint(vae, self.vae_state)
        return vae.eval().requires_grad_(False)


def tiny_var(depth: int = 2, patch_nums=(1, 2, 3, 4, 6), shared_aln: bool = False, seed: int = 0) -> VAR:
    """A small random VAR (width 64, one head per 32 channels) whose AdaLN gates are not near zero."""
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=patch_nums)
    var = VAR(vae, depth=depth, embed_dim=64, num_heads=2, shared_aln=shared_aln, attn_l2_norm=True,
              patch_nums=patch_nums)
    for p in var.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return var.eval().requires_grad_(False)


def tiny_infinity(depth: int = 4, seed: int = 0) -> tuple[Infinity, BSQVAE]:
    """A small random Infinity (width 64, 256-channel text, 4-bit tokens) and its VAE."""
    torch.manual_seed(seed)
    vae = BSQVAE(codebook_dim=4, patch_size=16, base_ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1)
    model = Infinity(vae, text_channels=256, text_maxlen=32, embed_dim=64, depth=depth, num_heads=2, block_chunks=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def random_text(lens: list[int], channels: int = 256, seed: int = 0) -> tuple:
    """A packed text input (kv_compact, lens, cu_seqlens_k, max_seqlen_k) of random features."""
    kv = torch.randn(sum(lens), channels, generator=torch.Generator().manual_seed(seed))
    cu = torch.nn.functional.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0), (1, 0)).to(torch.int32)
    return kv, list(lens), cu, max(lens)


def tiny_text_encoder():
    """A one-layer T5 encoder (256 channels) and a word-level tokenizer, built here (no download)."""
    import tokenizers
    import transformers

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "on", "the", "moon", "red"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(words), d_model=256, d_kv=32, d_ff=64, num_layers=1, num_heads=2)
    return transformers.T5EncoderModel(config).eval(), tokenizer


# ----------------------------------------------------------------------------- comparing with reference runs

INFINITY_TOP_P_BOUNDARY = math.log(0.97 / 0.03)  # |l1 - l0| beyond which top-p 0.97 forces the likelier bit


def bit_decision_margins(g_seed: int, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale of an Infinity run (top-p 0.97), how far each reference bit's decision lies from flipping, in
    logit units. The sampler's draws depend only on shapes: regenerate them from g_seed (one Exp(1) pair per
    bit)."""
    g = torch.Generator().manual_seed(g_seed)
    margins = []
    for scale_logits in logits:
        l = scale_logits.reshape(-1, 2)
        e = torch.empty_like(l).exponential_(generator=g).log()
        diff = l[:, 1] - l[:, 0]
        race = (diff - (e[:, 1] - e[:, 0])).abs()
        forced = diff.abs() > INFINITY_TOP_P_BOUNDARY
        margins.append(torch.where(forced, torch.inf, race).minimum((diff.abs() - INFINITY_TOP_P_BOUNDARY).abs()))
    return margins


def assert_same_selection(x: torch.Tensor, keep: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """``keep`` and ``expected`` select the same tokens of ``x`` in the same order, up to float rounding:
    tokens may trade places only where their scores are within ``rtol`` (of the largest score)."""
    score = token_scores(x.float())
    tol = rtol * score.amax(dim=1, keepdim=True)
    in_expected_order = score.gather(1, expected.long())
    assert (in_expected_order[:, 1:] <= in_expected_order[:, :-1] + tol).all(), "order is not by descending score"
    kept, kept_expected = (torch.zeros_like(score, dtype=torch.bool).scatter(1, i.long(), True)
                           for i in (keep, expected))
    boundary = in_expected_order[:, -1:]
    assert ((kept == kept_expected) | ((score - boundary).abs() <= tol)).all(), "a token far from the boundary"
    in_own_order = score.gather(1, keep.long())
    assert (in_own_order[:, 1:] <= in_own_order[:, :-1]).all(), "the selection is not by descending score"


# ----------------------------------------------------------------------------- HART reference


class HartReference:
    """One ``hart`` set: constructor fields, weights, text inputs, cases and outputs."""

    def __init__(self, set_dir: Path):
        self.dir = set_dir
        config = json.loads((set_dir / "config.json").read_text())
        self.transformer_kwargs = config["transformer"]["kwargs"]
        self.tokenizer_kwargs = config["vae"]["kwargs"]
        self.cases = json.loads((set_dir / "cases.json").read_text())
        self.hart_state = load_file(set_dir / "hart.safetensors")
        self.vae_state = load_file(set_dir / "vae.safetensors")
        self.text = load_file(set_dir / "text.safetensors")
        self.outputs = load_file(set_dir / "outputs.safetensors")
        self.fastvar_outputs = load_file(set_dir / "fastvar_outputs.safetensors")

    def build(self):
        """fastvar's HART and its tokenizer from the set's constructor fields, with its weights."""
        tokenizer = HARTTokenizer(**self.tokenizer_kwargs)
        load_checkpoint(tokenizer, self.vae_state)  # adapt_state_dict maps the official keys
        model = HART(tokenizer, **self.transformer_kwargs)
        load_checkpoint(model, self.hart_state)
        return model.eval().requires_grad_(False), tokenizer.eval().requires_grad_(False)

    def call(self, case: dict) -> dict:
        """The keyword arguments of the case's ``autoregressive_infer_cfg`` call, its text included."""
        name, call = case["name"], case["call"]
        kwargs = {k: call[k] for k in ("B", "g_seed", "cfg", "top_k", "top_p", "more_smooth", "final_stage",
                                       "num_maskgit_iters")}
        kwargs.update({k: self.text[f"{name}.{k}"] for k in ("label_B", "context_position_ids", "context_mask")})
        return kwargs


# ----------------------------------------------------------------------------- tiny HART

HART_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # enough scales for the sampler's top-k switch after scale 6
HART_TEXT_TOKENS, HART_TEXT_DIM = 6, 16
LLAMA = dict(attn_type="llama", mlp_type="llama", disable_aln=True)


def tiny_hart_tokenizer(seed: int = 0) -> HARTTokenizer:
    torch.manual_seed(seed)
    return HARTTokenizer(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=HART_PATCH_NUMS,
                         quantizer_type="var_hybrid", test_mode=True)


def tiny_hart(seed: int = 0, **fields) -> HART:
    """Width 64, two heads, two blocks, 9 scales up to 9x9, a 32-wide diffusion head; random weights."""
    tokenizer = tiny_hart_tokenizer(seed)
    kwargs = dict(context_token=HART_TEXT_TOKENS, context_dim=HART_TEXT_DIM, depth=2, embed_dim=64, num_heads=2,
                  patch_nums=HART_PATCH_NUMS, diff_width=32, diff_depth=1, num_sampling_steps="4",
                  use_context_norm=True, **LLAMA)
    kwargs.update(fields)
    model = HART(tokenizer, **kwargs)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval().requires_grad_(False)


def hart_text(lens: list[int], seed: int = 0, tokens: int = HART_TEXT_TOKENS) -> dict:
    """Text features of ``tokens`` tokens per row, the first ``lens[b]`` of row b real, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(tokens)[None, :] < torch.tensor(lens)[:, None]
    return dict(B=len(lens), label_B=torch.randn(len(lens), tokens, HART_TEXT_DIM, generator=g),
                context_mask=mask, context_position_ids=mask.cumsum(dim=1) - 1)


def tiny_qwen():
    """A one-layer Qwen2 (hidden size HART_TEXT_DIM) and a Qwen2 tokenizer of single bytes (no merges), built here."""
    import transformers

    bytes_ = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bytes_] + [chr(256 + i) for i in range(256 - len(bytes_))]  # GPT-2's byte alphabet
    tokenizer = transformers.Qwen2Tokenizer(vocab={"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}},
                                            merges=[])
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=257, hidden_size=HART_TEXT_DIM, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    return transformers.Qwen2Model(config).eval(), tokenizer


# ----------------------------------------------------------------------------- tiny stand-ins for official releases


def tiny_var_pair(depth: int = 16, patch_nums=None) -> tuple[VQVAE, VAR]:
    """What ``fastvar.models.var.build`` returns, for a tiny VAR: (vae, var)."""
    var = tiny_var(depth=2, patch_nums=(1, 2, 3, 4, 6))
    return var.vae_proxy[0], var


def tiny_infinity_build(name: str = "infinity-2b", depth: int | None = None) -> tuple[Infinity, BSQVAE]:
    """4 blocks; the 8B's 40, which its KV budget is made for."""
    return tiny_infinity(depth=depth or (40 if name == "infinity-8b" else 4))


def tiny_hart_build(depth: int | None = None) -> tuple[HART, HARTTokenizer]:
    model = tiny_hart(depth=depth or 2)
    return model, model.vae_proxy[0]


@pytest.fixture
def tiny_official(monkeypatch):
    """Pipelines and scripts build tiny architectures where they would build the official ones."""
    import fastvar.models.var
    import fastvar.pipelines.hart
    import fastvar.pipelines.infinity
    import fastvar.pipelines.var

    monkeypatch.setattr(fastvar.pipelines.var, "build", tiny_var_pair)
    monkeypatch.setattr(fastvar.models.var, "build", tiny_var_pair)
    monkeypatch.setattr(fastvar.pipelines.infinity, "build", tiny_infinity_build)
    monkeypatch.setattr(fastvar.pipelines.hart, "build", tiny_hart_build)


def attended_keys(attention: torch.nn.Module, x: torch.Tensor) -> int:
    """Keys the attention module just attended to: those its cache stores, and the last scale's, which
    it attends to without storing."""
    cache = attention.kv_cache
    return cache.length + (x.shape[1] if cache.finished else 0)


def random_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The module's state dict with every float tensor redrawn, so a load visibly changes the module."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def write_official_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Tiny checkpoints under the official file names, as users download them: VAR-d16 and its VAE (.pth,
    the trainer layout of the VAE), Infinity-2B and its VAE, and a flan-T5-shaped encoder folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vae, var = tiny_var_pair()
    model, bsq = tiny_infinity_build()
    states = {"var_d16": random_state(var, 1), "vae_ch160v4096z32": random_state(vae, 2),
              "infinity_2b_reg": random_state(model, 3), "infinity_vae_d32reg": random_state(bsq, 4)}
    torch.save(states["var_d16"], folder / "var_d16.pth")
    torch.save({"trainer": {"vae_local": states["vae_ch160v4096z32"]}}, folder / "vae_ch160v4096z32.pth")
    torch.save(states["infinity_2b_reg"], folder / "infinity_2b_reg.pth")
    save_file({k: v.contiguous() for k, v in states["infinity_vae_d32reg"].items()},
              folder / "infinity_vae_d32reg.safetensors")
    encoder, tokenizer = tiny_text_encoder()
    encoder.save_pretrained(folder / "flan-t5-xl")
    tokenizer.save_pretrained(folder / "flan-t5-xl")
    states.update(write_official_hart(folder / "hart"))
    qwen, qwen_tokenizer = tiny_qwen()
    qwen.save_pretrained(folder / "qwen")
    qwen_tokenizer.save_pretrained(folder / "qwen")
    return states


def write_official_hart(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny HART in the layout of the official release: ``llm/`` (config.json, the EMA weights with the
    training mask) and ``tokenizer/`` (config.json, weights under ``vae.`` beside a discriminator)."""
    model = tiny_hart()
    tokenizer = model.vae_proxy[0]
    states = {"hart": random_state(model, 5), "hart_tokenizer": random_state(tokenizer, 6)}
    for sub in ("llm", "tokenizer"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    meta = {"architectures": ["HARTForT2I"], "model_type": "hart_transformer_t2i", "transformers_version": "4.46.3"}
    (folder / "llm" / "config.json").write_text(json.dumps({**model.config, **meta, "vae_path": "x"}))
    (folder / "tokenizer" / "config.json").write_text(json.dumps({**tokenizer.config, "model_type": "hart_autoencoder",
                                                                  "hybrid": True}))
    mask_size = model.lvl_1L.shape[1]
    torch.save({**states["hart"], "attn_bias_for_masking": torch.zeros(1, 1, mask_size, mask_size)},
               folder / "llm" / "ema_model.bin")
    torch.save({**{f"vae.{k}": v for k, v in states["hart_tokenizer"].items()}, "disc.main.0.weight": torch.ones(2)},
               folder / "tokenizer" / "pytorch_model.bin")
    return states


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay ``files`` (name in the repo -> local file) out as huggingface_hub's cache holds a downloaded repo."""
    repo, commit = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


@pytest.fixture
def hub_offline(monkeypatch):
    """No connection to the Hub, whatever this machine has: connecting fails at once."""
    import socket

    import fastvar.hub

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fastvar.hub._probe.cache_clear()
    yield
    fastvar.hub._probe.cache_clear()


# ----------------------------------------------------------------------------- tiny InfinityStar

TINY_VIDEO_VAE = VideoVAEConfig(block_out_channels=(4, 4, 8, 8, 8), layers_per_block=0)  # the official strides
# The official models' sampling at the smallest pixel budget (0.06M: 11 scales, 192x336 at 16:9) and with
# videos of 1 or 2 seconds: the official schedules (480p and up) are far too big for a CPU test at any width.
TINY_INFINITYSTAR = {
    "infinitystar-8b-720p": Official("0.06M", Checkpoint(8, (2, 2) + (1,) * 9, (2,) + (1,) * 10), (0, 1)),
    "infinitystar-8b-480p": Official("0.06M", Checkpoint(8, (1,) * 11, (1,) * 11), (0, 1, 2)),
}


def tiny_infinitystar_build(depth: int | None = None) -> tuple[InfinityStar, VideoVAE]:
    """What ``fastvar.pipelines.infinitystar.build`` returns, tiny: width 64, 2 blocks, the text width of
    ``tiny_text_encoder``, 64-bit codes; a video VAE of 4 to 8 channels."""
    model = InfinityStar(text_channels=256, text_maxlen=512, embed_dim=64, depth=depth or 2, num_heads=2,
                         num_key_value_heads=1, mlp_ratio=4.0, block_chunks=1)
    return model, VideoVAE(TINY_VIDEO_VAE)


@pytest.fixture
def tiny_infinitystar(monkeypatch):
    """InfinityStar pipelines build the tiny model and sample the tiny schedules (``TINY_INFINITYSTAR``)."""
    import fastvar.pipelines.infinitystar

    monkeypatch.setattr(fastvar.pipelines.infinitystar, "build", tiny_infinitystar_build)
    monkeypatch.setattr(fastvar.pipelines.infinitystar, "OFFICIAL", TINY_INFINITYSTAR)


def write_official_infinitystar(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny InfinityStar release as downloaded: the 720p transformer as a folder of two safetensors shards
    with their transformers index, ``infinitystar_videovae.pth`` (the VAE under ``"vae"``, with an encoder-side
    key the decoder does not load), and flan-T5 in ``text_encoder/flan-t5-xl-official``."""
    model, vae = tiny_infinitystar_build()
    states = {"transformer": random_state(model, 7), "vae": random_state(vae, 8)}
    shards = folder / "infinitystar_8b_720p_weights"
    shards.mkdir(parents=True, exist_ok=True)
    keys = sorted(states["transformer"])
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: states["transformer"][k].contiguous() for k in part}, shards / name)
        weight_map.update(dict.fromkeys(part, name))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save({"vae": {**states["vae"], "encoder.conv_in.conv.weight": torch.ones(2)}},
               folder / "infinitystar_videovae.pth")
    encoder, tokenizer = tiny_text_encoder()
    encoder.save_pretrained(folder / "text_encoder" / "flan-t5-xl-official")
    tokenizer.save_pretrained(folder / "text_encoder" / "flan-t5-xl-official")
    return states
