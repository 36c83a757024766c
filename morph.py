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
    with torch.autocast(tokens.device.type, enabled=False):
        x = tokens.detach().to(_wide(tokens))
        return _match(x @ x.transpose(1, 2), schedule)


def _match(gram: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """morph_groups from the tokens' Gram matrix [B, N, N] (left unchanged).

    A group's sum is indexed by one member token (its key): row and column i of the Gram matrix hold the
    dot products of the group keyed by token i, so merging a group into another adds its row and column to
    the other's. A round reads O(tN) numbers per sample instead of the O(tD) of renormalising every group's
    token, and one Gram matrix (a batched matmul) serves all the schedules of a step (_schedule_slots).
    The copy updated here is laid out [N, B, N], so that rows and columns are both slices of a 2-D view
    for index_select and index_add_: (b, i, j) is row i*B + b of `rows` and column b*N + j of `cols`."""
    B, N, _ = gram.shape
    device = gram.device
    g = gram.transpose(0, 1).contiguous()  # [N, B, N]
    rows, cols = g.view(N * B, N), g.view(N, B * N)
    batch = torch.arange(B, device=device)[:, None]
    key = torch.arange(N, device=device).expand(B, N)  # the key token of each group, in sequence order
    group = key  # token -> position of its group in the current sequence
    for r in schedule:
        t = key.shape[1]
        r = min(r, t // 2)  # a round cannot merge more tokens than B has
        if r <= 0:
            continue
        key_a, key_b = key[:, ::2], key[:, 1::2]
        n_a, n_b = key_a.shape[1], key_b.shape[1]
        norm = g.diagonal(dim1=0, dim2=2).clamp(min=0).sqrt().clamp(min=1e-12)  # [B, N], as F.normalize
        dots = rows.index_select(0, (key_a * B + batch).flatten()).view(B, n_a, N).gather(
            2, key_b[:, None].expand(-1, n_a, -1))
        # cos = dots / (|a| |b|); a row's best partner does not depend on |a|, so divide by it afterwards.
        dots.div_(norm.gather(1, key_b)[:, None])
        partner = dots.argmax(dim=-1)  # [B, |A|] (argmax, not max(dim): that stalls on busy CPUs)
        best = dots.gather(2, partner[..., None])[..., 0] / norm.gather(1, key_a)
        by_score = best.argsort(dim=-1, descending=True, stable=True)
        merged, kept = by_score[:, :r], by_score[:, r:].sort(dim=-1).values
        n_kept = n_a - r
        src, dst = key_a.gather(1, merged), key_b.gather(1, partner.gather(1, merged))
        rows.index_put_(((dst * B + batch).flatten(),), rows.index_select(0, (src * B + batch).flatten()),
                        accumulate=True)  # as index_add_, whose CPU kernel always starts threads
        cols.index_add_(1, (batch * N + dst).flatten(), cols.index_select(1, (batch * N + src).flatten()))
        # Where every current representative lands in the next, shorter sequence.
        new_a = torch.empty_like(best, dtype=torch.long)
        new_a.scatter_(1, kept, torch.arange(n_kept, device=device).expand(B, -1))
        new_a.scatter_(1, merged, n_kept + partner.gather(1, merged))
        new_pos = torch.empty(B, t, dtype=torch.long, device=device)
        new_pos[:, ::2] = new_a
        new_pos[:, 1::2] = n_kept + torch.arange(n_b, device=device)
        key = torch.cat([key_a.gather(1, kept), key_b], dim=1)
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


def token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str = "smooth_l1", beta: float = 2.0,
               reduction: str = "mean"):
    """Mean per-element loss over all tokens and channels (cosine: mean over tokens of 1 - cos).
    reduction="none": the loss of every element (cosine: of every token)."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction=reduction)
    if loss == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss == "cosine":
        cos = F.cosine_similarity(pred, target, dim=-1)
        return 1 - cos.mean() if reduction == "mean" else 1 - cos
    raise ValueError(f"loss={loss!r} is not one of 'smooth_l1', 'l2', 'cosine'")


def _num_groups(n: int, schedule: list[int]) -> int:
    """How many groups n tokens form after `schedule` (a round merges at most half of them)."""
    for r in schedule:
        n -= max(0, min(r, n // 2))
    return n


@torch.compiler.disable  # the matching is data-dependent: eager, so torch.compile never recompiles for it
@torch.no_grad()
def _schedule_slots(target: torch.Tensor, schedules: list[list[int]]):
    """Per schedule (an empty list counts as one empty schedule): group ids [B, N] below M and group sizes
    [B, M], M the number of groups; (None, None) for a schedule that merges nothing."""
    B, N, _ = target.shape
    groups, sizes, gram = [], [], None
    for schedule in schedules or [[]]:
        M = _num_groups(N, schedule)
        if M == N:
            groups.append(None)
            sizes.append(None)
            continue
        if gram is None:  # one Gram matrix for all schedules
            with torch.autocast(target.device.type, enabled=False):
                x = target.detach().to(_wide(target))
                gram = x @ x.transpose(1, 2)
        g = _match(gram, schedule)
        groups.append(g)
        sizes.append(gram.new_zeros(B, M).scatter_add_(1, g, gram.new_ones(B, N)))
    return groups, sizes


def schedule_groups(target: torch.Tensor, schedules: list[list[int]]) -> torch.LongTensor:
    """Groups [L*B, N] of every schedule (an empty list of schedules counts as one empty schedule)."""
    B, N, _ = target.shape
    identity = torch.arange(N, device=target.device).expand(B, N)
    return torch.cat([identity if g is None else g for g in _schedule_slots(target, schedules)[0]])


def dtm_loss(pred: torch.Tensor, target: torch.Tensor, schedules: list[list[int]],
             loss: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """The DTM loss: for each schedule, morph `pred` and `target` [B, N, C] with the groups found on the
    target, compare them over every patch (visible and masked), then average over the schedules.
    An empty schedule (or one that merges nothing) is plain token-wise distillation.

    Under torch.compile(dtm_loss) this frame runs eagerly and _grouped_loss is compiled: traced here, the
    schedules (lists of varying length) would be guarded and every new schedule shape would recompile."""
    if torch.compiler.is_compiling():
        torch._dynamo.skip_frame()
    groups, sizes = _schedule_slots(target, schedules)
    return _grouped_loss(pred, target, groups, sizes, loss, beta)


def _grouped_loss(pred, target, groups, sizes, loss, beta):
    """dtm_loss from the groups. Every member of a group has the same morphed tokens, hence the same loss:
    it is computed once per group and weighted by the group size, never scattered back to the tokens. The
    smooth-L1 and L2 losses depend on pred - target only, and morphing is linear, so they morph the
    difference once instead of both sides."""
    B, N, C = pred.shape
    with torch.autocast(pred.device.type, enabled=False):
        dtype = torch.promote_types(_wide(pred), target.dtype)
        pred, target = pred.to(dtype), target.detach().to(dtype)  # the teacher is frozen: no gradient
        x, total = None, 0.0
        for g, size in zip(groups, sizes):
            if g is None:
                total = total + token_loss(pred, target, loss, beta)
                continue
            if x is None:
                x = (torch.cat([pred, target], dim=-1) if loss == "cosine" else pred - target).flatten(0, 1)
            size = size.to(dtype)
            M = size.shape[1]
            index = (g + torch.arange(B, device=g.device)[:, None] * M).flatten()  # slot of token i: b*M + g
            means = x.new_zeros(B * M, x.shape[1]).index_add_(0, index, x) / size.view(-1, 1)
            if loss == "cosine":
                per_group = token_loss(means[:, :C], means[:, C:], loss, reduction="none")
            else:  # the loss of the morphed difference against zero, averaged over channels
                per_group = token_loss(means, means.new_zeros(()).expand_as(means), loss, beta, "none").mean(-1)
            total = total + per_group @ size.view(-1) / (B * N)
        return total / len(groups)
