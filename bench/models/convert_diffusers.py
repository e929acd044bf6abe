"""Convert a diffusers ``DiTTransformer2DModel`` state dict to kindbench's DiT key layout (= released DiT keys).

Layout differences the conversion handles:

* diffusers keeps a timestep + label embedder inside every block (``transformer_blocks.N.norm1.emb``) and uses
  block 0's for the final layer; DiT has one shared ``t_embedder`` / ``y_embedder``. Block 0's copy is taken, and
  the conversion refuses a model whose blocks hold different embedders (the result would be a different model).
* diffusers splits attention into ``to_q/to_k/to_v``; DiT fuses them into ``attn.qkv`` (concatenated q, k, v rows).
* diffusers does not store the fixed position embedding (a non-persistent buffer); pass ``grid_size`` to get
  ``pos_embed`` filled with DiT's 2-D sin-cos values.

Two behavioural differences are NOT weights and so cannot be converted (see tests/test_dit.py): diffusers' DiT
timestep sinusoid uses ``downscale_freq_shift=1`` where DiT uses 0, and its MLP LayerNorm eps defaults to 1e-5
where DiT uses 1e-6 (``norm_eps=1e-6`` in the diffusers config fixes the latter).
"""

from __future__ import annotations

import torch

from bench.models.dit import get_2d_sincos_pos_embed

__all__ = ["dit_state_dict_from_diffusers"]

_SHARED_EMBEDDER = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
}
_PER_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_LABEL_TABLE = "norm1.emb.class_embedder.embedding_table.weight"


def dit_state_dict_from_diffusers(
    sd: dict[str, torch.Tensor], depth: int, *, grid_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Map ``DiTTransformer2DModel.state_dict()`` to a state dict for ``bench.models.dit.DiT``.

    Args:
        sd: the diffusers state dict.
        depth: number of transformer blocks.
        grid_size: tokens per side (input_size // patch_size). When given, ``pos_embed`` is included so the result
            loads with ``strict=True``; when None it is left out (the model's own fixed value is then kept).

    Raises:
        ValueError: a key is missing, a key is left unconverted, or the blocks' embedders differ.
    """
    remaining = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise ValueError(f"diffusers DiT state dict lacks {key!r} (wrong depth={depth}, or not a DiT?)")
        return remaining.pop(key)

    for src, dst in _TOP_LEVEL.items():
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = take(f"{src}.{suffix}")

    for i in range(depth):
        prefix = f"transformer_blocks.{i}."
        # One shared conditioning embedder: block 0's copy is the one diffusers' final layer uses.
        embedder_keys = [f"{src}.{suffix}" for src in _SHARED_EMBEDDER for suffix in ("weight", "bias")]
        embedder_keys.append(_LABEL_TABLE)
        for key in embedder_keys:
            tensor = take(prefix + key)
            if i == 0:
                out[_embedder_target(key)] = tensor
            elif not torch.equal(tensor, out[_embedder_target(key)]):
                raise ValueError(
                    f"diffusers block {i} has its own {key} that differs from block 0's; DiT shares one "
                    "conditioning embedder, so this model cannot be converted without changing it"
                )
        for src, dst in _PER_BLOCK.items():
            for suffix in ("weight", "bias"):
                out[f"blocks.{i}.{dst}.{suffix}"] = take(f"{prefix}{src}.{suffix}")
        for suffix in ("weight", "bias"):
            q, k, v = (take(f"{prefix}attn1.to_{name}.{suffix}") for name in "qkv")
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([q, k, v], dim=0)

    if remaining:
        raise ValueError(f"unconverted diffusers keys (depth={depth} too small?): {sorted(remaining)[:8]}")
    if grid_size is not None:
        hidden_size = out["x_embedder.proj.weight"].shape[0]
        pos_embed = get_2d_sincos_pos_embed(hidden_size, grid_size, device=out["x_embedder.proj.weight"].device)
        out["pos_embed"] = pos_embed.to(out["x_embedder.proj.weight"].dtype).unsqueeze(0)
    return out


def _embedder_target(key: str) -> str:
    if key == _LABEL_TABLE:
        return "y_embedder.embedding_table.weight"
    src, suffix = key.rsplit(".", 1)
    return f"{_SHARED_EMBEDDER[src]}.{suffix}"
