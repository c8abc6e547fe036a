"""Patch a VAR built from a clone of the upstream repository (FoundationVision/VAR).

    python examples/var_upstream.py /path/to/VAR var_d16.pth vae_ch160v4096z32.pth
"""

import sys
from pathlib import Path

import torch

import fastvar


def problem(args: list[str]) -> str | None:
    """What is wrong with the command line, None if nothing."""
    if len(args) != 3:
        return f"give 3 arguments, not {len(args)}"
    if not (Path(args[0]) / "models").is_dir():
        return f"{args[0]} is not a clone of FoundationVision/VAR, which holds a models/ folder"
    return next((f"{name} is not a file" for name in args[1:] if not Path(name).is_file()), None)


if wrong := problem(sys.argv[1:]):
    print(f"usage: python examples/var_upstream.py VAR_REPO VAR_CKPT VAE_CKPT ({wrong})", file=sys.stderr)
    sys.exit(2)
repo, var_ckpt, vae_ckpt = sys.argv[1:]
sys.path.insert(0, repo)
from models import build_vae_var  # noqa: E402  (the upstream package)

device = "cuda" if torch.cuda.is_available() else "cpu"
vae, var = build_vae_var(V=4096, Cvae=32, ch=160, share_quant_resi=4, device=device,
                         patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000, depth=16, shared_aln=False)
vae.load_state_dict(torch.load(vae_ckpt, map_location="cpu", weights_only=True))
var.load_state_dict(torch.load(var_ckpt, map_location="cpu", weights_only=True))
var.eval()

fastvar.patch(var)  # recognised as the var family by class name and attributes
print(fastvar.summary(var))
images = var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([207, 360], device=device), g_seed=0, cfg=4.0,
                                      top_k=900, top_p=0.95)
print(images.shape)
fastvar.unpatch(var)
