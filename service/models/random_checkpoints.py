"""Write random-weight ESM-2 checkpoints in fair-esm's file format.

For tests, benchmarks and offline demos: throughput does not depend on the weights'
values, and parity tests compare against fair-esm loading the very same file. Every
checkpoint written here is marked, and the server says loudly that it is random.

    python -m service.models.random_checkpoints --shape 8m --out checkpoints/
    # -> checkpoints/esm2-8m-shape-RANDOM-WEIGHTS.pt (and its -contact-regression.pt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import esm
import torch

from service.models.checkpoints import RANDOM_WEIGHTS_KEY, STANDARD_MODELS, regression_path

# shape name -> (layers, embed_dim, heads, file stem); real shapes use fair-esm's names.
SHAPES = {
    "tiny": (2, 64, 4, "esm2_t2_tiny_random"),
    # One layer at the 650M width: 650M-sized per-token tensors from a model that runs fast.
    "wide": (1, 1280, 20, "esm2_t1_wide_random"),
    "8m": (6, 320, 20, STANDARD_MODELS["esm2-8m"]),
    "35m": (12, 480, 20, STANDARD_MODELS["esm2-35m"]),
    "150m": (30, 640, 20, STANDARD_MODELS["esm2-150m"]),
    "650m": (33, 1280, 20, STANDARD_MODELS["esm2-650m"]),
    "3b": (36, 2560, 40, STANDARD_MODELS["esm2-3b"]),
}


def demo_stem(shape: str) -> str:
    """The name the command line gives its files, e.g. `esm2-8m-shape-RANDOM-WEIGHTS`: at a real
    shape, fair-esm's own name would pass for the released checkpoint in a file listing, in
    ListModels' `checkpoint` and wherever the file is copied."""
    return f"esm2-{shape}-shape-RANDOM-WEIGHTS"


def write_random_checkpoint(shape: str, out_dir: Path, seed: int = 0, stem: str | None = None,
                            device: str | torch.device = "cpu") -> Path:
    """Write `<stem>.pt` and `<stem>-contact-regression.pt` into out_dir; return the .pt path.
    The stem defaults to the shape's (fair-esm's own at the real shapes: tests and benchmarks find
    them as a standard model's files). `device`: where the weights are made (a GPU makes 3B's 2.8
    billion in seconds, a CPU in minutes); the file holds host tensors either way."""
    layers, dim, heads, default_stem = SHAPES[shape]
    stem = stem or default_stem
    torch.manual_seed(seed)
    with torch.device(device):
        model = esm.model.esm2.ESM2(
            num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet="ESM-1b", token_dropout=True
        )
    # fair-esm's init leaves LayerNorms at identity and biases at zero; perturb them so
    # that tests exercise every parameter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    regression = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    cfg = argparse.Namespace(
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_attention_heads=heads,
        token_dropout=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.pt"
    # Same layout as the released checkpoints: prefixed keys that fair-esm strips.
    torch.save(
        {
            "model": {f"encoder.sentence_encoder.{k}": v for k, v in state.items()},
            "cfg": {"model": cfg},
            RANDOM_WEIGHTS_KEY: True,
        },
        path,
    )
    torch.save({"model": regression, RANDOM_WEIGHTS_KEY: True}, regression_path(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fair-esm-name", action="store_true",
                        help="name the files as fair-esm names the real checkpoint of the shape (found by "
                             "--models esm2-8m --model-dir DIR), not esm2-<shape>-shape-RANDOM-WEIGHTS.pt")
    args = parser.parse_args(argv)
    for shape in args.shape:
        path = write_random_checkpoint(shape, args.out, args.seed, None if args.fair_esm_name else demo_stem(shape))
        print(f"wrote {path} (RANDOM WEIGHTS, shape {shape})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
