import math

import pytest
import torch

from model import SIZES, VisionTransformer, relative_position_index, resize_rel_pos_table, vit


@pytest.mark.parametrize("size", list(SIZES))
def test_output_shapes_for_every_size(size):
    torch.manual_seed(0)
    width = SIZES[size]["embed_dim"]
    images = torch.randn(2, 3, 32, 32)
    pretrain = vit(size, img_size=32, patch_size=16, mask_token=True, out_dim=512).eval()
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    with torch.no_grad():
        assert pretrain(images, mask).shape == (2, 4, 512)
        tokens, feats = pretrain.forward_blocks(images, out_indices=(0, 3))
    assert tokens.shape == (2, 5, width) and [f.shape for f in feats] == [(2, 4, width)] * 2
    classifier = vit(size, img_size=32, patch_size=16, num_classes=7, shared_rel_pos=False).eval()
    with torch.no_grad():
        assert classifier(images).shape == (2, 7)
    assert len(pretrain.blocks) == SIZES[size]["depth"]
    assert pretrain.blocks[0].gamma_1[0].item() == pytest.approx(SIZES[size]["layer_scale"])


def test_mask_token_appears_exactly_at_masked_positions():
    torch.manual_seed(1)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=0, num_heads=2, mask_token=True, out_dim=4)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.4
    tokens, _ = net.forward_blocks(images, mask)  # depth 0: the tokens as they enter the first block
    patches = net.patch_embed(images).flatten(2).transpose(1, 2)
    for b in range(2):
        for i in range(16):
            expected = net.mask_token[0, 0] if mask[b, i] else patches[b, i]
            assert torch.equal(tokens[b, 1 + i], expected)
        assert torch.equal(tokens[b, 0], net.cls_token[0, 0])


def test_masking_changes_only_the_prediction_inputs():
    torch.manual_seed(2)
    net = vit("tiny", img_size=32, patch_size=8, depth=2, mask_token=True, out_dim=8).eval()
    images = torch.randn(1, 3, 32, 32)
    none = torch.zeros(1, 16, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(net(images, none), net(images))
        assert not torch.allclose(net(images, ~none), net(images))


def test_relative_position_index_matches_brute_force():
    H, W = 3, 4
    index = relative_position_index((H, W))
    n_rel = (2 * H - 1) * (2 * W - 1)
    coords = [(y, x) for y in range(H) for x in range(W)]
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            assert index[i + 1, j + 1] == (yi - yj + H - 1) * (2 * W - 1) + (xi - xj + W - 1)
    assert (index[0, 1:] == n_rel).all() and (index[1:, 0] == n_rel + 1).all() and index[0, 0] == n_rel + 2


def test_rel_pos_resize_is_identity_at_the_same_size():
    table = torch.randn(27 * 27 + 3, 4)
    assert torch.equal(resize_rel_pos_table(table, (14, 14), (14, 14)), table)


def test_rel_pos_resize_is_bicubic_per_head_and_keeps_class_entries():
    """Each head's (2h-1)x(2w-1) table resized by a bicubic written out in NumPy (conftest.bicubic_by_hand), a
    non-square grid so that rows and columns cannot be swapped; the 3 class-token entries kept as they were."""
    from conftest import bicubic_by_hand
    torch.manual_seed(0)
    (h, w), (H, W), heads = (3, 4), (5, 7), 2
    table = torch.randn((2 * h - 1) * (2 * w - 1) + 3, heads)
    out = resize_rel_pos_table(table, (h, w), (H, W))
    assert out.shape == ((2 * H - 1) * (2 * W - 1) + 3, heads)
    assert torch.equal(out[-3:], table[-3:])
    tables = table[:-3].view(2 * h - 1, 2 * w - 1, heads).numpy()  # row-major offsets, heads last
    expected = bicubic_by_hand(tables, 2 * H - 1, 2 * W - 1).reshape(-1, heads)
    torch.testing.assert_close(out[:-3], torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)


def test_abs_pos_embed_resize_is_bicubic_and_keeps_the_class_entry():
    from conftest import bicubic_by_hand
    from model import resize_abs_pos_embed
    torch.manual_seed(1)
    pos = torch.randn(1, 1 + 4 * 4, 3)
    out = resize_abs_pos_embed(pos, (6, 6))
    assert out.shape == (1, 1 + 36, 3) and torch.equal(out[:, 0], pos[:, 0])
    expected = bicubic_by_hand(pos[0, 1:].view(4, 4, 3).numpy(), 6, 6).reshape(1, 36, 3)
    torch.testing.assert_close(out[:, 1:], torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)


def manual_bias(table, grid):
    """The obvious gather: bias[h, i, j] = table[index[i, j], h]."""
    return table[relative_position_index(grid)].permute(2, 0, 1)


def manual_attention(attn, x, bias, heads):
    """Softmax attention written out, BEiT's q and v biases (no k bias), the relative bias on the logits."""
    B, N, C = x.shape
    q, k, v = (x @ attn.qkv.weight.T).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias
    split = lambda t: t.view(B, N, heads, C // heads).transpose(1, 2)
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // heads) + bias
    return attn.proj((logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, N, C))


def test_attention_matches_a_manual_softmax_with_relative_bias():
    torch.manual_seed(3)
    net = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, out_dim=4)
    attn = net.blocks[0].attn
    for table in (net.rel_pos.table, attn.rel_pos.table, attn.q_bias, attn.v_bias):
        torch.nn.init.normal_(table)
    x = torch.randn(2, 5, 8)
    bias = manual_bias(net.rel_pos.table, net.grid) + manual_bias(attn.rel_pos.table, net.grid)
    expected = manual_attention(attn, x, bias, 2)
    torch.testing.assert_close(attn(x, net.attention_biases(x.dtype)[0]), expected)


@pytest.mark.parametrize("shared,own", [(True, True), (False, True), (True, False), (False, False)])
def test_whole_model_matches_a_manual_forward(shared, own):
    """Every block's bias (built once per forward, padded and sliced) equals the shared table's gather plus
    the block's own, in a whole forward with a mask token, against a block loop written out by hand."""
    torch.manual_seed(6)
    net = VisionTransformer(img_size=24, patch_size=8, embed_dim=16, depth=3, num_heads=2, mask_token=True,
                            out_dim=4, shared_rel_pos=shared, block_rel_pos=own).eval()
    for name, p in net.named_parameters():
        if "rel_pos" in name or name.endswith(("q_bias", "v_bias")):
            torch.nn.init.normal_(p)
    images, mask = torch.randn(2, 3, 24, 24), torch.rand(2, 9) < 0.5
    x = net.patch_embed(images).flatten(2).transpose(1, 2)
    x = torch.where(mask[..., None], net.mask_token, x)
    x = torch.cat([net.cls_token.expand(2, -1, -1), x], dim=1)
    for block in net.blocks:
        bias = torch.zeros(2, 10, 10)
        if shared:
            bias = bias + manual_bias(net.rel_pos.table, net.grid)
        if own:
            bias = bias + manual_bias(block.attn.rel_pos.table, net.grid)
        x = x + block.gamma_1 * manual_attention(block.attn, block.norm1(x), bias, 2)
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    expected = net.lm_head(net.norm(x[:, 1:]))
    with torch.no_grad():
        torch.testing.assert_close(net(images, mask), expected)


def test_init_rescales_output_projections_by_depth():
    torch.manual_seed(4)
    net = vit("small", img_size=32, depth=6)
    stds = [b.attn.proj.weight.std().item() * math.sqrt(2 * (i + 1)) for i, b in enumerate(net.blocks)]
    # trunc_normal(0.02) cut at +-1 std (as BEiT v2): std = 0.02 * 0.5399 (a unit normal cut at +-1)
    assert all(abs(s - 0.0108) < 0.001 for s in stds), stds
    assert net.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.0108, abs=0.0005)
    w = net.blocks[0].mlp.fc1.weight
    assert w.abs().max().item() <= 0.02
    # Shape of the cut normal: P(|z| < 1/2 given |z| < 1) = (2 Phi(1/2) - 1) / (2 Phi(1) - 1) = 0.5609
    assert (w.abs() < 0.01).float().mean().item() == pytest.approx(0.5609, abs=0.005)


def test_layer_ids():
    net = vit("tiny", img_size=32, depth=3, mask_token=True, out_dim=4)
    ids = {name: net.layer_id(name) for name, _ in net.named_parameters()}
    assert ids["cls_token"] == ids["mask_token"] == ids["patch_embed.weight"] == ids["rel_pos.table"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["norm.weight"] == ids["lm_head.weight"] == 4


def test_drop_path_keeps_whole_samples_scaled_by_one_over_keep_probability():
    """Stochastic depth by hand: each sample's branch is either 0 or the branch / (1 - p), as a whole; about
    1 - p of them are kept; so the mean is unchanged. Identity in eval mode and at p = 0."""
    from model import drop_path
    torch.manual_seed(5)
    x = torch.arange(1, 4001.0).view(4000, 1, 1).expand(4000, 3, 2)
    out = drop_path(x, 0.25, training=True)
    kept = out[:, 0, 0] != 0
    torch.testing.assert_close(out[kept], x[kept] * 4 / 3)  # 1 / (1 - 0.25)
    assert (out[~kept] == 0).all()
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x) and torch.equal(drop_path(x, 0.0, training=True), x)
    net = vit("tiny", img_size=32, depth=2, drop_path=0.5, out_dim=4).eval()
    images = torch.randn(8, 3, 32, 32)
    assert torch.equal(net(images), net(images))


def test_unknown_size_and_mask_without_token_are_errors():
    with pytest.raises(ValueError, match="huge"):
        vit("huge")
    net = vit("tiny", img_size=32, depth=1)
    with pytest.raises(ValueError, match="mask_token=True"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.bool))


def fused_kernel_ready(mask, q):
    """What PyTorch's memory-efficient (and cuDNN) attention needs of an additive mask to use it without a
    copy or a fallback to the math path (aten/src/ATen/native/transformers: preprocess_mask, aligned_tensor):
    4-D, broadcastable to [B, heads, N, N], the queries' dtype, last dimension contiguous, every other
    stride and the start aligned to 8 elements (16 for the strictest builds)."""
    B, heads, N, _ = q.shape
    return (mask.dim() == 4 and mask.shape[0] in (1, B) and tuple(mask.shape[1:]) == (heads, N, N)
            and mask.dtype == q.dtype and mask.stride(-1) == 1
            and all(s % 16 == 0 for s in mask.stride()[:-1]) and mask.storage_offset() % 16 == 0)


@pytest.mark.parametrize("use", ["pretrain", "finetune", "resized", "bf16"])
def test_the_bias_handed_to_sdpa_fits_the_fused_kernels(use, monkeypatch):
    """The masks SDPA receives, in pre-training (mask token, shared + own tables), fine-tuning (own tables),
    a grid other than the checkpoint's (tables resized on load, as segmentation does) and bf16 autocast,
    forward and backward: the layout the fused GPU kernels accept (the GPU test checks the kernels)."""
    import torch.nn.functional as F
    from model import load_backbone
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(fused_kernel_ready(attn_mask, q))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(7)
    small = dict(patch_size=8, embed_dim=16, depth=2, num_heads=2)
    mask = None
    if use == "pretrain":
        net = VisionTransformer(img_size=32, **small, mask_token=True, out_dim=4)
        mask = torch.rand(2, 16) < 0.5
    elif use == "resized":  # a 4x4-grid checkpoint into a 5x5-grid backbone: 26 tokens, rows padded to 32
        pre = VisionTransformer(img_size=32, **small, mask_token=True, out_dim=4)
        ckpt = {"model": pre.state_dict(), "model_args": dict(img_size=32, **small)}
        net = VisionTransformer(img_size=40, **small, shared_rel_pos=False)
        load_backbone(net, ckpt, log=lambda *_: None)
    else:
        net = VisionTransformer(img_size=32, **small, num_classes=5, shared_rel_pos=False)
    images = torch.randn(2, 3, net.img_size, net.img_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use == "bf16"):
        out = net(images, mask)
    out.float().square().mean().backward()
    assert len(seen) == 2 and all(seen)
    assert all(p.grad is not None for n, p in net.named_parameters() if "rel_pos" in n)
