"""Recipes: tested sequences of resu calls for a whole job (recovering a pruned pretrained LM)."""

from resu.recipes.lm_recovery import RecoveryRecipe, RecoveryReport, causal_lm_loss, finetune_, recover_

__all__ = ["RecoveryRecipe", "RecoveryReport", "causal_lm_loss", "finetune_", "recover_"]
