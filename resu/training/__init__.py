"""High-level RESU training: configs, cycles, the trainer, densification with pauses, stats export."""

from resu.training.callbacks import TrainerCallback
from resu.training.config import (
    DensificationSchedule,
    RESUConfig,
    SparsitySchedule,
    aggressive_pruning_config,
    conservative_pruning_config,
    default_config,
    densification_config,
    pretrained_lm_config,
    quick_test_config,
)
from resu.training.one_cycle import RESUCycle
from resu.training.densification import DensificationTrainer, PauseConfig, PauseReason
from resu.training.export import load_stats_json, save_stats_csv, save_stats_json
from resu.training.stats import CycleStats
from resu.training.trainer import RESUTrainer

__all__ = [
    "CycleStats",
    "DensificationSchedule",
    "DensificationTrainer",
    "PauseConfig",
    "PauseReason",
    "RESUConfig",
    "RESUCycle",
    "RESUTrainer",
    "SparsitySchedule",
    "TrainerCallback",
    "aggressive_pruning_config",
    "conservative_pruning_config",
    "default_config",
    "densification_config",
    "pretrained_lm_config",
    "load_stats_json",
    "quick_test_config",
    "save_stats_csv",
    "save_stats_json",
]
