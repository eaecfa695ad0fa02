"""The trainer: SFT, filtered SFT, STaR-GATE, Refit, Swift and DPO on packed rows, one loss kernel, torchrun-ready.

    from refit_fast.train import train, load_config
    result = train("examples/tiny_llama_refit.yaml", ["optim.lr=3e-4"])
    result.losses, result.final_model_path

Command line: ``refit-fast train CONFIG.yaml key=value ...`` or
``torchrun --nproc_per_node=K -m refit_fast.train CONFIG.yaml key=value ...``.
"""
from refit_fast.train.config import ALGORITHMS, ConfigError, TrainConfig, load_config
from refit_fast.train.loop import NonFiniteLossError, TrainResult, train

__all__ = ["ALGORITHMS", "ConfigError", "NonFiniteLossError", "TrainConfig", "TrainResult", "load_config", "train"]
