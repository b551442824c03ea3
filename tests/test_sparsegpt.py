"""SparseGPT: against a slow textbook OBS reference, N:M exactness, and reconstruction error below Wanda's."""

import pytest
import torch

from resu.prune.registry import PRUNE_METHODS, PruneResult, PruneSpec
from resu.prune.select import lowest_scores, n_m_pruned
from resu.prune.sparsegpt import SparseGPTError, sparsegpt_prune


def _correlated_inputs(tokens, features, seed, factors=None):
    """Inputs whose features are correlated, as activations are: driven by fewer latent factors
    (features / 3) plus noise, with uneven feature scales. The OBS update has something to gain here
    over pruning without reconstruction."""
    g = torch.Generator().manual_seed(seed)
    factors = factors or max(1, features // 3)
    latent = torch.randn(tokens, factors, generator=g) @ torch.randn(factors, features, generator=g)
    scale = torch.rand(features, generator=g) * 2 + 0.1
    return (latent + 0.5 * torch.randn(tokens, features, generator=g)) * scale


def _weight(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _slow_reference(weight, gram, sparsity, pattern, block_size, damping=0.01):
    """SparseGPT written the textbook way, in float64: for column j the inverse Hessian of the columns
    j.. is inverted afresh (no Cholesky trick, no lazy block update)."""
    w = weight.double().clone()
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    cols = w.shape[1]
    h = h + damping * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    inv_rows = [torch.linalg.inv(h[j:, j:])[0] for j in range(cols)]  # [H_{j:,j:}⁻¹]_{0,:}
    diag = torch.stack([r[0] for r in inv_rows])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        if pattern is None:
            k = round(sparsity * stop) - round(sparsity * start)
            sal = w[:, start:stop] ** 2 / diag[start:stop]
            if k:
                pruned[:, start:stop].scatter_(1, sal.topk(k, dim=1, largest=False).indices, True)
        for j in range(start, stop):
            if pattern is not None and (j - start) % pattern[1] == 0:
                g = slice(j, j + pattern[1])
                sal = w[:, g] ** 2 / diag[g]
                pruned[:, g] = n_m_pruned(sal, *pattern)
            q = torch.where(pruned[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / diag[j]
            w[:, j:] -= err[:, None] * inv_rows[j][None, :]
            w[:, j] = q
    return pruned, w


@pytest.mark.parametrize("pattern,block_size", [(None, 8), (None, 64), ((2, 4), 8), ((4, 8), 16)])
def test_matches_slow_obs_reference(pattern, block_size):
    x = _correlated_inputs(512, 40, seed=1)
    w = _weight(12, 40, seed=2)
    gram = x.T @ x
    result = sparsegpt_prune(w, gram, 0.5, pattern=pattern, block_size=block_size)
    ref_pruned, ref_w = _slow_reference(w, gram, 0.5, pattern, block_size)
    assert torch.equal(result.pruned, ref_pruned)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-3, atol=1e-3)


def _rel_error(x, w, w_hat):
    return float((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_reconstruction_error_below_wanda(pattern):
    x = _correlated_inputs(2048, 96, seed=3)
    w = _weight(48, 96, seed=4)
    gram = x.T @ x
    wanda_scores = w.abs() * x.pow(2).sum(0).sqrt()
    wanda_pruned = lowest_scores(wanda_scores, 0.5, "row") if pattern is None else n_m_pruned(wanda_scores, *pattern)
    result = sparsegpt_prune(w, gram, 0.5, pattern=pattern)
    err_sparsegpt = _rel_error(x, w, result.weight)
    err_wanda = _rel_error(x, w, w.masked_fill(wanda_pruned, 0.0))
    assert err_sparsegpt < 0.8 * err_wanda, (err_sparsegpt, err_wanda)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_masks_are_exact(n, m):
    x = _correlated_inputs(256, 64, seed=5)
    w = _weight(16, 64, seed=6)
    result = sparsegpt_prune(w, x.T @ x, 0.0, pattern=(n, m), block_size=20)  # 20 → 16, a multiple of m
    groups = result.pruned.reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    assert (result.weight[result.pruned] == 0).all()
    assert (result.weight[~result.pruned] != 0).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_row_and_global_counts_are_exact(sparsity):
    x = _correlated_inputs(256, 50, seed=7)
    w = _weight(10, 50, seed=8)
    row = sparsegpt_prune(w, x.T @ x, sparsity, scope="row", block_size=16)
    assert (row.pruned.sum(1) == round(sparsity * 50)).all()
    glob = sparsegpt_prune(w, x.T @ x, sparsity, scope="global", block_size=16)
    assert int(glob.pruned.sum()) == round(sparsity * 500)


def test_zero_sparsity_keeps_the_weight():
    x = _correlated_inputs(256, 32, seed=9)
    w = _weight(8, 32, seed=10)
    result = sparsegpt_prune(w, x.T @ x, 0.0)
    assert not result.pruned.any()
    torch.testing.assert_close(result.weight, w)


def test_dead_inputs_are_zeroed_and_pruned_first():
    x = _correlated_inputs(256, 32, seed=11)
    x[:, [3, 17]] = 0.0
    w = _weight(8, 32, seed=12)
    result = sparsegpt_prune(w, x.T @ x, 0.25)
    assert result.pruned[:, [3, 17]].all()
    assert torch.isfinite(result.weight).all()


def test_weight_argument_is_not_modified():
    x = _correlated_inputs(128, 16, seed=13)
    w = _weight(4, 16, seed=14)
    before = w.clone()
    sparsegpt_prune(w, x.T @ x, 0.5)
    assert torch.equal(w, before)


def test_cholesky_failure_retries_with_more_dampening():
    # One slightly negative curvature: λ = 0.01 leaves it negative, the retry with 0.1 fixes it.
    gram = torch.eye(16)
    gram[5, 5] = -0.05
    result = sparsegpt_prune(_weight(4, 16, seed=15), gram, 0.5)
    assert torch.isfinite(result.weight).all()


def test_cholesky_failure_after_retries_raises_a_clear_error():
    with pytest.raises(SparseGPTError, match="not positive definite.*calibration"):
        sparsegpt_prune(_weight(4, 16, seed=16), -torch.eye(16), 0.5)


def test_bad_arguments_raise():
    w = _weight(4, 16, seed=17)
    with pytest.raises(ValueError, match="gram"):
        sparsegpt_prune(w, torch.eye(8), 0.5)
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_prune(w, torch.eye(16), 0.5, pattern=(2, 5))
    with pytest.raises(ValueError, match="scope"):
        sparsegpt_prune(w, torch.eye(16), 0.5, scope="column")


def test_registered_with_the_gram_statistic():
    method = PRUNE_METHODS.get("sparsegpt", "test", "method")
    assert method.statistic == "gram"
    x = _correlated_inputs(128, 16, seed=18)
    out = method(_weight(4, 16, seed=19), x.T @ x, PruneSpec(0.5, pattern=(2, 4)))
    assert isinstance(out, PruneResult) and (out.pruned.reshape(4, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="Gram"):
        method(_weight(4, 16, seed=19), None, PruneSpec(0.5))
