"""The GPU paths of pre-training: bf16 autocast, torch.compile of the student and of dtm_loss, fused AdamW.
Skipped without a CUDA GPU (see conftest.py); scripts/gpu_check.sh runs them on a lent GPU."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

import common
from model import VisionTransformer
from morph import dtm_loss, sample_schedule, schedule_tensor

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")  # a module setting, so the same tests can be tried on another device by hand


def small_student():
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, layer_scale=0.1,
                             mask_token=True, out_dim=64).to(DEV)


def batch(n=8):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=gen).to(DEV)
    mask = (torch.rand(n, 64, generator=gen) < 0.4).to(DEV)
    target = torch.randn(n, 64, 64, generator=gen).to(DEV)
    return images, mask, target


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls for the fp32 references (restored afterwards)."""
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def forward_backward(net, images, mask, target, schedules, bf16):
    net.zero_grad(set_to_none=True)
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=bf16):
        pred = net(images, mask)
        loss = dtm_loss(pred, target, schedule_tensor(schedules, DEV))
    loss.backward()
    return pred, loss, grads(net)


def test_bf16_autocast_forward_backward_close_to_fp32(no_tf32):
    net = small_student()
    images, mask, target = batch()
    schedules = [[8] * 4, [3] * 5]
    pred32, loss32, grad32 = forward_backward(net, images, mask, target, schedules, bf16=False)
    pred16, loss16, grad16 = forward_backward(net, images, mask, target, schedules, bf16=True)
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.float32  # the loss runs in fp32
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99
    assert (pred16.float() - pred32).abs().max() < 0.1 * pred32.abs().max()


def test_compiled_student_matches_eager(no_tf32):
    net = small_student()
    compiled = torch.compile(copy.deepcopy(net))
    images, mask, target = batch()
    schedules = [[8] * 4, [3] * 5]
    pred, loss, grad = forward_backward(net, images, mask, target, schedules, bf16=False)
    pred_c, loss_c, grad_c = forward_backward(compiled, images, mask, target, schedules, bf16=False)
    torch.testing.assert_close(pred_c, pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_c, grad, rtol=1e-3, atol=1e-5)
    _, loss16, grad16 = forward_backward(compiled, images, mask, target, schedules, bf16=True)  # as pretrain.py
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert loss16.item() == pytest.approx(loss.item(), rel=2e-2)


def test_compiled_dtm_loss_matches_eager_and_stops_compiling():
    """torch.compile(dtm_loss, fullgraph=True) with Inductor, as pretrain.py uses it: same values and gradients as
    eager, one graph for the merging schedules (and one for token-wise), and new schedules compile nothing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dtm_loss, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(16, 196, 512, generator=gen).to(DEV).requires_grad_(True)
    target = torch.randn(16, 196, 512, generator=gen).to(DEV)
    rng = random.Random(0)

    def check(schedules):
        schedules = schedule_tensor(schedules, DEV)
        value_c = compiled(pred, target, schedules)
        grad_c, = torch.autograd.grad(value_c, pred)
        value = dtm_loss(pred, target, schedules)
        grad, = torch.autograd.grad(value, pred)
        torch.testing.assert_close(value_c, value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-9)

    check([])
    for schedules in ([[14] * 14, [7] * 3 + [0] * 11], [[20] * 5 + [0] * 9, [1] * 9 + [0] * 5]):
        check(schedules)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(10):
        check([sample_schedule(196, 14, rng) for _ in range(2)])
    assert counters["stats"]["unique_graphs"] == graphs, "new schedules compiled new graphs"
    assert graphs == 2  # token-wise, and every [2, 14] schedule


def test_dtm_loss_never_waits_for_the_gpu():
    """No host synchronisation in dtm_loss (no .item(), no data-dependent shape): CUDA graphs can capture it."""
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(8, 196, 64, generator=gen).to(DEV).requires_grad_(True)
    target = torch.randn(8, 196, 64, generator=gen).to(DEV)
    schedules = schedule_tensor([sample_schedule(196, 14, random.Random(s)) for s in range(2)], DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dtm_loss(pred, target, schedules).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(pred.grad).all()


def test_fused_adamw_step_matches_reference():
    net = small_student()
    reference = copy.deepcopy(net)
    optimizer = common.adamw(common.param_groups(net, 0.05), 1e-3, (0.9, 0.98), 1e-8, DEV)
    assert all(group.get("fused") for group in optimizer.param_groups)
    ref_groups = common.param_groups(reference, 0.05)
    ref_optimizer = torch.optim.AdamW(ref_groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(net.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=gen).to(DEV)
            q.grad = p.grad.clone()
        optimizer.step()
        ref_optimizer.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("use", ["pretrain", "finetune", "resized"])
def test_attention_runs_on_fused_kernels(use, compiled):
    """Forward and backward in bf16 with SDPA restricted to the fused backends: a bias the kernels refuse
    (or a fallback to the math path) raises instead of running slowly. Pre-training with a mask token,
    fine-tuning (own tables only), and a backbone on a larger grid with its tables resized on load."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from model import load_backbone
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    mask = None
    if use == "pretrain":
        net = VisionTransformer(**args, mask_token=True, out_dim=64)
        mask = (torch.rand(4, 64) < 0.4).to(DEV)
    elif use == "finetune":
        net = VisionTransformer(**args, num_classes=10, shared_rel_pos=False)
    else:  # as segment.py: a 64 px checkpoint into a 96 px backbone, 145 tokens
        ckpt = {"model": VisionTransformer(**args, mask_token=True, out_dim=64).state_dict(), "model_args": args}
        net = VisionTransformer(**dict(args, img_size=96), shared_rel_pos=False)
        load_backbone(net, ckpt, log=lambda *_: None)
    net = net.to(DEV)
    run = torch.compile(net) if compiled else net
    images = torch.randn(4, 3, net.img_size, net.img_size, device=DEV)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused), torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = run(images, mask)
        out.float().square().mean().backward()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        reference = net(images, mask)  # eager, any backend
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference.float(), rtol=5e-2, atol=5e-2)
    tables = [p for name, p in net.named_parameters() if "rel_pos" in name]
    assert tables and all(p.grad is not None and torch.isfinite(p.grad).all() for p in tables)
