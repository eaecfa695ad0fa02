"""Loss kernels. `weighted_ce` is the public entry point; `standardize_rewards` is Swift's reward
standardization (batch, given or per-group statistics, float64) as a plain function."""
from refit_fast.ops.weighted_ce import WeightedCEFunction, WeightedCELoss, chunk_budget, weighted_ce
from refit_fast.ops.weighted_ce_torch import standardize_rewards

__all__ = ["weighted_ce", "WeightedCELoss", "WeightedCEFunction", "chunk_budget", "standardize_rewards"]
