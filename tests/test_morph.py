"""DTM against an independent, slow, obvious implementation written here."""
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from morph import dtm_loss, morph, morph_groups, sample_schedule, schedule_tensor


def reference_partition(tokens: torch.Tensor, schedule: list[int]):
    """One sample [N, D], plain Python: returns (partition as a set of frozensets, merges applied)."""
    seq = [[i] for i in range(tokens.shape[0])]  # the current sequence of groups, each a list of token ids
    merges = 0
    for r in schedule:
        t = len(seq)
        r = min(r, t // 2)
        if r <= 0:
            continue
        reps = [tokens[g].mean(0) for g in seq]
        A, B = seq[0::2], seq[1::2]
        best = []
        for i in range(len(A)):
            sims = [F.cosine_similarity(reps[2 * i], reps[2 * j + 1], dim=0).item() for j in range(len(B))]
            j = max(range(len(B)), key=lambda j: sims[j])  # first maximum
            best.append((sims[j], i, j))
        ranked = sorted(best, key=lambda s: -s[0])  # stable: ties keep position order
        merged = {i: j for _, i, j in ranked[:r]}
        new_B = [list(g) for g in B]
        for i, j in merged.items():
            new_B[j] += A[i]
        seq = [A[i] for i in range(len(A)) if i not in merged] + new_B
        merges += r
    return {frozenset(g) for g in seq}, merges


def groups_of(tokens: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """morph_groups for one schedule: [B, N]."""
    return morph_groups(tokens, schedule_tensor([schedule]))[0]


def partition_of(groups_row: torch.Tensor):
    members = {}
    for token, g in enumerate(groups_row.tolist()):
        members.setdefault(g, set()).add(token)
    return {frozenset(m) for m in members.values()}


SCHEDULES = [[], [0], [0, 0, 0], [1], [5], [98], [99], [150], [400], [7] * 14, [14] * 14, [3] * 14, [20] * 5,
             [50, 50], [2, 2, 2, 2, 2, 2, 2], [30] * 3, [13] * 10, [1] * 14, [60, 60, 60], [9] * 8, [0, 5, 0, 5],
             [48] * 4]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[:1]}x{len(s)}")
def test_morph_groups_matches_reference_loop(schedule):
    torch.manual_seed(len(schedule) * 1000 + sum(schedule))
    # Low-dimensional, clustered tokens make the matching non-trivial (many near-ties between groups).
    tokens = torch.randn(3, 196, 8, dtype=torch.float64) + torch.randn(3, 196, 1, dtype=torch.float64)
    assert_matches_reference(tokens, schedule)


def assert_matches_reference(tokens, schedule):
    B, N, _ = tokens.shape
    groups = groups_of(tokens, schedule)
    assert groups.shape == (B, N) and groups.dtype == torch.long
    for b in range(B):
        expected, merges = reference_partition(tokens[b], schedule)
        assert partition_of(groups[b]) == expected
        ids = groups[b].unique()
        assert len(ids) == N - merges  # group count = N - merges applied
        assert ids.tolist() == list(range(len(ids)))  # ids are 0..G-1


# Odd lengths: A has one token more than B, and the cap t // 2 leaves one A token unmerged.
ODD = [(15, [7]), (15, [9]), (15, [7, 7, 7, 7]), (49, [24]), (49, [30, 30]), (49, [1, 30, 1, 30]),
       (49, [20, 20, 20, 20]), (21, [3, 50, 0, 50])]


@pytest.mark.parametrize("N,schedule", ODD, ids=lambda x: str(x))
def test_merge_cap_on_odd_lengths_matches_reference_loop(N, schedule):
    torch.manual_seed(N + sum(schedule))
    tokens = torch.randn(3, N, 6, dtype=torch.float64) + torch.randn(3, N, 1, dtype=torch.float64)
    t, capped_on_odd = N, False
    for r in schedule:  # the schedule really hits the cap on an odd length
        capped_on_odd |= t % 2 == 1 and r >= t // 2 > 0
        t -= min(r, t // 2)
    assert capped_on_odd
    assert_matches_reference(tokens, schedule)


def test_schedules_run_together_as_they_would_alone():
    """L schedules of different lengths in one call give each schedule's groups (padding rounds merge nothing)."""
    torch.manual_seed(8)
    tokens = torch.randn(2, 40, 8, dtype=torch.float64)
    schedules = [[5] * 3, [], [12, 0, 7], [30]]
    together = morph_groups(tokens, schedule_tensor(schedules))
    assert together.shape == (4, 2, 40)
    for schedule, groups in zip(schedules, together):
        assert torch.equal(groups, groups_of(tokens, schedule))
        assert torch.equal(groups, groups_of(tokens, schedule + [0] * 5))


def test_schedule_tensor_pads_with_rounds_of_zero():
    assert schedule_tensor([[3, 3, 3], [5]]).tolist() == [[3, 3, 3], [5, 0, 0]]
    assert schedule_tensor([]).shape == (0, 0) and schedule_tensor([[]]).shape == (1, 0)
    assert schedule_tensor([[1]]).dtype == torch.long


def test_random_schedules_match_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        schedule = sample_schedule(49, 14, rng)
        tokens = torch.randn(2, 49, 16, dtype=torch.float64)
        groups = groups_of(tokens, schedule)
        for b in range(2):
            assert partition_of(groups[b]) == reference_partition(tokens[b], schedule)[0]


def test_matching_runs_in_float32_under_autocast():
    torch.manual_seed(1)
    tokens = torch.randn(2, 64, 32)
    plain = groups_of(tokens, [6] * 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = groups_of(tokens, [6] * 5)
    assert torch.equal(plain, auto)


def test_morph_is_the_group_mean():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    groups = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 4, 4, 5], [3, 1, 1, 0, 0, 2, 2, 2, 2, 4]])
    out = morph(x, groups)
    for b in range(2):
        for i in range(10):
            members = [j for j in range(10) if groups[b, j] == groups[b, i]]
            torch.testing.assert_close(out[b, i], x[b, members].mean(0))


def hand_smooth_l1(p, t, beta):
    d = (p - t).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()


@pytest.mark.parametrize("schedules", [[], [[]], [[0]], [[0, 0], []]])
def test_empty_schedule_is_token_wise_smooth_l1(schedules):
    torch.manual_seed(3)
    pred, target = torch.randn(2, 16, 8) * 3, torch.randn(2, 16, 8) * 3
    torch.testing.assert_close(dtm_loss(pred, target, schedule_tensor(schedules)), hand_smooth_l1(pred, target, 2.0))


def test_dtm_loss_is_mean_over_schedules_of_morphed_losses():
    torch.manual_seed(4)
    pred, target = torch.randn(2, 36, 8, dtype=torch.float64) * 2, torch.randn(2, 36, 8, dtype=torch.float64) * 2
    schedules = [[4] * 3, [10], [2] * 7]
    per_schedule = []
    for s in schedules:
        morphed_p, morphed_t = torch.empty_like(pred), torch.empty_like(target)
        for b in range(2):
            for group in reference_partition(target[b], s)[0]:
                g = sorted(group)
                morphed_p[b, g], morphed_t[b, g] = pred[b, g].mean(0), target[b, g].mean(0)
        per_schedule.append((morphed_p, morphed_t))
    expected = {
        "smooth_l1": sum(hand_smooth_l1(p, t, 2.0) for p, t in per_schedule) / 3,
        "l2": sum(((p - t) ** 2).mean() for p, t in per_schedule) / 3,
        "cosine": sum(1 - F.cosine_similarity(p, t, dim=-1).mean() for p, t in per_schedule) / 3,
    }
    for name, value in expected.items():
        torch.testing.assert_close(dtm_loss(pred, target, schedule_tensor(schedules), loss=name), value)
    torch.testing.assert_close(dtm_loss(pred, target, schedule_tensor(schedules), beta=0.5),
                               sum(hand_smooth_l1(p, t, 0.5) for p, t in per_schedule) / 3)


def test_gradients_reach_pred_only():
    torch.manual_seed(5)
    pred = torch.randn(2, 49, 8, requires_grad=True)
    target = torch.randn(2, 49, 8, requires_grad=True)
    dtm_loss(pred, target, schedule_tensor([[5] * 4, [20]])).backward()
    assert target.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="'l3'"):
        dtm_loss(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), schedule_tensor([[1]]), loss="l3")


def test_sample_schedule_bounds_and_distribution():
    rng = random.Random(0)
    draws = [sample_schedule(196, 14, rng) for _ in range(20000)]
    assert all(len(s) == 14 for s in draws)  # k_max rounds: the shape never depends on the draw
    ks = Counter(sum(1 for r in s if r) for s in draws if s[0])  # rounds that merge (r > 0 whenever n > 0)
    assert set(ks) == set(range(1, 15))  # k ~ U{1..14}
    assert max(ks.values()) / min(ks.values()) < 1.15
    for s in draws:
        k = sum(1 for r in s if r) or 14
        assert set(s[:k]) == {s[0]} and set(s[k:]) <= {0} and 0 <= s[0] and sum(s) <= 196
    removed = [sum(s) for s in draws]
    # n ~ U{0..196}; rounding r = ceil(n/k) moves the total by less than k, mostly up: the mean stays near 98.
    assert 98 <= sum(removed) / len(removed) <= 98 + 7
    assert min(removed) == 0 and max(removed) == 196


def test_sample_schedule_rounding_rule():
    """r = ceil(n/k) unless ceil(n/k) * k > n_max, then floor(n/k), in k of the k_max rounds: replay the draws
    with a twin RNG."""
    rng, twin = random.Random(7), random.Random(7)
    for _ in range(2000):
        s = sample_schedule(20, 6, rng)
        n, k = twin.randint(0, 20), twin.randint(1, 6)
        up = -(-n // k)
        assert s == [up if up * k <= 20 else n // k] * k + [0] * (6 - k)


def counting_backend():
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it is given."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    return backend, graphs


@pytest.mark.parametrize("loss", ["smooth_l1", "cosine"])
def test_compiled_dtm_loss_matches_eager(loss):
    """torch.compile(dtm_loss, fullgraph=True), through AOT autograd (the graphs Inductor would get; Inductor
    itself runs in the CUDA tests): one whole graph, same values and gradients as eager, float64."""
    torch._dynamo.reset()
    compiled = torch.compile(dtm_loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(6)
    target = torch.randn(2, 36, 8, dtype=torch.float64)
    pred = (target + torch.randn(2, 36, 8, dtype=torch.float64)).requires_grad_(True)
    for schedules in ([[4] * 3, [10, 0, 0]], [[0, 0, 0], [18, 9, 5]], [[2, 2, 2], [1, 1, 1]]):
        schedules = schedule_tensor(schedules)
        value, = torch.autograd.grad(compiled(pred, target, schedules, loss), pred)
        expected, = torch.autograd.grad(dtm_loss(pred, target, schedules, loss), pred)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(compiled(pred, target, schedules, loss), dtm_loss(pred, target, schedules, loss),
                                   rtol=1e-12, atol=1e-15)


def test_new_schedules_compile_no_new_graph():
    """One graph serves every schedule: 10 new random schedules after the first compile nothing."""
    backend, graphs = counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(dtm_loss, fullgraph=True, backend=backend)
    rng = random.Random(0)
    torch.manual_seed(7)
    pred, target = torch.randn(2, 64, 16, requires_grad=True), torch.randn(2, 64, 16)
    schedules_seen = set()
    for i in range(11):
        schedules = [sample_schedule(64, 8, rng), sample_schedule(64, 8, rng)]
        schedules_seen.add(str(schedules))
        value = compiled(pred, target, schedule_tensor(schedules))
        value.backward()
        torch.testing.assert_close(value, dtm_loss(pred, target, schedule_tensor(schedules)))
        assert len(graphs) == 1, f"call {i} compiled a new graph"
    assert len(schedules_seen) == 11


@pytest.mark.parametrize("seed", range(3))
def test_exact_ties_break_as_the_reference_loop_breaks_them(seed):
    """196 one-hot tokens of only 4 distinct values (float64) tie exactly: most A tokens have many B partners at
    cosine 1, and most scores are equal. Ties go to the first partner and, among equal scores, to the first A
    token (a stable ranking), as in ToMe and the reference loop. Random tokens never tie: this test fails where
    they pass if the ranking is not stable, or ties go to the last partner or the last A token."""
    kinds = torch.randint(0, 4, (2, 196), generator=torch.Generator().manual_seed(seed))
    tokens = F.one_hot(kinds, 4).to(torch.float64)
    for schedule in ([14] * 7, [40, 40], [98]):
        assert_matches_reference(tokens, schedule)


def per_group_shortcut(pred, target, schedules, loss, beta=2.0):
    """The earlier formulation of dtm_loss, written here independently: every member of a group has the same
    morphed tokens, so take the loss once per group, weighted by its size; smooth-L1 and L2 depend on pred -
    target only, so morph the difference (cosine: both sides, concatenated)."""
    groups = morph_groups(target, schedule_tensor(schedules))  # [L, B, N]
    total = 0.0
    for g in groups:
        same = (g[:, :, None] == torch.arange(g.shape[1])[None, None, :]).to(pred.dtype)  # [B, N, slots]
        sizes = same.sum(1)  # [B, slots]
        mean = lambda x: (same.mT @ x) / sizes.clamp(min=1)[..., None]  # the group means, [B, slots, C]
        if loss == "cosine":
            per_group = 1 - F.cosine_similarity(mean(pred), mean(target), dim=-1)
        else:
            d = mean(pred - target)
            per_group = (torch.where(d.abs() < beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta) if loss == "smooth_l1"
                         else d ** 2).mean(-1)
        total = total + (per_group * sizes).sum() / g.numel()
    return total / len(schedules)


@pytest.mark.parametrize("loss", ["smooth_l1", "l2", "cosine"])
@pytest.mark.parametrize("clustered", [False, True])
def test_dtm_loss_equals_the_per_group_shortcut_in_values_and_gradients(loss, clustered):
    """morph.py compares every morphed token literally; the earlier per-group shortcut must give the same loss
    and gradients (float64), on random and on clustered tokens (many near-ties in the matching)."""
    rng = random.Random(len(loss) + clustered)
    for trial in range(10):
        torch.manual_seed(trial)
        target = torch.randn(3, 49, 8, dtype=torch.float64) * 2
        if clustered:
            target = target / 4 + torch.randn(3, 49, 1, dtype=torch.float64)
        pred = (target + torch.randn_like(target)).requires_grad_(True)
        schedules = [sample_schedule(49, 8, rng) for _ in range(2)]
        ours = dtm_loss(pred, target, schedule_tensor(schedules), loss)
        theirs = per_group_shortcut(pred, target, schedules, loss)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
        grad_ours, = torch.autograd.grad(ours, pred)
        grad_theirs, = torch.autograd.grad(theirs, pred)
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-17)
