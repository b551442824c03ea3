"""``ResuLayout``: the one metadata object of a ResuParameter, and what is generated from it."""

import io
import json

import pytest
import torch
import torch.nn as nn

import resu
from resu.core.selective import SelectionConfig
from resu.tensors.layout import INNER_TENSORS, ResuLayout, WritePolicy
from resu.tensors.mode import ResuMode

MODES = ["dense", "sparse", "resu", "qresu"]


def _param(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    resu.sparsify_(model)
    if mode != "dense":
        resu.prune_(model, 0.6)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.1, selective=SelectionConfig(strategy="random"))
    if mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=8)
    return model[0].weight


@pytest.mark.parametrize("mode", MODES)
def test_flatten_declares_the_inner_tensors_of_the_mode_and_the_layout_as_metadata(mode):
    p = _param(mode)
    names, meta = p.__tensor_flatten__()
    assert meta is p.resu_layout and tuple(names) == INNER_TENSORS[p.mode]
    rebuilt = type(p).__tensor_unflatten__({n: getattr(p, n) for n in names}, meta, p.shape, p.stride())
    assert rebuilt.resu_layout == p.resu_layout and rebuilt.mode is p.mode
    assert torch.equal(rebuilt.effective_weight(), p.effective_weight())


@pytest.mark.parametrize("mode", MODES)
def test_to_dict_is_json_and_round_trips(mode):
    layout = _param(mode).resu_layout
    data = json.loads(json.dumps(layout.to_dict()))
    back = ResuLayout.from_dict(data)
    assert back == layout
    assert (back.layout_id, back.selective, back.write_policy) == (layout.layout_id, layout.selective, layout.write_policy)


@pytest.mark.parametrize("mode", MODES)
def test_pickle_round_trips_the_whole_spec_with_weights_only(mode):
    p = _param(mode)
    buf = io.BytesIO()
    torch.save(p, buf)
    buf.seek(0)
    q = torch.load(buf, weights_only=True)
    assert q.resu_layout == p.resu_layout and q.resu_layout.layout_id == p.resu_layout.layout_id
    assert q.resu_layout.selective == p.resu_layout.selective
    assert isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad
    assert torch.equal(q.effective_weight(), p.effective_weight())


def test_equality_ignores_what_a_compiled_graph_does_not_depend_on():
    a = ResuLayout(ResuMode.SPARSE, "bitmap", 10)
    b = a.replace(layout_id=a.layout_id + 1, selective=SelectionConfig(), write_policy=WritePolicy.RESTORE_ACTIVE)
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(n_pruned=11) and a != a.replace(encoding="pruned_indices")
    assert a.with_mask(ResuMode.RESU, "bitmap", 10).layout_id != a.layout_id  # a new slot set: new optimizer states


def test_old_private_names_read_the_spec_and_writes_go_through_it():
    p = _param("resu")
    assert (p._mode, p._encoding, p._n_pruned, p._layout_id) == (
        p.resu_layout.mode, p.resu_layout.encoding, p.resu_layout.n_pruned, p.resu_layout.layout_id
    )
    layout_id = p.resu_layout.layout_id
    p._selective = None
    assert p.resu_layout.selective is None and p.resu_layout.layout_id == layout_id
    p.set_selective(SelectionConfig(strategy="magnitude"))
    p.set_write_policy(WritePolicy.RESTORE_ACTIVE)
    assert p._selective.strategy == "magnitude" and p.resu_layout.write_policy is WritePolicy.RESTORE_ACTIVE
    assert p.resu_layout.layout_id == layout_id  # same slot set: optimizer states are kept


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode=ResuMode.SPARSE), "encoding"),
        (dict(mode=ResuMode.QRESU, encoding="bitmap", n_pruned=3), "qformat"),
        (dict(mode="nope"), "nope"),
    ],
)
def test_bad_layouts_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResuLayout(**kwargs)


def test_constructor_refuses_inner_tensors_that_do_not_match_the_mode():
    layout = ResuLayout(ResuMode.SPARSE, "bitmap", 2)
    with pytest.raises(ValueError, match="_mask_storage"):
        resu.ResuParameter(layout, {"_weight": torch.zeros(2, 2)})
