"""Loss kernels. `weighted_ce` is the public entry point."""
from refit_fast.ops.weighted_ce import WeightedCEFunction, WeightedCELoss, chunk_budget, weighted_ce

__all__ = ["weighted_ce", "WeightedCELoss", "WeightedCEFunction", "chunk_budget"]
