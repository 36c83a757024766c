"""DTM against an independent, slow, obvious implementation written here."""
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from morph import dtm_loss, morph, morph_groups, sample_schedule


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
    groups = morph_groups(tokens, schedule)
    assert groups.shape == (3, 196) and groups.dtype == torch.long
    for b in range(3):
        expected, merges = reference_partition(tokens[b], schedule)
        assert partition_of(groups[b]) == expected
        ids = groups[b].unique()
        assert len(ids) == 196 - merges  # group count = N - merges applied
        assert ids.tolist() == list(range(len(ids)))  # ids are 0..G-1


def test_random_schedules_match_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        schedule = sample_schedule(49, 14, rng)
        tokens = torch.randn(2, 49, 16, dtype=torch.float64)
        groups = morph_groups(tokens, schedule)
        for b in range(2):
            assert partition_of(groups[b]) == reference_partition(tokens[b], schedule)[0]


def test_matching_runs_in_float32_under_autocast():
    torch.manual_seed(1)
    tokens = torch.randn(2, 64, 32)
    plain = morph_groups(tokens, [6] * 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = morph_groups(tokens, [6] * 5)
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
    torch.testing.assert_close(dtm_loss(pred, target, schedules), hand_smooth_l1(pred, target, 2.0))


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
        torch.testing.assert_close(dtm_loss(pred, target, schedules, loss=name), value)
    torch.testing.assert_close(dtm_loss(pred, target, schedules, beta=0.5),
                               sum(hand_smooth_l1(p, t, 0.5) for p, t in per_schedule) / 3)


def test_gradients_reach_pred_only():
    torch.manual_seed(5)
    pred = torch.randn(2, 49, 8, requires_grad=True)
    target = torch.randn(2, 49, 8, requires_grad=True)
    dtm_loss(pred, target, [[5] * 4, [20]]).backward()
    assert target.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="'l3'"):
        dtm_loss(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), [[1]], loss="l3")


def test_sample_schedule_bounds_and_distribution():
    rng = random.Random(0)
    draws = [sample_schedule(196, 14, rng) for _ in range(20000)]
    ks = Counter(len(s) for s in draws)
    assert set(ks) == set(range(1, 15))  # k ~ U{1..14}
    assert max(ks.values()) / min(ks.values()) < 1.15
    for s in draws:
        assert len(set(s)) == 1 and 0 <= s[0] and s[0] * len(s) <= 196
    removed = [s[0] * len(s) for s in draws]
    # n ~ U{0..196}; rounding r = ceil(n/k) moves the total by less than k, mostly up: the mean stays near 98.
    assert 98 <= sum(removed) / len(removed) <= 98 + 7
    assert min(removed) == 0 and max(removed) == 196


def test_sample_schedule_rounding_rule():
    """r = ceil(n/k) unless ceil(n/k) * k > n_max, then floor(n/k): replay the draws with a twin RNG."""
    rng, twin = random.Random(7), random.Random(7)
    for _ in range(2000):
        s = sample_schedule(20, 6, rng)
        n, k = twin.randint(0, 20), twin.randint(1, 6)
        up = -(-n // k)
        assert s == [up if up * k <= 20 else n // k] * k


def test_compiling_dtm_loss_does_not_recompile_per_schedule():
    compiles = 0

    def counting_backend(graph_module, example_inputs):
        nonlocal compiles
        compiles += 1
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(dtm_loss, backend=counting_backend)
    rng = random.Random(0)
    torch.manual_seed(6)
    pred, target = torch.randn(2, 64, 16, requires_grad=True), torch.randn(2, 64, 16)
    schedules_seen = set()
    for _ in range(8):
        schedules = [sample_schedule(64, 8, rng), sample_schedule(64, 8, rng)]
        schedules_seen.add(str(schedules))
        torch.testing.assert_close(compiled(pred, target, schedules), dtm_loss(pred, target, schedules))
    assert len(schedules_seen) >= 6
    assert 1 <= compiles <= 2
