"""Dynamic Token Morphing (DTM), the loss of "Morphing Tokens Draw Strong Masked Image Models".

A frozen teacher gives one target token per patch; the student predicts one token per patch. Matching them
token by token is noisy, because neighbouring targets disagree where they should agree. DTM first *morphs*
both sides: a few rounds of bipartite matching on the teacher tokens merge similar tokens into groups, then
every token (teacher and student alike) is replaced by the mean of its group. The number of merged tokens and
of rounds is drawn anew every step (`sample_schedule`), and the loss is averaged over L such schedules.

Groups are index tensors: `groups[b, i]` is the group of token i in sample b. Everything works on the whole
batch at once, with gathers and scatters, so no Python loop runs over samples.
"""
import math
import random

import torch
import torch.nn.functional as F


def sample_schedule(n_max: int, k_max: int, rng: random.Random) -> list[int]:
    """Draw one dynamic schedule: k rounds that each merge r tokens, about n tokens in all.

    n ~ U{0..n_max} tokens to remove and k ~ U{1..k_max} rounds, as in the official release. The rounds share
    the work equally; r is rounded up unless that would remove more than n_max tokens."""
    n = rng.randint(0, n_max)
    k = rng.randint(1, k_max)
    r = math.ceil(n / k)
    if r * k > n_max:
        r = n // k
    return [r] * k


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 when the input is wider


@torch.no_grad()
def morph_groups(tokens: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """Run the rounds of bipartite matching of `schedule` on `tokens` [B, N, D]; return group ids [B, N].

    Each round works on the current sequence of t group representatives. Even positions form set A, odd
    positions set B; every A token picks its most cosine-similar B token, and the r A tokens with the best
    scores merge into their partners. The next sequence is the unmerged A tokens, then all B tokens, each in
    their current order. A representative is the mean of its members; cosine similarity ignores scale, so
    the member sum serves as well and we never divide."""
    B, N, D = tokens.shape
    device = tokens.device
    with torch.autocast(device.type, enabled=False):
        sums = tokens.detach().to(_wide(tokens))  # [B, t, D], one row per current representative
        group = torch.arange(N, device=device).expand(B, N)  # token -> position of its group in the sequence
        for r in schedule:
            t = sums.shape[1]
            r = min(r, t // 2)  # a round cannot merge more tokens than B has
            if r <= 0:
                continue
            metric = F.normalize(sums, dim=-1)
            a, b = metric[:, ::2], metric[:, 1::2]
            best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # [B, |A|]
            by_score = best.argsort(dim=-1, descending=True, stable=True)
            merged, kept = by_score[:, :r], by_score[:, r:].sort(dim=-1).values
            n_kept = a.shape[1] - r
            # Where every current representative lands in the next, shorter sequence.
            new_a = torch.empty_like(best, dtype=torch.long)
            new_a.scatter_(1, kept, torch.arange(n_kept, device=device).expand(B, -1))
            new_a.scatter_(1, merged, n_kept + partner.gather(1, merged))
            new_pos = torch.empty(B, t, dtype=torch.long, device=device)
            new_pos[:, ::2] = new_a
            new_pos[:, 1::2] = n_kept + torch.arange(b.shape[1], device=device)
            sums = sums.new_zeros(B, t - r, D).scatter_add_(1, new_pos[..., None].expand(-1, -1, D), sums)
            group = new_pos.gather(1, group)
    return group


def morph(x: torch.Tensor, groups: torch.LongTensor) -> torch.Tensor:
    """Replace every token of `x` [B, N, C] by the mean of its group's tokens (differentiable in x).

    Group ids are below N, so N slots always suffice: the shapes never depend on the schedule."""
    B, N, C = x.shape
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(_wide(x))
        index = groups[..., None].expand(B, N, C)
        sums = x.new_zeros(B, N, C).scatter_add(1, index, x)
        counts = x.new_zeros(B, N).scatter_add(1, groups, x.new_ones(B, N))
        means = sums / counts.clamp(min=1)[..., None]
        return means.gather(1, index)


def token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str = "smooth_l1", beta: float = 2.0):
    """Mean per-element loss over all tokens and channels (cosine: mean over tokens of 1 - cos)."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if loss == "l2":
        return F.mse_loss(pred, target)
    if loss == "cosine":
        return 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    raise ValueError(f"loss={loss!r} is not one of 'smooth_l1', 'l2', 'cosine'")


@torch.compiler.disable  # the matching is data-dependent: eager, so torch.compile never recompiles for it
def schedule_groups(target: torch.Tensor, schedules: list[list[int]]) -> torch.LongTensor:
    """Groups [L*B, N] of every schedule (an empty list of schedules counts as one empty schedule)."""
    return torch.cat([morph_groups(target, schedule) for schedule in schedules or [[]]])


def dtm_loss(pred: torch.Tensor, target: torch.Tensor, schedules: list[list[int]],
             loss: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """The DTM loss: for each schedule, morph `pred` and `target` [B, N, C] with the groups found on the
    target, compare them over every patch (visible and masked), then average over the schedules.
    An empty schedule (or one that merges nothing) is plain token-wise distillation."""
    groups = schedule_groups(target, schedules)
    repeats = groups.shape[0] // pred.shape[0]  # L: all schedules in one batch of L*B samples
    target = target.detach()  # the teacher is frozen: gradients reach pred only
    with torch.autocast(pred.device.type, enabled=False):
        morphed_pred = morph(pred.repeat(repeats, 1, 1), groups)
        morphed_target = morph(target.repeat(repeats, 1, 1), groups)
        # Every schedule morphs the same number of elements, so one mean is the mean over schedules.
        return token_loss(morphed_pred, morphed_target, loss, beta)
