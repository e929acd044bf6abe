"""The class-conditional Diffusion Transformer (DiT) backbone, written for kindbench.

The architecture follows Peebles & Xie, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748):
patchified latents, a fixed 2-D sin-cos position embedding, adaLN-Zero blocks conditioned on
timestep + class embeddings, and a final adaLN layer that predicts noise (and, with ``learn_sigma``, the
interpolation coefficients of the variance).

Module names are exactly those of the released facebookresearch/DiT checkpoints (``x_embedder.proj``,
``t_embedder.mlp.0``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``, ``blocks.N.adaLN_modulation.1``,
``final_layer.linear``, ...), so a released state dict loads with ``strict=True`` and no key map. To keep those
names the patch embedder, attention and MLP are timm's ``PatchEmbed``, ``Attention`` and ``Mlp``, as in the
original code. Methods change this model only by module surgery, never by editing this file.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn

__all__ = ["DiT", "DiTBlock", "DiTFlavour", "DIT_FLAVOURS", "parse_flavour", "build_dit", "arch_path_name",
           "get_2d_sincos_pos_embed"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample shift/scale (N, D) broadcast over the token axis of x (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                  Conditioning: timestep and class-label embedders             #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Maps scalar diffusion timesteps to vectors: fixed sinusoid (256 frequencies) then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features of (possibly fractional) timesteps t (N,) -> (N, dim), cosines first.

        Frequencies are exp(-ln(max_period) * i / half) for i in [0, half): DiT's convention (a frequency shift of 0).
        diffusers' DiT port uses ``downscale_freq_shift=1`` (divides by half - 1) instead; released DiT weights were
        trained with the convention used here, so it must not change.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The sinusoid is computed in fp32; match the MLP's dtype so a bf16/fp16 model needs no autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding table with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has one extra row, the null class, whose id is ``num_classes``. During
    training each label is replaced by the null class with probability ``dropout_prob``; ``force_drop_ids``
    (1 = drop) overrides the random choice in any mode, which is how CFG sampling asks for the unconditional branch.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null class id ``num_classes``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob <= 0:
                raise ValueError("force_drop_ids needs a null-class row: build the model with class_dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                              Transformer blocks                               #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    The conditioning vector c regresses six vectors: shift/scale/gate for the attention branch and for the MLP
    branch. The gates start at zero (see ``DiT.initialize_weights``), so every block is the identity at init.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gelu: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        # timm picks fused attention from an env var / its own config; DiT training speed and our FLOP accounting
        # both assume torch's scaled_dot_product_attention, so force it.
        self.attn.fused_attn = True
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=_gelu(gelu), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


#: The MLP's GELU: ``tanh`` is DiT's (its released weights were trained with it); ``exact`` is the erf form, which
#: differs by at most 5e-4 and runs about 3x faster on a CPU (fp32, AVX2), forward and backward: the embedded
#: suites' DiT-T models train about 13% and sample about 22% faster with it (results/benchmarks/gelu_cpu.md).
GELU_FORMS = {"tanh": "tanh", "exact": "none"}


def _gelu(form: str):
    if form not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {', '.join(GELU_FORMS)}, got {form!r}")
    return functools.partial(nn.GELU, approximate=GELU_FORMS[form])  # a partial, not a lambda: the model pickles


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a linear map from tokens to patch pixels (p * p * out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 The DiT model                                 #
#################################################################################


class DiT(nn.Module):
    """Class-conditional diffusion transformer: (x_t, t, y) -> eps (and variance coefficients with learn_sigma).

    Args:
        input_size: spatial size of the (square) input; must be divisible by ``patch_size``.
        patch_size: side of the square patches turned into tokens.
        in_channels: 4 for SD-VAE latents, 3 for pixel space.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, number of blocks, attention heads, MLP ratio.
        class_dropout_prob: label dropout for classifier-free guidance; > 0 adds the null class ``num_classes``.
        num_classes: number of real classes.
        learn_sigma: predict variance too, so ``out_channels = 2 * in_channels``.
        gelu: the MLP's GELU, ``tanh`` (DiT's) or ``exact`` (``GELU_FORMS``).
        arch: the flavour name (``"DiT-B/2"``) when built by ``build_dit``, else None.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        arch: str | None = None,
        gelu: str = "tanh",
    ):
        super().__init__()
        _check_dit_args(input_size, patch_size, in_channels, hidden_size, depth, num_heads, class_dropout_prob,
                        num_classes)
        self.arch = arch
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.gelu = gelu

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A fixed (never trained) sin-cos embedding; kept as a frozen Parameter, not a buffer, because that is
        # where released checkpoints store it (key "pos_embed").
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, gelu=gelu)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears, N(0, 0.02) embedders, and adaLN-Zero (zeroed modulation)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid_size = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, grid_size, device=self.pos_embed.device)
        self.pos_embed.data.copy_(pos_embed.to(self.pos_embed.dtype).unsqueeze(0))

        # The patch embedder is a Conv2d; initialise it like the Linear it is (fan-in over C * p * p).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero gates make each residual branch vanish, so every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) tokens -> (N, C, H, W) image, inverting the row-major patch order."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, in_channels, H, W) noisy input, t (N,) timesteps, y (N,) class ids -> (N, out_channels, H, W).

        Label dropout is applied only in train mode (or where ``force_drop_ids`` asks for it), so a model being
        trained must be in ``train()`` for classifier-free guidance to learn an unconditional branch.
        """
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guided forward on a batch laid out as [cond; uncond] halves, as DiT samples.

        The first half of ``x`` is used for both halves (the sampler keeps them equal), ``y``'s second half holds
        the null class. Guidance eps = uncond + cfg_scale * (cond - uncond) is applied to the first
        ``guide_channels`` output channels and returned for both halves; the remaining channels (the learned
        variance) are passed through. ``None`` guides all ``in_channels`` eps channels. DiT's release guides only
        the first 3 channels, a quirk kept for exact parity with its JAX model: pass ``guide_channels=3`` to
        reproduce it.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch ([cond; uncond]); got {x.shape[0]}")
        guide = self.in_channels if guide_channels is None else guide_channels
        if not 1 <= guide <= self.in_channels:
            raise ValueError(f"guide_channels must be in [1, {self.in_channels}] (the eps channels); got {guide}")
        half = x[: x.shape[0] // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :guide], model_out[:, guide:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


def _check_dit_args(input_size, patch_size, in_channels, hidden_size, depth, num_heads, class_dropout_prob,
                    num_classes) -> None:
    for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"DiT {name} must be a positive int; got {value!r}")
    if input_size % patch_size:
        raise ValueError(f"DiT input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"DiT hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
    if not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"DiT class_dropout_prob must be in [0, 1]; got {class_dropout_prob}")


#################################################################################
#                        Fixed 2-D sin-cos position embedding                   #
#################################################################################


def get_1d_sincos_pos_embed(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sines of the dim/2 frequencies 1/10000^(2i/dim), then cosines."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_size**2, dim) float32 embedding for a row-major grid of patches.

    Half the channels encode the column index and half the row index. DiT builds the grid with numpy's
    ``meshgrid(w, h)`` and puts its first plane, the column index, in the first half; we keep that order because
    released checkpoints were trained with it. Computed in float64 and rounded once, as DiT's numpy code is.
    """
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_cols = get_1d_sincos_pos_embed(dim // 2, cols.reshape(-1))
    emb_rows = get_1d_sincos_pos_embed(dim // 2, rows.reshape(-1))
    return torch.cat([emb_cols, emb_rows], dim=1).float()


#################################################################################
#                             Flavours and factory                              #
#################################################################################


class DiTFlavour(NamedTuple):
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int


def _sizes(prefix: str, depth: int, hidden_size: int, num_heads: int, patches=(2, 4, 8)) -> dict[str, DiTFlavour]:
    return {f"DiT-{prefix}/{p}": DiTFlavour(depth, hidden_size, p, num_heads) for p in patches}


DIT_FLAVOURS: dict[str, DiTFlavour] = {
    # The paper's sizes (DiT Table 1).
    **_sizes("XL", 28, 1152, 16),
    **_sizes("L", 24, 1024, 16),
    **_sizes("B", 12, 768, 12),
    **_sizes("S", 12, 384, 6),
    # Debug sizes for CPU tests and the tiny suite: T(iny) for unit tests, M(ini) for minutes-long CPU runs.
    **_sizes("T", 2, 64, 4, patches=(2, 4)),
    **_sizes("M", 6, 192, 6, patches=(2, 4)),
}


_VARIANT = re.compile(r"^(?P<base>DiT-[A-Z]+/\d+)(?:-d(?P<depth>\d+))?(?:-w(?P<width>\d+))?$")


def parse_flavour(arch: str) -> DiTFlavour:
    """A named flavour, or a depth/width variant of one: ``"DiT-B/2-d6"`` (6 blocks), ``"DiT-S/2-w256"`` (width
    256, heads of the base flavour's head size), ``"DiT-B/2-d6-w512"``. Variants exist for the size-transfer
    baselines (FINE, WAVE, TLEG, ...), whose descendants have other depths and widths than their ancestries."""
    match = _VARIANT.match(arch) if isinstance(arch, str) else None
    base = DIT_FLAVOURS.get(match["base"]) if match else None
    if base is None:
        raise ValueError(f"unknown DiT flavour {arch!r}; valid names: {', '.join(DIT_FLAVOURS)}, optionally with "
                         f"a depth/width suffix such as 'DiT-B/2-d6' or 'DiT-B/2-d6-w512'")
    depth = int(match["depth"]) if match["depth"] else base.depth
    width = int(match["width"]) if match["width"] else base.hidden_size
    head_size = base.hidden_size // base.num_heads
    if depth < 1 or width < head_size or width % head_size:
        raise ValueError(f"DiT variant {arch!r}: depth must be >= 1 and width a positive multiple of the head size "
                         f"{head_size}")
    heads = width // head_size
    return DiTFlavour(depth, width, base.patch_size, heads)


def build_dit(
    arch: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    gelu: str = "tanh",
    device: torch.device | str | None = None,
) -> DiT:
    """Build a DiT of a named flavour (``"DiT-B/2"``, debug ``"DiT-T/2"``, ...), randomly initialised as DiT does.

    ``device="meta"`` builds the structure without allocating weights (for FLOP/parameter accounting of
    large flavours); any other device creates the weights there directly.
    """
    flavour = parse_flavour(arch)
    context = torch.device(device) if device is not None else contextlib.nullcontext()
    with context:
        return DiT(
            input_size=input_size,
            patch_size=flavour.patch_size,
            in_channels=in_channels,
            hidden_size=flavour.hidden_size,
            depth=flavour.depth,
            num_heads=flavour.num_heads,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            arch=arch,
            gelu=gelu,
        )


def arch_path_name(arch: str) -> str:
    """Flavour name as used in paths and run ids: ``"DiT-B/2"`` -> ``"DiT-B-2"``."""
    parse_flavour(arch)
    return arch.replace("/", "-")
