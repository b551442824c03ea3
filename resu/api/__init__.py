"""Model-level operations: sparsify_, prune_, enter_resu_, exit_resu_, densify_."""
