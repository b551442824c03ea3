"""DSnoT stabilization: swaps keep per-row sparsity and never increase the calibration reconstruction error."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import resu
from resu.prune.dsnot import refine_mask
from resu.prune.select import lowest_scores


def _error(weight, pruned, x):
    """‖(W ⊙ P) xᵀ‖², straight from the activations."""
    return float(((weight * pruned) @ x.t()).pow(2).sum())


@given(
    out=st.integers(1, 8),
    inp=st.integers(2, 16),
    sparsity=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
    rounds=st.integers(0, 10),
)
def test_refine_lowers_the_reconstruction_error_and_keeps_row_counts(out, inp, sparsity, seed, rounds):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64).float()
    x = torch.randn(32, inp, generator=gen) + torch.rand(inp, generator=gen)  # nonzero means, like post-ReLU inputs
    pruned = lowest_scores(w.abs(), sparsity)
    res = refine_mask(w, pruned, x.t() @ x, rounds)
    assert torch.equal(res.pruned.sum(1), pruned.sum(1))
    before, after = _error(w, pruned, x), _error(w, res.pruned, x)
    assert res.error_before == pytest.approx(before, rel=1e-4, abs=1e-4)
    assert res.error_after == pytest.approx(after, rel=1e-4, abs=1e-4)
    assert after <= before * (1 + 1e-5) + 1e-5
    assert res.n_swaps <= rounds * out
    assert res.n_swaps >= int((pruned & ~res.pruned).sum())  # a slot may be revived and pruned again
    if rounds == 0:
        assert torch.equal(res.pruned, pruned) and res.n_swaps == 0


def test_refine_finds_the_obvious_swap():
    # input 0 is always large, input 1 always ~0: pruning w[0, 0] costs a lot, w[0, 1] nothing
    x = torch.stack([torch.full((64,), 5.0), torch.randn(64) * 1e-3, torch.randn(64)], dim=1)
    w = torch.tensor([[0.1, 1.0, 2.0]])
    pruned = torch.tensor([[True, False, False]])
    res = refine_mask(w, pruned, x.t() @ x, 5)
    assert res.pruned.tolist() == [[False, True, False]]
    assert res.n_swaps == 1 and res.error_after < 0.01 * res.error_before


def _pruned_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
    resu.sparsify_(model)
    reference = resu.capture_reference(model)
    resu.prune_(model, 0.6)
    calib = [torch.randn(16, 12) + 0.5 for _ in range(3)]
    return model, reference, calib


def test_stabilize_refines_masks_and_restores_revived_values():
    model, reference, calib = _pruned_model()
    before = {n: p.active_mask.clone() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    stats = resu.stabilize_(model, calib, reference=reference, max_rounds=20)
    assert stats.n_swaps > 0
    assert stats.error_after < stats.error_before and 0 < stats.relative_error_reduction <= 1
    for name, p in model.named_parameters():
        if not isinstance(p, resu.ResuParameter):
            continue
        assert p.mode is resu.ResuMode.SPARSE
        assert torch.equal(p.active_mask.sum(1), before[name].sum(1))
        w = p.effective_weight()
        assert torch.equal(w[p.active_mask], reference[name][p.active_mask])  # revived slots got their old values
        assert bool((w[~p.active_mask] == 0).all())


def test_stabilize_without_reference_changes_nothing():
    model, _, calib = _pruned_model(1)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = resu.stabilize_(model, calib, max_rounds=10)
    assert stats.n_swaps == 0 and stats.error_after == pytest.approx(stats.error_before)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snap[n])


def test_stabilize_errors_leave_the_model_unchanged():
    model, reference, calib = _pruned_model(2)
    snap = {n: p.active_mask.clone() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    with pytest.raises(ValueError, match="max_rounds"):
        resu.stabilize_(model, calib, reference=reference, max_rounds=-1)
    with pytest.raises(ValueError, match="shape"):
        resu.stabilize_(model, calib, reference={"0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no batches"):
        resu.stabilize_(model, [], reference=reference)
    dense = resu.sparsify_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="SPARSE"):
        resu.stabilize_(dense, [torch.randn(2, 4)])
    for n, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            assert torch.equal(p.active_mask, snap[n])
