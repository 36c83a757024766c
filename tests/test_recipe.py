"""The official DTM / BEiT v2 recipe on the points where a reimplementation easily drifts: which parameters get
weight decay, the mask count, the pre-training augmentation order, the classifier head init and the warm-up.
Each expectation is written out here from the official code, not taken from ours."""
import math
import random

import numpy as np
import pytest
import torch

import common
import data
import finetune
from configurator import settings
from model import VisionTransformer


# ------------------------------------------------------------------------------------------- weight decay
# The official rule (optim_factory.get_parameter_groups with the model's no_weight_decay()): no decay when
# param.ndim <= 1, or the name ends in ".bias", or the name is "pos_embed" or "cls_token"; decay otherwise.
# So the mask token (1, 1, D) and every relative position table (rows, heads) ARE decayed.
def _decayed(net, weight_decay=0.05):
    name_of = {id(p): name for name, p in net.named_parameters()}
    return {name_of[id(p)] for g in common.param_groups(net, weight_decay) for p in g["params"] if g["weight_decay"] > 0}


def test_pretraining_weight_decay_is_the_official_set():
    net = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, abs_pos=True,
                            shared_rel_pos=True, block_rel_pos=True, mask_token=True, out_dim=4)
    block = ["attn.qkv.weight", "attn.proj.weight", "attn.rel_pos.table", "mlp.fc1.weight", "mlp.fc2.weight"]
    expected = {"mask_token", "patch_embed.weight", "rel_pos.table", "lm_head.weight"} | {
        f"blocks.{i}.{n}" for i in range(2) for n in block}
    assert _decayed(net) == expected
    names = {n for n, _ in net.named_parameters()}
    assert {"pos_embed", "cls_token"} <= names - expected  # the two the official models exempt by name


def test_finetuning_weight_decay_is_the_official_set():
    net = finetune.build_model(finetune.model_args(settings(finetune, model="tiny", depth=2, img_size=16,
                                                                     patch_size=8), 3), None, 0.001)
    block = ["attn.qkv.weight", "attn.proj.weight", "attn.rel_pos.table", "mlp.fc1.weight", "mlp.fc2.weight"]
    expected = {"patch_embed.weight", "head.weight"} | {f"blocks.{i}.{n}" for i in range(2) for n in block}
    assert _decayed(net) == expected
    assert "cls_token" in {n for n, _ in net.named_parameters()} - expected


# -------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid, num_masked, min_block", [(14, 75, 16), (8, 26, 4), (4, 6, 2), (14, 118, 16)])
def test_every_mask_has_exactly_num_masked(grid, num_masked, min_block):
    random.seed(0)
    masking = data.BlockMasking(grid, num_masked, min_block)
    counts = {int(masking().sum()) for _ in range(2000)}
    assert counts == {num_masked}


def test_masks_are_still_mostly_blocks():
    random.seed(1)
    masking = data.BlockMasking(14, 75, 16)
    for _ in range(20):
        mask = masking().view(14, 14)
        padded = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
        neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        assert ((neighbours > 0) & mask).sum() >= 0.8 * mask.sum()  # the top-up adds only a few single patches


# ------------------------------------------------------------------------------------------- augmentation
def test_pretraining_augmentation_order_is_jitter_flip_crop():
    """The official pipeline, Compose([ColorJitter(0.4, 0.4, 0.4), RandomHorizontalFlip(), RandomResizedCrop(S,
    scale 0.2-1, bicubic)]) of torchvision v1 on the PIL image, from the same seed: the worker draws ColorJitter's
    op order and factors first, then the flip, then the box (the same values), and its crop followed by the
    device's jitter is the official image up to rounding: 0.45 grey levels on average, 0.62 at most, measured on
    these smooth, asymmetric images (a box not mirrored under the flip would show)."""
    from PIL import Image
    from torchvision import transforms as T
    size = 32
    official = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(),
                          T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)])
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:60, 0:90]
    images = [Image.fromarray(np.clip(np.stack([x * 2 + rng.uniform(0, 60), y * 3 + rng.uniform(0, 60),
                                               250 - x * y / 30], -1) + rng.normal(0, 4, (60, 90, 3)), 0, 255)
                              .astype(np.uint8)) for _ in range(40)]
    dataset = data.MaskedImages([(image, 0) for image in images], size, data.BlockMasking(2, 1, 1))
    ours, theirs, flips = [], [], 0
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        crop, _, jitter = dataset[seed]
        ours.append(data.color_jitter(crop[None], jitter[None])[0])
        torch.manual_seed(seed)  # the official draws, one by one, in the official order
        order, b, c, s, _ = T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], None)
        flips += torch.rand(1).item() < 0.5
        assert jitter[:3].tolist() == [op for op in order.tolist() if op != 3]
        assert jitter[3:6].tolist() == pytest.approx([b, c, s], abs=0)
        torch.manual_seed(seed)
        theirs.append(torch.from_numpy(np.asarray(official(image)).copy()).permute(2, 0, 1))
    diff = (torch.stack(ours).float() - torch.stack(theirs).float()).abs().mean(dim=(1, 2, 3))
    assert 5 < flips < 35
    assert diff.mean() < 1.0 and diff.max() < 1.5, diff


def test_contrast_jitter_uses_the_whole_image_mean(monkeypatch):
    """Jitter before the crop: a crop of one flat colour is pulled towards the whole image's mean. The worker
    passes the whole image's mean grey on with the crop, and contrast 0.5 on the device maps a black crop to about
    25, where the crop's own mean would leave it black."""
    from PIL import Image
    from torchvision import transforms as T
    # ColorJitter(contrast=(0.5, 0.5)): contrast first, brightness and saturation 1; out = (pixel + mean grey) / 2
    monkeypatch.setattr(T.ColorJitter, "get_params", lambda *_: (torch.tensor([1, 0, 2, 3]), 1.0, 0.5, 1.0, None))
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 48:] = 200  # three quarters black, a quarter bright: mean grey floor(0.9999 * 200) / 4 = 49.75
    dataset = data.MaskedImages([(Image.fromarray(image), 0)], 16, data.BlockMasking(2, 1, 1))
    torch.manual_seed(0)
    values, black = set(), 0
    for _ in range(60):
        crop, _, jitter = dataset[0]
        out = data.color_jitter(crop[None], jitter[None])
        values |= set(out.unique().tolist())
        if not crop.any():
            black += 1
            assert out.unique().tolist() == [24]  # (0 + 49.75) / 2 truncated
    assert black >= 5  # crops of one colour were drawn: the case that tells the whole image's mean from the crop's
    # Jitter first: black -> about 25, bright -> about 125. Jitter on a flat crop would leave 0 or 200 as they are.
    assert 0 not in values and 200 not in values


# ------------------------------------------------------------------------------------------- head init
def test_classifier_head_init_is_normal_002_times_init_scale():
    cfg = settings(finetune, model="tiny", depth=1, img_size=16, patch_size=8)
    torch.manual_seed(0)
    net = finetune.build_model(finetune.model_args(cfg, 1000), None, 0.001)
    w = net.head.weight.detach().double()  # 192,000 values
    # timm's trunc_normal_(std=.02) has absolute bounds a=-2, b=2 (100 std): a plain normal(0, 0.02), then x0.001
    assert w.std().item() == pytest.approx(2e-5, rel=0.02)
    assert (w.abs() > 2e-5).double().mean().item() == pytest.approx(2 * (1 - 0.841345), abs=0.01)  # P(|z| > 1)
    assert torch.equal(net.head.bias, torch.zeros_like(net.head.bias))


# ------------------------------------------------------------------------------------------------ warm-up
def _official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs):
    """BEiT v2 / DTM utils.cosine_scheduler, restated: warmup np.linspace(0, base, warmup_iters), then
    final + (base - final) / 2 * (1 + cos(pi * i / n)) for i in range(n), n = total - warmup_iters."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    n = epochs * niter_per_ep - warmup_iters
    rest = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return np.concatenate([warm, rest])


@pytest.mark.parametrize("epochs, niter, warmup_epochs", [(10, 7, 2), (5, 1, 1), (3, 4, 0), (300, 5, 10)])
def test_schedule_matches_the_official_cosine_scheduler(epochs, niter, warmup_epochs):
    official = _official_cosine_scheduler(1.5e-3, 1e-5, epochs, niter, warmup_epochs)
    ours = [common.cosine_schedule(s, epochs * niter, warmup_epochs * niter, 1.5e-3, 1e-5)
            for s in range(epochs * niter)]
    assert ours == pytest.approx(official.tolist(), rel=1e-12, abs=1e-18)
    if warmup_epochs * niter > 1:
        assert ours[warmup_epochs * niter - 1] == pytest.approx(1.5e-3)  # the peak, one step before the cosine
