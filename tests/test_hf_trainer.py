"""transformers.Trainer with resu.ResuAdamW on a sparsified model in RESU and QRESU mode: gradient
accumulation, max_grad_norm, bf16 autocast on the CPU, save_strategy checkpoints, and resuming from a
checkpoint continues exactly where uninterrupted training goes. Frozen weights stay bitwise frozen."""

import os

import pytest
import torch

import resu
from resu.io import attach_hf_checkpointing, load_pretrained_
from tests.helpers import assert_same_state, exact_state

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _in_mode(model, mode):
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    else:
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=16, epsilon=0.5,
                          generator=torch.Generator().manual_seed(0))
    return attach_hf_checkpointing(model)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer(model, out, max_steps=4):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
        save_strategy="steps", save_steps=2, max_grad_norm=0.5, bf16=True, use_cpu=True, report_to=[],
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, seed=0, data_seed=0, disable_tqdm=True,
    )
    opt = resu.ResuAdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, max_steps)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))


def _frozen(model):
    """What training must not touch: active values (RESU) or codes and scales (QRESU), and every mask."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            if p.mode is resu.ResuMode.QRESU:
                out[name] = [p._qdata.clone(), p._qscale.clone(), p._qzero.clone(), p._mask_storage.clone()]
            else:
                out[name] = [p.effective_weight()[p.active_mask].clone(), p._mask_storage.clone()]
    return out


@pytest.mark.parametrize("mode", ["resu", "qresu"])
def test_trainer_trains_theta_checkpoints_and_resumes_exactly(tmp_path, mode):
    model = _in_mode(_model(), mode)
    frozen = _frozen(model)
    theta = {n: p.theta.clone() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "checkpoint-4"]
    assert "resu_layout.safetensors" in os.listdir(tmp_path / "run" / "checkpoint-2")
    after = _frozen(model)
    for name in frozen:
        assert all(torch.equal(a, b) for a, b in zip(frozen[name], after[name])), name
    assert any(not torch.equal(theta[n], p.theta) for n, p in model.named_parameters() if n in theta)

    # resume from the middle checkpoint in a fresh process-like setting: a new model and optimizer
    ckpt = tmp_path / "run" / "checkpoint-2"
    fresh = resu.sparsify_(transformers.AutoModelForCausalLM.from_pretrained(ckpt))
    load_pretrained_(fresh, ckpt)
    attach_hf_checkpointing(fresh)
    _trainer(fresh, tmp_path / "resumed").train(resume_from_checkpoint=str(ckpt))
    assert_same_state(exact_state(model), exact_state(fresh), same_objects=False)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        if isinstance(p, resu.ResuParameter):
            assert p.resu_layout.to_dict() == q.resu_layout.to_dict(), n


def test_resume_refuses_weights_that_are_not_the_models_own_export(tmp_path):
    """The reload hook only lets through the model's own export: other dense weights are refused."""
    model = _in_mode(_model(), "resu")
    _trainer(model, tmp_path / "run", max_steps=2).train()
    other = _in_mode(_model(seed=1), "resu")  # a different model: its weights are not the checkpoint's
    before = exact_state(other)
    with pytest.raises(ValueError, match="resu.load_pretrained_"):
        _trainer(other, tmp_path / "other").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_same_state(before, exact_state(other))


def test_readme_trainer_block_runs(tmp_path):
    from tests.test_safetensors import readme_block

    model = _in_mode(_model(), "qresu")
    trainer = _trainer(model, tmp_path / "run")  # the arguments and data the README's block refers to
    namespace = {
        "model": model, "args": trainer.args, "data": Tokens(), "transformers": transformers, "resu": resu,
        "AutoModelForCausalLM": transformers.AutoModelForCausalLM, "ckpt": str(tmp_path / "run" / "checkpoint-2"),
    }
    exec(readme_block("Hugging Face", 1), namespace)
    resumed = namespace["model"]
    assert resumed is not model and resumed.model.layers[0].mlp.up_proj.weight.mode is resu.ResuMode.QRESU
    assert_same_state(exact_state(model), exact_state(resumed), same_objects=False)
