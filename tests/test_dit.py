"""Tests for bench/models/dit.py: released key layout, parity with diffusers, CFG, label dropout, adaLN-Zero."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from bench.models.convert_diffusers import dit_state_dict_from_diffusers
from bench.models.dit import DIT_FLAVOURS, DiT, arch_path_name, build_dit

# Small config shared by the diffusers parity tests: 2 layers, 4 heads x 16, patch 2, 8x8x4 latents, 10 classes.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny_dit(**overrides) -> DiT:
    return DiT(**{**TINY, **overrides})


def inputs(batch: int = 3, channels: int = 4, size: int = 8, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, t, y


def randomise_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Overwrite every trainable parameter with noise, so zero-initialised paths (adaLN-Zero) are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


# --------------------------------------------------------------------------------------------------------------------
# Released checkpoint layout
# --------------------------------------------------------------------------------------------------------------------


def released_dit_keys(depth: int, hidden: int, patch: int, in_ch: int, out_ch: int, classes: int, tokens: int):
    """Key -> shape of a facebookresearch/DiT checkpoint, written out from the released layout (not from our model)."""
    d = hidden
    keys = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_ch, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (patch * patch * out_ch, d),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        keys.update({
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
            f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
            f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    return keys


def test_released_state_dict_loads_strict():
    model = tiny_dit()
    expected = released_dit_keys(depth=2, hidden=64, patch=2, in_ch=4, out_ch=8, classes=10, tokens=16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    gen = torch.Generator().manual_seed(1)
    released = {k: torch.randn(shape, generator=gen) for k, shape in expected.items()}
    model.load_state_dict(released, strict=True)
    assert torch.equal(model.blocks[1].attn.qkv.weight, released["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.y_embedder.embedding_table.weight, released["y_embedder.embedding_table.weight"])


def test_xl2_layout_on_meta_matches_release():
    model = build_dit("DiT-XL/2", device="meta")
    expected = released_dit_keys(depth=28, hidden=1152, patch=2, in_ch=4, out_ch=8, classes=1000, tokens=256)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert all(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Parity with diffusers' independent DiT implementation
# --------------------------------------------------------------------------------------------------------------------


def diffusers_dit(norm_eps: float = 1e-6):
    from diffusers import DiTTransformer2DModel

    # norm_eps=1e-6: diffusers' default (1e-5) is used for the MLP-branch LayerNorm (its `norm3`), while DiT uses
    # 1e-6 everywhere; the attention-branch and final norms are hard-coded to 1e-6 in diffusers.
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps,
    )


def share_block0_embedder_(ref) -> None:
    """diffusers keeps a timestep/label embedder in EVERY block (and the final layer uses block 0's); DiT has one.

    The official DiT -> diffusers conversion copies DiT's single embedder into each block, so released diffusers
    DiT weights have identical copies. A randomly initialised diffusers model does not, so copy block 0's in.
    """
    emb0 = ref.transformer_blocks[0].norm1.emb
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0.state_dict())


def use_dit_sinusoid_(ref) -> None:
    """diffusers' CombinedTimestepLabelEmbeddings uses Timesteps(downscale_freq_shift=1): frequencies
    exp(-ln(1e4) * i / (half - 1)); DiT uses exp(-ln(1e4) * i / half) (shift 0). Our DiT keeps DiT's convention
    because released DiT checkpoints were trained with it, so switch the diffusers module to it for the comparison."""
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def converted_pair(norm_eps: float = 1e-6, fix_sinusoid: bool = True):
    torch.manual_seed(0)
    ref = diffusers_dit(norm_eps)
    randomise_(ref)
    share_block0_embedder_(ref)
    if fix_sinusoid:
        use_dit_sinusoid_(ref)
    ours = tiny_dit()
    ours.load_state_dict(dit_state_dict_from_diffusers(ref.state_dict(), depth=2, grid_size=4), strict=True)
    return ours.eval(), ref.eval()


@torch.no_grad()
def max_diff(ours, ref, seed: int = 0) -> float:
    x, t, y = inputs(seed=seed)
    return (ours(x, t, y) - ref(x, timestep=t, class_labels=y).sample).abs().max().item()


def test_matches_diffusers_dit_fp32():
    ours, ref = converted_pair()
    x, t, y = inputs()
    with torch.no_grad():
        out = ours(x, t, y)
    assert out.abs().max() > 0.1  # random weights everywhere: the comparison is not between two zero outputs
    assert max_diff(ours, ref) <= 1e-5
    # position embedding: diffusers computes its own sin-cos table (a buffer it does not save)
    assert torch.allclose(ours.pos_embed[0], ref.pos_embed.pos_embed[0], atol=1e-6)


def test_diffusers_traps_are_real():
    """Each documented difference changes the output well beyond the parity tolerance if left in place."""
    ours, ref = converted_pair(fix_sinusoid=False)
    assert max_diff(ours, ref) > 1e-3  # diffusers' frequency shift 1 != DiT's shift 0
    ours, ref = converted_pair(norm_eps=1e-5)
    assert max_diff(ours, ref) > 1e-5  # LayerNorm eps 1e-5 != DiT's 1e-6


def test_converter_refuses_unshared_embedders():
    torch.manual_seed(0)
    ref = diffusers_dit()
    randomise_(ref)
    with pytest.raises(ValueError, match="block 1 has its own"):
        dit_state_dict_from_diffusers(ref.state_dict(), depth=2)


def test_converter_reports_missing_and_leftover_keys():
    torch.manual_seed(0)
    ref = diffusers_dit()
    share_block0_embedder_(ref)
    with pytest.raises(ValueError, match="unconverted diffusers keys"):
        dit_state_dict_from_diffusers(ref.state_dict(), depth=1)
    with pytest.raises(ValueError, match="lacks 'transformer_blocks.2"):
        dit_state_dict_from_diffusers(ref.state_dict(), depth=3)


# --------------------------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes(in_channels, learn_sigma):
    model = build_dit("DiT-T/4", input_size=16, in_channels=in_channels, num_classes=7, learn_sigma=learn_sigma)
    x, t, y = inputs(batch=2, channels=in_channels, size=16, num_classes=7)
    out = model(x, t, y)
    expected_channels = 2 * in_channels if learn_sigma else in_channels
    assert model.out_channels == expected_channels
    assert out.shape == (2, expected_channels, 16, 16)
    assert (model.arch, model.in_channels, model.input_size, model.patch_size) == ("DiT-T/4", in_channels, 16, 4)
    assert (model.hidden_size, model.depth, model.num_heads, model.num_classes) == (64, 2, 4, 7)
    assert model.learn_sigma is learn_sigma


def test_unpatchify_inverts_patch_order():
    """Token (row r, col c) must land at pixels [r*p:(r+1)*p, c*p:(c+1)*p]: compare with a pixel-level reference."""
    model = tiny_dit(learn_sigma=False)
    p, c, grid = 2, 4, 4
    image = torch.randn(1, c, 8, 8)
    # Patchify by hand: tokens row-major, each token's vector laid out (p, q, channel).
    tokens = image.reshape(1, c, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(1, grid * grid, p * p * c)
    assert torch.equal(model.unpatchify(tokens), image)


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_forward_equals_manual_combination(guide_channels):
    model = tiny_dit().eval()
    randomise_(model)
    x, t, y = inputs(batch=2)
    null = torch.full_like(y, 10)
    scale = 4.0
    with torch.no_grad():
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), scale,
                                        guide_channels=guide_channels)
        cond, uncond = model(x, t, y), model(x, t, null)
    k = 4 if guide_channels is None else guide_channels
    expected_eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    assert guided.shape == (4, 8, 8, 8)
    torch.testing.assert_close(guided[:2, :k], expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[2:, :k], expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:2, k:], cond[:, k:], atol=1e-5, rtol=1e-5)  # unguided channels pass through
    assert not torch.allclose(cond[:, :k], uncond[:, :k])  # guidance actually mattered


def test_cfg_rejects_bad_arguments():
    model = tiny_dit().eval()
    x, t, y = inputs(batch=3)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x, t, y, 1.5)
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x[:2], t[:2], y[:2], 1.5, guide_channels=5)


def test_label_dropout_only_in_train_mode():
    embedder = tiny_dit(class_dropout_prob=0.5).y_embedder
    labels = torch.randint(0, 10, (4000,))
    table = embedder.embedding_table.weight
    null_row = table[10]

    torch.manual_seed(0)
    train_out = embedder(labels, train=True)
    dropped = (train_out == null_row).all(dim=1)
    assert 0.45 < dropped.float().mean().item() < 0.55
    assert torch.equal(train_out[~dropped], table[labels[~dropped]])

    assert torch.equal(embedder(labels, train=False), table[labels])
    force = torch.zeros_like(labels)
    force[:5] = 1
    forced = embedder(labels, train=False, force_drop_ids=force)
    assert (forced[:5] == null_row).all() and torch.equal(forced[5:], table[labels[5:]])


def test_model_train_mode_drops_labels_eval_does_not():
    model = tiny_dit(class_dropout_prob=1.0)
    randomise_(model)
    x, t, _ = inputs(batch=2)
    y_a, y_b = torch.tensor([1, 2]), torch.tensor([7, 8])
    with torch.no_grad():
        model.train()
        assert torch.equal(model(x, t, y_a), model(x, t, y_b))  # every label dropped to the null class
        model.eval()
        assert not torch.allclose(model(x, t, y_a), model(x, t, y_b))


def test_null_class_row_only_with_dropout():
    assert tiny_dit(class_dropout_prob=0.1).y_embedder.embedding_table.num_embeddings == 11
    no_cfg = tiny_dit(class_dropout_prob=0.0)
    assert no_cfg.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        no_cfg(*inputs(batch=1), force_drop_ids=torch.ones(1, dtype=torch.long))


def test_adaln_zero_blocks_are_identity_at_init():
    model = tiny_dit()
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(model(*inputs()), torch.zeros(3, 8, 8, 8))  # zero final layer
    randomise_(model)
    assert not torch.allclose(model.blocks[0](x, c), x)


def test_timestep_embedding_is_dits_convention():
    emb = build_dit("DiT-T/2").t_embedder.timestep_embedding(torch.tensor([0.0, 10.0]), 256)
    half = 128
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    torch.testing.assert_close(emb[1, :half], torch.cos(10.0 * freqs))
    torch.testing.assert_close(emb[1, half:], torch.sin(10.0 * freqs))
    assert torch.equal(emb[0, :half], torch.ones(half)) and torch.equal(emb[0, half:], torch.zeros(half))


def test_pos_embed_is_frozen_sincos_and_trainable_rest_learns():
    model = tiny_dit()
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.abs().max() <= 1.0 and model.pos_embed.abs().sum() > 0
    out = model(*inputs())
    (out - torch.ones_like(out)).square().mean().backward()
    assert model.pos_embed.grad is None
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_attention_goes_through_sdpa(monkeypatch):
    import timm.layers.config

    # Even with timm's global fused-attention switch off, our blocks use torch's SDPA.
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    model = tiny_dit()
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model(*inputs(batch=2))
    assert calls == [torch.Size([2, 4, 16, 16])] * 2  # (batch, heads, tokens, head_dim), once per block


# --------------------------------------------------------------------------------------------------------------------
# Flavours and factory
# --------------------------------------------------------------------------------------------------------------------


def test_paper_flavours():
    # DiT paper Table 1: (depth, width, heads) per size, patch 2/4/8.
    paper = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, width, heads) in paper.items():
        for patch in (2, 4, 8):
            assert DIT_FLAVOURS[f"DiT-{size}/{patch}"] == (depth, width, patch, heads)
    assert DIT_FLAVOURS["DiT-T/2"] == (2, 64, 2, 4) and DIT_FLAVOURS["DiT-M/4"] == (6, 192, 4, 6)


def test_build_on_meta_allocates_nothing():
    model = build_dit("DiT-L/2", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.arch == "DiT-L/2" and model.depth == 24


def test_bad_flavour_and_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown DiT flavour 'DiT-Q/2'; valid names: DiT-XL/2, .*DiT-T/2"):
        build_dit("DiT-Q/2")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build_dit("DiT-T/4", input_size=10)
    with pytest.raises(ValueError, match="unknown DiT flavour"):
        arch_path_name("DiT-B-2")


def test_arch_path_name():
    assert arch_path_name("DiT-B/2") == "DiT-B-2"
    assert arch_path_name("DiT-XL/8") == "DiT-XL-8"


def test_depth_and_width_variants_parse_and_build():
    from bench.models.dit import parse_flavour

    assert parse_flavour("DiT-B/2-d6") == (6, 768, 2, 12)
    assert parse_flavour("DiT-B/2-d6-w512") == (6, 512, 2, 8)  # head size 64 kept
    model = build_dit("DiT-T/2-d3-w96", input_size=8, in_channels=3, num_classes=5)
    assert len(model.blocks) == 3 and model.x_embedder.proj.out_channels == 96
    for bad in ("DiT-B/2-d0", "DiT-B/2-w100", "DiT-Q/2-d3", "DiT-B/2-x3"):
        with pytest.raises(ValueError, match="DiT"):
            parse_flavour(bad)
