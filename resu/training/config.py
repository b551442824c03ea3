"""``RESUConfig``: every knob of a RESU training run, checked on construction, plus presets.

A run is ``num_cycles`` cycles of ``steps_per_cycle`` steps each, split into TRAIN, STABILIZE and
RESU by ``train_fraction``, ``stabilize_fraction`` and ``resu_fraction`` (they must sum to 1).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import resu.prune  # noqa: F401  (registers the built-in prune methods and commit strategies)
from resu.prune.registry import COMMIT_STRATEGIES, PRUNE_METHODS
from resu.tensors.quantized import SCHEMES

SCORE_TYPES = ("magnitude", "gradient", "wanda")
PRUNING_SCOPES = ("row", "global")
STABILIZE_METHODS = ("dsnot", "none")
QRESU_SCHEMES = SCHEMES  # every scheme of resu.tensors.quantized (affine ones and "nf4")
_FRACTION_TOLERANCE = 1e-6


class SparsitySchedule(str, enum.Enum):
    """How the target sparsity of cycle ``c`` moves from ``initial_sparsity`` to ``target_sparsity``.

    - ``CONSTANT``: ``target_sparsity`` from the first cycle on.
    - ``LINEAR``: equal steps; cycle ``c`` of ``N`` targets ``s0 + (s1 - s0)·(c + 1)/N``.
    - ``COSINE``: ``s0 + (s1 - s0)·(1 - cos(π·(c + 1)/N))/2`` (small steps first and last).
    """

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class DensificationSchedule(str, enum.Enum):
    """How sparsity decreases when ``densify=True``.

    - ``STEPPED``: cycle ``c`` targets ``densification_steps[c]`` (the last entry once the list ends).
    - ``LINEAR``: equal steps from ``initial_sparsity`` (cycle 0) to ``densification_steps[-1]``
      (last cycle).
    """

    STEPPED = "stepped"
    LINEAR = "linear"


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(f"RESUConfig: `{name}` must be a number, got {value!r}")
    return float(value)


def _fraction(value, name: str) -> float:
    value = _number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"RESUConfig: `{name}` must be in [0, 1], got {value}")
    return value


def _positive(value, name: str, allow_zero: bool = False) -> float:
    value = _number(value, name)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"RESUConfig: `{name}` must be a finite number {bound}, got {value}")
    return value


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"RESUConfig: `{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _choice(value, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"RESUConfig: unknown `{name}` {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def _enum(value, name: str, enum_cls):
    try:
        return enum_cls(value)
    except ValueError:
        options = ", ".join(repr(e.value) for e in enum_cls)
        raise ValueError(f"RESUConfig: unknown `{name}` {value!r}; expected a {enum_cls.__name__} ({options})") from None


@dataclass
class RESUConfig:
    """Configuration of a RESU run (see :class:`resu.training.cycle.RESUTrainer`).

    Invalid values raise a ``ValueError`` naming the field when the config is built.
    """

    # Sparsity
    initial_sparsity: float = 0.0
    target_sparsity: float = 0.7
    sparsity_schedule: SparsitySchedule = SparsitySchedule.LINEAR

    # Densification (sparsity goes *down* over the cycles)
    densify: bool = False
    densification_steps: list = field(default_factory=lambda: [0.7, 0.5, 0.3, 0.1, 0.0])
    densification_schedule: DensificationSchedule = DensificationSchedule.STEPPED

    # Cycle structure
    num_cycles: int = 5
    steps_per_cycle: int = 1000
    train_fraction: float = 0.6
    stabilize_fraction: float = 0.1
    resu_fraction: float = 0.3

    # RESU parameters
    resu_lr: float = 1e-4
    resu_epsilon: float = 0.1
    freeze_active_during_resu: bool = True

    # RESU-Selective
    use_selective: bool = False
    selective_beta: float = 0.9
    selective_tau: float = 0.5
    selective_k_select_ratio: float = 0.2
    selective_k_screen_ratio: float = 0.5
    selective_delta: float = 1e-8

    # QRESU (quantized frozen active weights during the RESU phase)
    use_qresu: bool = False
    qresu_bits: int = 4
    qresu_scheme: str = "per_channel"
    qresu_group_size: int = 128

    # Amnesty / commit
    use_amnesty: bool = True
    commit_strategy: str = "amnesty"
    amnesty_r_start: float = 0.10
    amnesty_r_end: float = 0.02
    amnesty_score_type: str = "magnitude"

    # Pruning and stabilization
    pruning_method: str = "wanda"
    pruning_scope: str = "row"
    stabilize_method: str = "dsnot"
    calib_batches: int = 4

    # Optimizer
    base_lr: float = 1e-3
    weight_decay: float = 0.01

    # Run
    seed: int = 0
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.initial_sparsity = _fraction(self.initial_sparsity, "initial_sparsity")
        self.target_sparsity = _fraction(self.target_sparsity, "target_sparsity")
        self.sparsity_schedule = _enum(self.sparsity_schedule, "sparsity_schedule", SparsitySchedule)
        self.densification_schedule = _enum(self.densification_schedule, "densification_schedule", DensificationSchedule)
        for flag in ("densify", "freeze_active_during_resu", "use_selective", "use_qresu", "use_amnesty", "progress_bar"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"RESUConfig: `{flag}` must be True or False, got {getattr(self, flag)!r}")
        steps = self.densification_steps
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
            raise ValueError(f"RESUConfig: `densification_steps` must be a list of sparsities, got {steps!r}")
        self.densification_steps = [_fraction(s, "densification_steps") for s in steps]
        if self.densify:
            if not self.densification_steps:
                raise ValueError("RESUConfig: `densification_steps` must not be empty when densify=True")
            if any(b > a for a, b in zip(self.densification_steps, self.densification_steps[1:])):
                raise ValueError(
                    f"RESUConfig: `densification_steps` must not increase when densify=True, got {self.densification_steps}"
                )
        self.num_cycles = _count(self.num_cycles, "num_cycles", 1)
        self.steps_per_cycle = _count(self.steps_per_cycle, "steps_per_cycle", 1)
        for name in ("train_fraction", "stabilize_fraction", "resu_fraction"):
            setattr(self, name, _fraction(getattr(self, name), name))
        total = self.train_fraction + self.stabilize_fraction + self.resu_fraction
        if abs(total - 1.0) > _FRACTION_TOLERANCE:
            raise ValueError(
                "RESUConfig: `train_fraction` + `stabilize_fraction` + `resu_fraction` must sum to 1, got "
                f"{self.train_fraction} + {self.stabilize_fraction} + {self.resu_fraction} = {total:g}"
            )
        self.resu_lr = _positive(self.resu_lr, "resu_lr")
        self.base_lr = _positive(self.base_lr, "base_lr")
        self.resu_epsilon = _positive(self.resu_epsilon, "resu_epsilon", allow_zero=True)
        self.weight_decay = _positive(self.weight_decay, "weight_decay", allow_zero=True)
        self.selective_delta = _positive(self.selective_delta, "selective_delta")
        beta = _number(self.selective_beta, "selective_beta")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"RESUConfig: `selective_beta` must be in [0, 1), got {beta}")
        self.selective_beta = beta
        self.selective_tau = _fraction(self.selective_tau, "selective_tau")
        self.selective_k_select_ratio = _fraction(self.selective_k_select_ratio, "selective_k_select_ratio")
        self.selective_k_screen_ratio = _fraction(self.selective_k_screen_ratio, "selective_k_screen_ratio")
        bits = self.qresu_bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in (4, 8):  # 4.0 is not 4
            raise ValueError(f"RESUConfig: `qresu_bits` must be the int 4 or 8, got {bits!r}")
        self.qresu_bits = int(bits)
        _choice(self.qresu_scheme, "qresu_scheme", QRESU_SCHEMES)
        self.qresu_group_size = _count(self.qresu_group_size, "qresu_group_size", 1)
        if self.use_qresu and not self.freeze_active_during_resu:
            raise ValueError(
                "RESUConfig: `use_qresu=True` keeps the active weights quantized and frozen; it needs "
                "freeze_active_during_resu=True"
            )
        _choice(self.commit_strategy, "commit_strategy", COMMIT_STRATEGIES.names())
        self.amnesty_r_start = _fraction(self.amnesty_r_start, "amnesty_r_start")
        self.amnesty_r_end = _fraction(self.amnesty_r_end, "amnesty_r_end")
        _choice(self.amnesty_score_type, "amnesty_score_type", SCORE_TYPES)
        _choice(self.pruning_method, "pruning_method", PRUNE_METHODS.names())
        _choice(self.pruning_scope, "pruning_scope", PRUNING_SCOPES)
        _choice(self.stabilize_method, "stabilize_method", STABILIZE_METHODS)
        self.calib_batches = _count(self.calib_batches, "calib_batches", 1)
        self.seed = _count(self.seed, "seed", 0)

    # ------------------------------------------------------------------ derived values
    def phase_steps(self) -> tuple[int, int, int]:
        """``(train_steps, stabilize_steps, resu_steps)`` of one cycle; they add up to ``steps_per_cycle``.

        STABILIZE is training-free: its steps are the most swap rounds DSNoT may make.
        """
        train = int(round(self.steps_per_cycle * self.train_fraction))
        stabilize = min(self.steps_per_cycle - train, int(round(self.steps_per_cycle * self.stabilize_fraction)))
        return train, stabilize, self.steps_per_cycle - train - stabilize

    def sparsity_at(self, cycle: int, num_cycles: Optional[int] = None) -> float:
        """The target sparsity of cycle ``cycle`` (0-based) of ``num_cycles`` (default ``self.num_cycles``)."""
        n = max(1, num_cycles or self.num_cycles)
        c = min(max(cycle, 0), n - 1)
        if self.densify:
            steps = self.densification_steps
            if self.densification_schedule is DensificationSchedule.STEPPED:
                return steps[min(c, len(steps) - 1)]
            progress = c / (n - 1) if n > 1 else 1.0
            return self.initial_sparsity + (steps[-1] - self.initial_sparsity) * progress
        start, end = self.initial_sparsity, self.target_sparsity
        if self.sparsity_schedule is SparsitySchedule.CONSTANT:
            return end
        progress = (c + 1) / n
        if self.sparsity_schedule is SparsitySchedule.COSINE:
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return start + (end - start) * progress

    def resurrection_budget(self, cycle: int, num_cycles: Optional[int] = None) -> float:
        """r(c): the share of kept slots reserved for resurrected weights in cycle ``cycle``."""
        from resu.prune.amnesty import resurrection_budget

        return resurrection_budget(cycle, num_cycles or self.num_cycles, self.amnesty_r_start, self.amnesty_r_end)

    def to_dict(self) -> dict:
        """A JSON-friendly dict (enums as their values)."""
        out = asdict(self)
        out["sparsity_schedule"] = self.sparsity_schedule.value
        out["densification_schedule"] = self.densification_schedule.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RESUConfig":
        """The inverse of :meth:`to_dict`; unknown keys raise a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RESUConfig.from_dict: unknown field(s) {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------- presets
def default_config(**overrides) -> RESUConfig:
    """70% target sparsity over 5 cycles of 1000 steps (60% TRAIN, 10% STABILIZE, 30% RESU), amnesty commit."""
    return RESUConfig(**overrides)


def aggressive_pruning_config(**overrides) -> RESUConfig:
    """90% sparsity over 7 cycles, with a larger resurrection budget early on."""
    settings = dict(target_sparsity=0.9, num_cycles=7, amnesty_r_start=0.15, amnesty_r_end=0.03)
    return RESUConfig(**{**settings, **overrides})


def conservative_pruning_config(**overrides) -> RESUConfig:
    """50% sparsity over 3 cycles."""
    settings = dict(target_sparsity=0.5, num_cycles=3, amnesty_r_start=0.05, amnesty_r_end=0.01)
    return RESUConfig(**{**settings, **overrides})


def densification_config(**overrides) -> RESUConfig:
    """Recover from 70% to 0% sparsity in 5 stepped cycles (0.7, 0.5, 0.3, 0.1, 0.0), generous budget."""
    settings = dict(
        densify=True,
        initial_sparsity=0.7,
        target_sparsity=0.0,
        densification_schedule=DensificationSchedule.STEPPED,
        densification_steps=[0.7, 0.5, 0.3, 0.1, 0.0],
        num_cycles=5,
        amnesty_r_start=0.30,
        amnesty_r_end=0.10,
    )
    return RESUConfig(**{**settings, **overrides})


def quick_test_config(**overrides) -> RESUConfig:
    """Two short cycles at 50% with magnitude pruning: for smoke tests."""
    settings = dict(
        target_sparsity=0.5,
        num_cycles=2,
        steps_per_cycle=10,
        pruning_method="magnitude",
        calib_batches=2,
        resu_lr=1e-3,
        progress_bar=False,
    )
    return RESUConfig(**{**settings, **overrides})


def pretrained_lm_config(**overrides) -> RESUConfig:
    """A pretrained LM pruned with Wanda before training: mostly sparse fine-tuning, short θ phases.

    Prune first (``resu.prune_(model, s, method="wanda", calib=...)``); the CONSTANT schedule then
    never re-prunes, so TRAIN fine-tunes the active weights and no dense phase runs. The commit keeps a
    θ slot only where it outscores the active slot it would evict (``"amnesty_capped"``) on Wanda
    scores: the reserved quota of ``"amnesty"`` and magnitude scores both evict activation-heavy
    weights of an LM. θ starts at exactly zero: ``resu_epsilon=0.1`` puts noise the size of trained θ
    into every pruned slot.

    The recovery that measured best on SmolLM2 (θ started from the weights before pruning, a commit
    that re-prunes the merged weights with SparseGPT) is :func:`resu.recipes.recover_`; the trainer
    commits with commit strategies only (BENCHMARKS.md, "Pruning and recovering a language model").
    """
    settings = dict(
        initial_sparsity=0.5,
        target_sparsity=0.5,
        sparsity_schedule=SparsitySchedule.CONSTANT,
        num_cycles=1,
        train_fraction=0.85,
        stabilize_fraction=0.0,
        resu_fraction=0.15,
        resu_lr=1e-3,
        resu_epsilon=0.0,
        commit_strategy="amnesty_capped",
        amnesty_score_type="wanda",
        amnesty_r_start=0.10,
        amnesty_r_end=0.02,
        pruning_method="wanda",
        stabilize_method="none",
        base_lr=3e-4,
        weight_decay=0.0,
    )
    return RESUConfig(**{**settings, **overrides})
