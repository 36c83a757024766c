"""The official DTM / BEiT v2 recipe on the points where a reimplementation easily drifts: which parameters get
weight decay, the mask count, the pre-training augmentation order, the classifier head init and the warm-up.
Each expectation is written out here from the official code, not taken from ours."""
import math
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

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
    dataset = data.MaskedImages([], 32, data.BlockMasking(4, 6, 2))
    steps = [type(t) for t in dataset.augment.transforms if not isinstance(t, v2.PILToTensor)]
    assert steps == [v2.ColorJitter, v2.RandomHorizontalFlip, v2.RandomResizedCrop]


def test_contrast_jitter_uses_the_whole_image_mean():
    """Jitter before the crop: a crop of one flat colour is pulled towards the whole image's mean."""
    from PIL import Image
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 200  # left half black, right half bright
    dataset = data.MaskedImages([(Image.fromarray(image), 0)], 16, data.BlockMasking(2, 1, 1))
    steps = dataset.augment.transforms
    for i, t in enumerate(steps):
        if isinstance(t, v2.ColorJitter):
            steps[i] = v2.ColorJitter(contrast=(0.5, 0.5))  # out = (pixel + mean gray of its input) / 2
        if isinstance(t, v2.RandomResizedCrop):
            steps[i] = v2.RandomResizedCrop(16, scale=(0.01, 0.01), ratio=(1, 1))  # 6x6 px: nearly always flat
    torch.manual_seed(0)
    values = set()
    for _ in range(20):
        values |= set(dataset[0][0].unique().tolist())
    # Jitter first: black -> about 50, bright -> about 150. Jitter on a flat crop would leave 0 or 200 as they are.
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
