"""The training objectives on packed rows: SFT, filtered SFT, STaR-GATE, Refit, Swift and DPO.

One optimizer step consumes a *step batch* of packed rows spread over micro-batches and ranks. Let S
be its conversations (each has >= 1 trained token), n = |S|, l_t the NLL of trained token t.

- Refit:  L = (1/n) sum_{i in S} r_i sum_{t in i} l_t      (SFT, filtered SFT, STaR-GATE: r_i = 1)
- Swift:  the same with weights w_i = (r_i - mean) / (std + eps), population std, where mean and std
  are those of conversation i's group over the whole data set (``swift_stats: group``, the paper's),
  of the whole data set (``dataset``), both computed once before training (:func:`swift_weights`), or
  of the step's conversations S (``step``, computed in the kernel from the step's statistics).
- ``normalize: token`` divides by the number of trained tokens of the step instead of n.
- DPO:    L = (1/P) sum_pairs -log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))

Each micro-batch contributes ``weighted_ce(..., reduction="sum") / denominator`` with the *global*
denominator (and, for ``swift_stats: step``, the step's mean and std) computed from the step plan before
any forward pass, so the sum of the micro-batch losses over micro-batches and ranks is exactly L, and
so is the sum of their gradients. Precomputed Swift weights are per conversation, so they do not depend
on packing, micro-batches or ranks at all. DPO pairs are packed as units (both sides in one row), so
a pair's loss is complete inside one micro-batch and no second pass is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refit_fast.model import output_embedding, packed_hidden_states
from refit_fast.ops import standardize_rewards, weighted_ce

__all__ = ["PackedCausalLM", "StepStats", "step_stats", "micro_batch_loss", "sequence_logps", "swift_weights"]


class PackedCausalLM(torch.nn.Module):
    """A causal LM as one module whose ``forward`` runs a packed row up to the loss kernel.

    DDP and FSDP2 hook the *wrapper's* forward, so the whole computation (body and weighted_ce) must
    happen inside it; the [tokens x vocab] logits are never built.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> lm = PackedCausalLM(build_model_from_config(tiny_config("llama")))
        >>> ids = torch.randint(0, 128, (6,)); pos = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> cu = torch.tensor([0, 3, 6], dtype=torch.int32)
        >>> labels = torch.tensor([5, 6, -100, 7, 8, -100]); sid = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> lm(ids, pos, cu, 3, labels, sid, torch.tensor([1.0, 0.5])).shape
        torch.Size([])
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels, seq_ids, rewards=None, *,
                standardize: bool = False, reward_stats=None, eps: float = 1e-6, reduction: str = "sum",
                token_nll: bool = False):
        """The loss; with ``token_nll=True`` ``(loss, nll)``, ``nll`` the unweighted per-token NLL
        (detached, 0 on untrained tokens) from one more forward-only pass of the head on the same hidden
        states (2*N*D*V FLOPs; the body is not run again)."""
        hidden = packed_hidden_states(self.model, input_ids, position_ids, cu_seqlens, max_seqlen, validate=False)
        weight, bias = output_embedding(self.model)
        loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize,
                           eps=eps, reward_stats=reward_stats, reduction=reduction)
        if not token_nll:
            return loss
        with torch.no_grad():
            nll = weighted_ce(hidden.detach(), weight.detach(), labels, seq_ids, None,
                              bias=bias.detach() if bias is not None else None, reduction="none")
        return loss, nll


@dataclass(frozen=True)
class StepStats:
    """What every micro-batch of a step needs to know about the whole step (all ranks)."""

    n_units: int  # conversations (or DPO pairs) in the step
    n_tokens: int  # trained tokens in the step
    denominator: float  # n_units, or n_tokens with normalize=token
    reward_mean: float
    reward_std: float  # population std over the step's conversations
    reward_min: float
    reward_max: float


def step_stats(rewards: np.ndarray, trained: np.ndarray, n_units: int, normalize: str = "sequence") -> StepStats:
    """Statistics of one step batch from its conversations' rewards and trained-token counts.

    Computed in float64 from data alone, identically on every rank (each rank holds the step plan),
    which equals all-reducing count, sum and squared deviations but needs no communication.

    Example:
        >>> s = step_stats(np.array([1.0, 0.0, 0.5]), np.array([4, 2, 3]), 3)
        >>> s.denominator, s.reward_mean, round(s.reward_std, 4)
        (3.0, 0.5, 0.4082)
    """
    r = np.asarray(rewards, np.float64)
    n_tokens = int(np.asarray(trained).sum())
    mean = float(r.mean()) if len(r) else 0.0
    std = float(np.sqrt(((r - mean) ** 2).mean())) if len(r) else 0.0
    denom = float(max(n_tokens if normalize == "token" else n_units, 1))
    return StepStats(n_units, n_tokens, denom, mean, std,
                     float(r.min()) if len(r) else 0.0, float(r.max()) if len(r) else 0.0)


def sequence_logps(per_token_loss: torch.Tensor, seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """log pi(y_i | x_i) per conversation: ``-sum`` of the per-token NLL (``reduction="none"``) by
    ``seq_ids`` (tokens with ``seq_ids < 0`` are skipped). Differentiable.

    Example:
        >>> sequence_logps(torch.tensor([0.5, 0.25, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]), 2).tolist()
        [-0.75, -1.0]
    """
    keep = seq_ids >= 0
    out = torch.zeros(n, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return -out.index_add(0, seq_ids[keep].long(), per_token_loss[keep])


def swift_weights(rewards: np.ndarray, groups: np.ndarray | None, eps: float = 1e-6) -> np.ndarray:
    """Swift's weight of every conversation of the data set, computed once before training (float64).

    ``groups``: ``int64 [n]`` group ids (``swift_stats: group``), or None for the whole data set's
    mean and std (``dataset``). The rule itself is :func:`refit_fast.ops.standardize_rewards`: a
    singleton group or one whose rewards are all equal gives weight exactly 0.
    """
    g = None if groups is None else torch.as_tensor(np.asarray(groups, np.int64))
    w = standardize_rewards(torch.as_tensor(np.asarray(rewards, np.float64)), g, eps=eps)
    return w.to(torch.float64).cpu().numpy()


def micro_batch_loss(lm, row: dict, algorithm: str, stats: StepStats, *, rewards_local=None, swift_eps=1e-6,
                     swift_stats="step", parts_weights=None, ref_logps=None, dpo_beta=0.1):
    """The loss of one packed row, scaled so that the sum over the step's rows is the step objective.

    ``row``: torch tensors ``input_ids``, ``position_ids``, ``cu_seqlens``, ``max_seqlen``, ``labels``
    and ``seq_ids`` holding *local* conversation ids 0..k-1 in row order (-1 on padding).
    ``rewards_local`` [k]: the rewards for refit and swift with ``swift_stats="step"``, the precomputed
    weights (:func:`swift_weights`) for swift with ``group`` or ``dataset``. ``ref_logps`` [k] for DPO,
    whose rows hold pairs as consecutive (chosen, rejected) conversations. ``parts_weights`` [k]
    (float64 Swift weights, given on logging steps): also compute the loss's positive- and
    negative-weight parts. Returns ``(loss, extras)``; ``extras`` is None, ``{"dpo_z": margins}``
    (detached, per pair) or ``{"parts": tensor([loss_pos, loss_neg])}`` (detached, float64).
    """
    args = (row["input_ids"], row["position_ids"], row["cu_seqlens"], row["max_seqlen"], row["labels"], row["seq_ids"])
    if algorithm in ("sft", "filtered_sft", "star_gate"):
        return lm(*args) / stats.denominator, None
    if algorithm in ("refit", "swift"):
        kw = {}
        if algorithm == "swift" and swift_stats == "step":
            # The step's mean and std (not this row's): the standardization of the whole step batch.
            mean_std = (torch.tensor(stats.reward_mean, dtype=torch.float32, device=rewards_local.device),
                        torch.tensor(stats.reward_std, dtype=torch.float32, device=rewards_local.device))
            kw = dict(standardize=True, reward_stats=mean_std, eps=swift_eps)
        if parts_weights is None:
            return lm(*args, rewards_local, **kw) / stats.denominator, None
        # The parts from the per-conversation NLL of a forward-only second pass of the head (no body
        # rerun): +2*N*D*V FLOPs on logging steps only, about a third of the head's forward+backward.
        # reduction="none" for the gradient itself would cost 8*N*D*V on every step instead of 6.
        loss, nll_tok = lm(*args, rewards_local, token_nll=True, **kw)
        nll = -sequence_logps(nll_tok.double(), row["seq_ids"], parts_weights.numel())
        w = parts_weights.to(nll.device, torch.float64)
        parts = torch.stack([(w.clamp(min=0) * nll).sum(), (w.clamp(max=0) * nll).sum()]) / stats.denominator
        return loss / stats.denominator, {"parts": parts}
    if algorithm == "dpo":
        per_token = lm(*args, reduction="none")
        k = ref_logps.numel()
        logps = sequence_logps(per_token, row["seq_ids"], k)
        delta = (logps - ref_logps).view(-1, 2)  # (chosen, rejected) per pair
        z = dpo_beta * (delta[:, 0] - delta[:, 1])
        loss = F.softplus(-z).sum() / stats.denominator  # -log sigmoid(z)
        return loss, {"dpo_z": z.detach()}
    raise ValueError(f"unknown algorithm {algorithm!r}")
