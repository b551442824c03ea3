"""The amnesty tournament: which slots stay active when resurrected weights compete with active ones.

After a RESU phase θ is merged into the weight, and ``n_keep`` slots per row (or per matrix) must be
chosen. Rather than one ranking, where freshly trained θ rarely beats long-trained active weights,
the two groups compete in separate tournaments: the active group for ``n_keep·(1 − r)`` slots and
the resurrected group for ``n_keep·r``, with ``r`` the resurrection budget of the cycle. If a group
has fewer candidates than its share, the other group fills the leftover slots, best scores first.
"""

from __future__ import annotations

import torch

from resu.api.validation import check_fraction


def resurrection_budget(cycle: int, num_cycles: int, r_start: float = 0.10, r_end: float = 0.02) -> float:
    """r(c), decaying linearly from ``r_start`` at cycle 0 to ``r_end`` at cycle ``num_cycles − 1``."""
    r_start = check_fraction(r_start, "r_start", "resurrection_budget")
    r_end = check_fraction(r_end, "r_end", "resurrection_budget")
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise ValueError(f"resurrection_budget: `num_cycles` must be an integer >= 1, got {num_cycles!r}")
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 0:
        raise ValueError(f"resurrection_budget: `cycle` must be an integer >= 0, got {cycle!r}")
    if num_cycles == 1:
        return r_start
    progress = min(cycle, num_cycles - 1) / (num_cycles - 1)
    return r_start + (r_end - r_start) * progress


def _rank_within(scores: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based rank (best score first) of every member slot among the members.

    Non-members get ranks after all members. Ties go to the lower column index (stable sort), so the
    result is deterministic.
    """
    key = torch.where(members, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _resurrection_shares(scores, rank_res, n_keep, available_res, budget: float) -> torch.Tensor:
    """Per-row places reserved for resurrected slots: ``round(budget · Σ n_keep)`` in all.

    Every row gets ``floor(budget · n_keep[i])``; the remaining places go, one each, to the rows whose
    next resurrected candidate scores highest. (Rounding row by row would give short rows no place
    at all once ``budget · n_keep`` drops below one half.)
    """
    exact = n_keep.double() * budget
    shares = torch.floor(exact).to(torch.int64)
    remainder = int(round(float(exact.sum()))) - int(shares.sum())
    if remainder <= 0:
        return shares
    # score of each row's best resurrected candidate not yet given a place
    next_rank = shares.clamp_max(scores.shape[1] - 1)
    is_next = rank_res == next_rank[:, None]
    next_score = torch.where(is_next, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32)).amax(dim=1)
    eligible = (available_res > shares) & (n_keep > shares)
    next_score = torch.where(eligible, next_score, torch.full_like(next_score, float("-inf")))
    n_extra = min(remainder, int(eligible.sum()))
    if n_extra:
        order = torch.sort(next_score, descending=True, stable=True).indices[:n_extra]
        shares[order] += 1
    return shares


def amnesty_keep(
    scores: torch.Tensor, was_pruned: torch.Tensor, n_keep: torch.Tensor, budget: float
) -> torch.Tensor:
    """The active slots after the tournament, for 2-D ``scores`` (one tournament per row).

    Args:
        scores: higher is better, shape ``(rows, cols)``.
        was_pruned: bool, True at the slots that held θ (resurrection candidates).
        n_keep: int64 ``(rows,)``: how many slots of each row stay active.
        budget: r, the share of each row's ``n_keep`` reserved for resurrected slots.

    Returns:
        Bool tensor of ``scores``' shape, True at the slots that stay active; exactly ``n_keep[i]``
        per row.
    """
    if scores.dim() != 2 or was_pruned.shape != scores.shape:
        raise ValueError("amnesty_keep: `scores` and `was_pruned` must be 2-D tensors of the same shape")
    budget = check_fraction(budget, "budget", "amnesty_keep")
    n_keep = n_keep.to(torch.int64)
    cols = scores.shape[1]
    if bool((n_keep < 0).any()) or bool((n_keep > cols).any()):
        raise ValueError(f"amnesty_keep: every `n_keep` must be in [0, {cols}]")
    was_pruned = was_pruned.to(torch.bool)
    available_res = was_pruned.sum(dim=1)
    available_act = cols - available_res
    rank_res = _rank_within(scores, was_pruned)
    share_res = _resurrection_shares(scores, rank_res, n_keep, available_res, budget)
    take_res = torch.minimum(share_res, available_res)
    take_act = torch.minimum(n_keep - share_res, available_act)
    leftover = n_keep - take_res - take_act
    extra_res = torch.minimum(leftover, available_res - take_res)
    quota_res = take_res + extra_res
    quota_act = take_act + (leftover - extra_res)
    keep_res = was_pruned & (rank_res < quota_res[:, None])
    keep_act = ~was_pruned & (_rank_within(scores, ~was_pruned) < quota_act[:, None])
    return keep_res | keep_act


def capped_amnesty_keep(
    scores: torch.Tensor, was_pruned: torch.Tensor, n_keep: torch.Tensor, budget: float
) -> torch.Tensor:
    """Amnesty with ``budget`` as a cap rather than a quota, for 2-D ``scores`` (one tournament per row).

    A resurrection candidate takes a place only where its score beats the weakest active slot it would
    evict, i.e. where one joint ranking would keep it, and at most ``round(budget · n_keep[i])`` of them
    per row. With a short θ phase most θ are still small, and :func:`amnesty_keep`'s reserved share then
    evicts active weights that are better than the θ replacing them; here a row with no θ worth keeping
    keeps its active slots.

    Args and returns: as :func:`amnesty_keep`.
    """
    if scores.dim() != 2 or was_pruned.shape != scores.shape:
        raise ValueError("capped_amnesty_keep: `scores` and `was_pruned` must be 2-D tensors of the same shape")
    budget = check_fraction(budget, "budget", "capped_amnesty_keep")
    n_keep = n_keep.to(torch.int64)
    if bool((n_keep < 0).any()) or bool((n_keep > scores.shape[1]).any()):
        raise ValueError(f"capped_amnesty_keep: every `n_keep` must be in [0, {scores.shape[1]}]")
    was_pruned = was_pruned.to(torch.bool)
    wanted = (joint_keep(scores, n_keep) & was_pruned).sum(dim=1)
    cap = torch.floor(n_keep.double() * budget + 0.5).to(torch.int64)
    take_res = torch.minimum(wanted, cap)
    # a row with fewer active candidates than n_keep - take_res was given them by the joint ranking already
    take_act = torch.minimum(n_keep - take_res, (~was_pruned).sum(dim=1))
    take_res = n_keep - take_act
    keep_res = was_pruned & (_rank_within(scores, was_pruned) < take_res[:, None])
    keep_act = ~was_pruned & (_rank_within(scores, ~was_pruned) < take_act[:, None])
    return keep_res | keep_act


def joint_keep(scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Plain re-pruning: the ``n_keep[i]`` best slots of every row, whatever group they belong to."""
    everyone = torch.ones_like(scores, dtype=torch.bool)
    return _rank_within(scores, everyone) < n_keep.to(torch.int64)[:, None]
