"""Dynamic Token Morphing (DTM), the loss of "Morphing Tokens Draw Strong Masked Image Models".

A frozen teacher gives one target token per patch; the student predicts one token per patch. Matching them
token by token is noisy, because neighbouring targets disagree where they should agree. DTM first *morphs*
both sides: a few rounds of bipartite matching on the teacher tokens merge similar tokens into groups, then
every token (teacher and student alike) is replaced by the mean of its group. The number of merged tokens and
of rounds is drawn anew every step (`sample_schedule`), and the loss is averaged over L such schedules:

    groups = morph_groups(target, schedules)                          # match on the teacher: [L, B, N]
    loss = token_loss(morph(pred, groups), morph(target, groups))     # morph both sides, compare every token

No shape depends on the schedule, so `torch.compile(dtm_loss, fullgraph=True)` builds one graph that every
schedule reuses: a schedule is a tensor of merges per round, padded with rounds that merge nothing; the L
schedules of a step run together as L*B rows; every round works on all N token slots and masks the empty ones.
"""
import math
import random

import torch
import torch.nn.functional as F


def sample_schedule(n_max: int, k_max: int, rng: random.Random) -> list[int]:
    """Draw one dynamic schedule: the merges of each of k_max rounds, r in k rounds and 0 in the rest.

    n ~ U{0..n_max} tokens to remove and k ~ U{1..k_max} rounds, as in the official release. The rounds share
    the work equally; r is rounded up unless that would remove more than n_max tokens."""
    n = rng.randint(0, n_max)
    k = rng.randint(1, k_max)
    r = math.ceil(n / k)
    if r * k > n_max:
        r = n // k
    return [r] * k + [0] * (k_max - k)


def schedule_tensor(schedules: list[list[int]], device=None) -> torch.LongTensor:
    """Schedules as the LongTensor [L, K] that morph_groups and dtm_loss take (short ones padded with rounds
    of 0), sent to `device` without making the host wait for it."""
    K = max(map(len, schedules), default=0)
    rows = torch.tensor([list(s) + [0] * (K - len(s)) for s in schedules], dtype=torch.long).view(len(schedules), K)
    return (rows.pin_memory() if torch.device(device or "cpu").type == "cuda" else rows).to(device, non_blocking=True)


def at_least_fp32(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is wider: matching and morphing never run in half precision."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def morph_groups(tokens: torch.Tensor, schedules: torch.LongTensor) -> torch.LongTensor:
    """Group ids [L, B, N] of `tokens` [B, N, D] under each of the `schedules` [L, K]; ids are 0..groups-1.

    A round works on the current sequence of groups. Even positions form set A, odd positions set B; every
    A token picks its most cosine-similar B token, and the r A tokens with the best scores merge into their
    partners. The next sequence is the unmerged A tokens, then all B tokens, each in their current order.
    A group's token is the mean of its members; cosine similarity ignores scale, so the rounds only need
    the dot products of the groups' sums: the tokens' Gram matrix, with rows and columns added up as groups
    merge (a Gram matrix is N x N, smaller than the N x D tokens)."""
    B, N, _ = tokens.shape
    L, K = schedules.shape
    with torch.autocast(tokens.device.type, enabled=False):
        x = tokens.detach().to(at_least_fp32(tokens))
        gram = (x @ x.mT).repeat(L, 1, 1)  # [L*B, N, N], rows and columns in sequence order
    merges = schedules.repeat_interleave(B, dim=0)  # [L*B, K]
    length = torch.full((L * B,), N, device=tokens.device)
    group = torch.arange(N, device=tokens.device).repeat(L * B, 1)  # token -> position of its group
    for k in range(K):
        gram, length, group = matching_round(gram, length, group, merges[:, k])
    return group.view(L, B, N)


@torch.compiler.nested_compile_region  # torch.compile compiles one round and runs it K times
def matching_round(gram: torch.Tensor, length: torch.Tensor, group: torch.Tensor, r: torch.Tensor):
    """One round on R rows at once: the groups' Gram matrix [R, N, N] in sequence order, sequence lengths [R],
    every token's group position [R, N] and the merges [R] in; the three after the round out.

    Positions from `length` on are empty slots: their rows and columns of the Gram matrix are zero, no token's
    group is there, the matching masks them, and they map to themselves, out of the live positions' way."""
    R, N, _ = gram.shape
    pos = torch.arange(N, device=gram.device)
    live = pos < length[:, None]
    r = torch.minimum(r, length // 2)  # a round cannot merge more tokens than B has
    norm = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt().clamp(min=1e-12)  # |group sum|, as F.normalize
    # The cosine similarity of every A token (even positions) to every B token (odd positions).
    cos = (gram[:, 0::2, 1::2] / norm[:, None, 1::2]).div_(norm[:, 0::2, None])
    best, partner = cos.masked_fill_(~live[:, None, 1::2], -math.inf).max(dim=-1)  # ties: the first B
    best = best.masked_fill_(~live[:, 0::2], -math.inf)
    rank = best.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0: the best score; ties: the first
    merged = rank < r[:, None]  # the r best-scoring A tokens merge into their partners
    # Where each position lands in the next sequence: the unmerged A tokens in order, then the B tokens in
    # order; a merged A token lands on its partner. A round of 0 changes nothing, not even the order (as ToMe
    # returns early): reordering would change which tokens form A and B in the next round.
    kept = live[:, 0::2] & ~merged
    n_kept = kept.sum(dim=-1, keepdim=True)
    new_pos = torch.empty_like(group)
    new_pos[:, 0::2] = torch.where(merged, n_kept + partner, kept.cumsum(dim=-1) - 1)
    new_pos[:, 1::2] = n_kept + pos[:N // 2]
    new_pos = torch.where(live & (r[:, None] > 0), new_pos, pos)
    # With P the 0/1 matrix of the move (P[new_pos[q], q] = 1), the merged groups' Gram matrix is P G P^T:
    # rows of G added into their new positions, then columns, as two scatter-adds.
    rows = torch.zeros_like(gram).scatter_add_(1, new_pos[:, :, None].expand(R, N, N), gram)
    gram = torch.zeros_like(gram).scatter_add_(2, new_pos[:, None, :].expand(R, N, N), rows)
    return gram, length - r, new_pos.gather(1, group)


def morph(x: torch.Tensor, groups: torch.LongTensor) -> torch.Tensor:
    """Replace every token of `x` [B, N, C] by the mean of its group's tokens, for the groups [..., B, N] of
    one or more schedules: [..., B, N, C] (differentiable in x; at least fp32, autocast or not)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(at_least_fp32(x))
        index = groups[..., None].expand(*groups.shape, x.shape[-1])
        sums = x.new_zeros(index.shape).scatter_add(-2, index, x.expand(index.shape))  # slot g: group g's sum
        sizes = x.new_zeros(groups.shape).scatter_add(-1, groups, x.new_ones(()).expand(groups.shape))
        return (sums / sizes.clamp(min=1)[..., None]).gather(-2, index)


def token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str = "smooth_l1", beta: float = 2.0):
    """The mean loss over all tokens and channels (cosine: the mean over tokens of 1 - cos)."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if loss == "l2":
        return F.mse_loss(pred, target)
    if loss == "cosine":
        return 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    raise ValueError(f"loss={loss!r} is not one of 'smooth_l1', 'l2', 'cosine'")


def dtm_loss(pred: torch.Tensor, target: torch.Tensor, schedules: torch.LongTensor,
             loss: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """The DTM loss: for each of the `schedules` [L, K] (schedule_tensor), morph `pred` and `target` [B, N, C]
    with the groups found on the target, compare them over every patch (visible and masked), then average
    over the schedules. No schedules (L or K = 0), or rounds of 0 merges, give token-wise distillation."""
    with torch.autocast(pred.device.type, enabled=False):
        dtype = at_least_fp32(pred, target)
        pred, target = pred.to(dtype), target.detach().to(dtype)  # the teacher is frozen: no gradient
        if schedules.numel() == 0:
            return token_loss(pred, target, loss, beta)
        groups = morph_groups(target, schedules)  # [L, B, N]: matched on the teacher's tokens
        # Both sides morphed with the same groups, [L, B, N, C]; every schedule has as many elements, so the
        # mean over all of them is the mean over the schedules of each schedule's mean.
        return token_loss(morph(pred, groups), morph(target, groups), loss, beta)
