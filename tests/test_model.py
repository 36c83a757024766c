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


def test_rel_pos_resize_keeps_class_entries_and_interpolates_smooth_tables():
    h, H = 4, 8
    # A table linear in the relative offset stays linear in the offset (up to the stretch) after bicubic.
    dy, dx = torch.meshgrid(torch.arange(2 * h - 1.0), torch.arange(2 * h - 1.0), indexing="ij")
    table = torch.cat([torch.stack([dy.flatten(), dx.flatten()], 1), torch.tensor([[7.0, 8.0]] * 3)])
    out = resize_rel_pos_table(table, (h, h), (H, H))
    assert out.shape == ((2 * H - 1) ** 2 + 3, 2)
    assert torch.equal(out[-3:], table[-3:])
    grid = out[:-3, 0].view(2 * H - 1, 2 * H - 1)
    assert torch.allclose(grid[:, 0], grid[:, -1])  # head 0 depends on rows only
    assert (grid[1:, 0] > grid[:-1, 0] - 1e-5).all()  # and grows with them
    assert grid[0, 0] < 0.5 and grid[-1, 0] > 2 * h - 2 - 0.5  # spans the old range


def test_attention_matches_a_manual_softmax_with_relative_bias():
    torch.manual_seed(3)
    net = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, out_dim=4)
    attn = net.blocks[0].attn
    for table in (net.rel_pos.table, attn.rel_pos.table, attn.q_bias, attn.v_bias):
        torch.nn.init.normal_(table)
    x = torch.randn(2, 5, 8)
    q, k, v = (x @ attn.qkv.weight.T).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias
    bias = net.rel_pos() + attn.rel_pos()
    heads = lambda t: t.view(2, 5, 2, 4).transpose(1, 2)
    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4) + bias
    expected = attn.proj((logits.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x, net.rel_pos()), expected)


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


def test_drop_path_is_identity_in_eval_and_random_in_train():
    torch.manual_seed(5)
    net = vit("tiny", img_size=32, depth=2, drop_path=0.5, out_dim=4)
    x = torch.randn(8, 3, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_unknown_size_and_mask_without_token_are_errors():
    with pytest.raises(ValueError, match="huge"):
        vit("huge")
    net = vit("tiny", img_size=32, depth=1)
    with pytest.raises(ValueError, match="mask_token=True"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.bool))
