"""resu: resurrection of sparse units — torch.compile-native sparse-parameter training.

::

    import resu
    resu.sparsify_(model)                        # nn.Linear weights become ResuParameters, in place
    resu.prune_(model, 0.7, method="wanda", calib=batches)
    resu.enter_resu_(model, epsilon=0.1)         # θ in the pruned slots, active weights frozen
    # or resu.enter_qresu_(model, bits=4, scheme="per_group")  # active weights frozen as packed 4-bit codes
    opt = resu.ResuAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model = torch.compile(model, fullgraph=True)
    ...                                          # train as usual
    resu.exit_resu_(model, commit=True)
"""

from resu import distributed
from resu.api.adopt import adopt_zeros_
from resu.api.commit import CommitStats, commit_
from resu.api.prune import prune_
from resu.api.qresu_phase import enter_qresu_, exit_qresu_
from resu.api.resu_phase import enter_resu_, exit_resu_
from resu.api.theta_phase import snapshot_weights
from resu.api.sparsify import densify_, sparsify_
from resu.api.stabilize import StabilizeStats, capture_reference, stabilize_
from resu.eval import generate_text, perplexity
from resu.io import (
    LoadResult,
    attach_hf_checkpointing,
    load_pretrained_,
    load_quantized_,
    load_safetensors_,
    save_pretrained,
    save_safetensors,
)
from resu.optim.selection_config import SelectionConfig
from resu.optim.resu_adamw import ResuAdamW
from resu.plotting import plot_cycles
from resu.prune.sequential import sequential_prune_
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.mask import SparseMask
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

__version__ = "0.1.0"

__all__ = [
    "CommitStats",
    "LoadResult",
    "CompactGrad",
    "ResuAdamW",
    "ResuMode",
    "ResuParameter",
    "SelectionConfig",
    "SparseMask",
    "StabilizeStats",
    "adopt_zeros_",
    "attach_hf_checkpointing",
    "capture_reference",
    "commit_",
    "densify_",
    "distributed",
    "enter_qresu_",
    "enter_resu_",
    "snapshot_weights",
    "exit_qresu_",
    "exit_resu_",
    "generate_text",
    "load_pretrained_",
    "load_quantized_",
    "load_safetensors_",
    "perplexity",
    "plot_cycles",
    "prune_",
    "save_pretrained",
    "save_safetensors",
    "sequential_prune_",
    "sparsify_",
    "stabilize_",
]
