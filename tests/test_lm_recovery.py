"""The LM recovery recipes: sparse fine-tuning and RESU → commit → fine-tuning, at equal steps."""


import pytest
import torch

import resu
from resu.recipes import RecoveryRecipe, finetune_, recover_

transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0):
    """A 2-block Llama with every decoder Linear sparsified (DENSE mode; the tied head stays plain)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    resu.sparsify_(model, filter_fn=lambda name, m: "lm_head" not in name)
    return model


def _pruned_llama(seed: int = 0, sparsity: float = 0.5):
    model = _llama(seed)
    resu.prune_(model, sparsity, method="wanda", calib=_batches(2, seed=99))
    return model


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


class _Counting:
    def __init__(self, batches):
        self.taken = 0
        self._it = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        self.taken += 1
        return next(self._it)


def _weights(model):
    return {n: p for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}


@pytest.mark.parametrize("reprune", ["sparsegpt", None])
@pytest.mark.parametrize("quantized", [None, {"bits": 4, "scheme": "per_group", "group_size": 16}])
def test_recover_spends_exactly_the_step_budget_and_keeps_the_sparsity(quantized, reprune):
    model = _pruned_llama()
    masks = {n: p.active_mask.clone() for n, p in _weights(model).items()}
    before = {n: p.n_pruned for n, p in _weights(model).items()}
    stream = _Counting(_batches(50, seed=1))
    recipe = RecoveryRecipe(quantized=quantized, budget=0.5, reprune=reprune, resu_fraction=0.5)
    report = recover_(model, stream, 6, calib=_batches(2, seed=2), recipe=recipe)
    assert stream.taken == 6 and len(report.losses) == 6
    assert (report.theta_steps, report.finetune_steps) == (3, 3)
    for n, p in _weights(model).items():
        assert p.mode is resu.ResuMode.SPARSE
        assert p.n_pruned == before[n]  # back at the starting sparsity, row by row
        assert torch.all(p.effective_weight()[~p.active_mask] == 0)
    changed = sum(int((p.active_mask != masks[n]).sum()) for n, p in _weights(model).items())
    assert changed == 2 * report.n_resurrected  # every resurrection evicted one active slot


def test_finetune_trains_active_weights_only():
    model = _pruned_llama()
    w0 = {n: p.effective_weight().clone() for n, p in _weights(model).items()}
    losses = finetune_(model, _batches(4, seed=3), 4, recipe=RecoveryRecipe(lr=1e-2))
    assert len(losses) == 4 and all(l == l for l in losses)
    moved = 0
    for n, p in _weights(model).items():
        w = p.effective_weight()
        assert torch.all(w[~p.active_mask] == 0)
        moved += int((w != w0[n]).sum())
    assert moved > 0


def test_theta_starts_at_zero_and_the_frozen_weights_do_not_move_in_the_theta_phase():
    model = _pruned_llama()
    w0 = {n: p.effective_weight().clone() for n, p in _weights(model).items()}
    seen = []

    def on_step(phase, step, loss):
        if phase == "theta":
            for n, p in _weights(model).items():
                active = p.active_mask
                assert torch.equal(p.effective_weight()[active], w0[n][active])  # active slots frozen
            seen.append(step)

    recover_(model, _batches(4, seed=4), 4, calib=_batches(2), recipe=RecoveryRecipe(resu_fraction=0.5), on_step=on_step)
    assert seen == [1, 2]


def test_a_reprune_commit_keeps_an_n_m_pattern_it_detects_from_the_masks():
    from resu.recipes.lm_recovery import detect_pattern

    model = _llama()
    resu.prune_(model, 0.5, method="wanda", calib=_batches(2, seed=99), pattern="2:4")
    params = list(_weights(model).values())
    assert detect_pattern(params) == "2:4"
    assert detect_pattern(list(_weights(_pruned_llama()).values())) is None  # unstructured 50%
    report = recover_(model, _batches(4, seed=8), 4, calib=_batches(2), recipe=RecoveryRecipe(theta_lr=1e-2))
    assert report.n_resurrected > 0  # the mask did change
    for p in params:
        pruned = (~p.active_mask).reshape(p.shape[0], -1, 4).sum(dim=-1)
        assert torch.all(pruned == 2)


def test_cycles_split_the_budget_into_rounds_and_end_sparse():
    model = _pruned_llama()
    before = {n: p.n_pruned for n, p in _weights(model).items()}
    phases = []
    stream = _Counting(_batches(50, seed=5))
    recipe = RecoveryRecipe(cycles=3, resu_fraction=0.5)
    report = recover_(model, stream, 8, calib=_batches(2), recipe=recipe, on_step=lambda phase, step, loss: phases.append(phase))
    # shares 2, 2, 4 steps: θ 1, 1, 2 then fine-tuning 1, 1, 2
    assert phases == ["theta", "finetune", "theta", "finetune", "theta", "theta", "finetune", "finetune"]
    assert (report.theta_steps, report.finetune_steps, stream.taken) == (4, 4, 8)
    assert all(p.mode is resu.ResuMode.SPARSE and p.n_pruned == before[n] for n, p in _weights(model).items())


@pytest.mark.parametrize("warmup, divisor", [(0.0, 1), (1.0, 4)])
def test_warmup_scales_the_first_theta_step(warmup, divisor):
    # θ starts at zero and Adam's first step moves every slot with a gradient by lr (m̂/√v̂ = ±1), so
    # the largest |θ| after one step is the first step's learning rate: theta_lr / k with k warm-up steps.
    model = _pruned_llama()
    seen = []

    def on_step(phase, step, loss):
        if phase == "theta" and step == 1:
            seen.append(max(float(p.theta.abs().max()) for p in _weights(model).values()))

    recipe = RecoveryRecipe(theta_lr=1e-2, warmup=warmup, resu_fraction=0.5, reprune=None)
    recover_(model, _batches(8, seed=6), 8, calib=_batches(2), recipe=recipe, on_step=on_step)
    assert seen and seen[0] == pytest.approx(1e-2 / divisor, rel=1e-3)


def test_selective_theta_trains_only_part_of_theta():
    model = _pruned_llama()
    moved, total = [], []

    def on_step(phase, step, loss):
        if phase == "theta" and step == 1:
            for p in _weights(model).values():
                moved.append(int((p.theta != 0).sum()))
                total.append(p.theta.numel())

    recipe = RecoveryRecipe(selective=resu.SelectionConfig(strategy="random", k_select_ratio=0.25), resu_fraction=0.5)
    recover_(model, _batches(4, seed=7), 4, calib=_batches(2), recipe=recipe, on_step=on_step,
             generator=torch.Generator().manual_seed(0))
    assert 0 < sum(moved) <= 0.25 * sum(total) + len(total)


def test_recover_refuses_bad_input_and_changes_nothing():
    model = _pruned_llama()
    with pytest.raises(ValueError, match="calib"):
        recover_(model, _batches(2), 2)
    with pytest.raises(ValueError, match="steps"):
        recover_(model, _batches(2), -1, calib=_batches(1))
    assert all(p.mode is resu.ResuMode.SPARSE for p in _weights(model).values())
    resu.densify_(model)
    dense = transformers.LlamaForCausalLM(model.config)
    resu.sparsify_(dense)
    with pytest.raises(ValueError, match="SPARSE"):
        recover_(dense, _batches(2), 2, calib=_batches(1))
    with pytest.raises(ValueError, match="resu_fraction"):
        RecoveryRecipe(resu_fraction=1.5)
    for field, bad in (("warmup", 1.5), ("cycles", 0), ("reprune", "no_such_method"), ("selective", {"k": 1})):
        with pytest.raises(ValueError, match=field):
            RecoveryRecipe(**{field: bad})


def test_recover_from_the_snapshot_starts_its_theta_phase_at_the_unpruned_model():
    from resu.recipes import causal_lm_loss

    model = _llama()
    batches = _batches(6, seed=1)
    with torch.no_grad():
        dense_loss = float(causal_lm_loss(model, batches[0]))
    snap = resu.snapshot_weights(model)
    resu.prune_(model, 0.5, method="wanda", calib=_batches(2, seed=9))
    with torch.no_grad():
        pruned_loss = float(causal_lm_loss(model, batches[0]))
    assert abs(pruned_loss - dense_loss) > 1e-3
    recipe = RecoveryRecipe(cycles=2, resu_fraction=0.5)
    report = recover_(model, batches, 6, calib=_batches(2, seed=2), recipe=recipe, init_from=snap)
    assert report.losses[0] == pytest.approx(dense_loss, rel=1e-5)  # the first θ step saw the dense model
    for p in _weights(model).values():
        assert p.mode is resu.ResuMode.SPARSE and p.sparsity == pytest.approx(0.5, abs=0.02)
