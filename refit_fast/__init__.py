"""refit_fast: offline RL for LLM conversation policies as cheap as supervised fine-tuning.

    from refit_fast import weighted_ce
    loss = weighted_ce(hidden, lm_head.weight, labels, seq_ids, rewards, standardize=True)
"""
from refit_fast.ops import WeightedCELoss, chunk_budget, weighted_ce

__version__ = "0.1.0"
__all__ = ["weighted_ce", "WeightedCELoss", "chunk_budget", "__version__"]
