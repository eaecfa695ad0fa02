"""The training objectives on packed rows: SFT, filtered SFT, STaR-GATE, Refit, Swift and DPO.

One optimizer step consumes a *step batch* of packed rows spread over micro-batches and ranks. Let S
be its conversations (each has >= 1 trained token), n = |S|, l_t the NLL of trained token t.

- Refit:  L = (1/n) sum_{i in S} r_i sum_{t in i} l_t      (SFT, filtered SFT, STaR-GATE: r_i = 1)
- Swift:  the same with weights w_i = (r_i - mean) / (std + eps), population std, where mean and std
  are those of conversation i's group over the whole data set (``swift_stats: group``, the paper's),
  of the whole data set (``dataset``), both computed once before training (:func:`swift_weights`), or
  of the step's conversations S (``step``, from the step's statistics); :func:`conversation_weights`
  says which, and :func:`refit_fast.ops.standardize_rewards` is the one standardization rule.
- ``normalize: token`` divides by the number of trained tokens of the step instead of n.
- DPO:    L = (1/P) sum_pairs -log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))

Each micro-batch contributes ``weighted_ce(..., reduction="sum") / denominator`` with the *global*
denominator (and, for ``swift_stats: step``, weights from the step's mean and std) computed from the step plan before
any forward pass, so the sum of the micro-batch losses over micro-batches and ranks is exactly L, and
so is the sum of their gradients. Precomputed Swift weights are per conversation, so they do not depend
on packing, micro-batches or ranks at all. DPO pairs are packed as units (both sides in one row), so
a pair's loss is complete inside one micro-batch and no second pass is needed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from refit_fast.model import head_options, output_embedding, packed_hidden_states
from refit_fast.ops import standardize_rewards, weighted_ce
from refit_fast.train.data import MicroBatch, StepStats

__all__ = ["ConversationWeights", "PackedCausalLM", "conversation_weights", "micro_batch_loss", "sequence_logps", "swift_weights"]


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
        head = head_options(self.model)  # e.g. Gemma 2's final-logit softcap, in the kernel
        loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize,
                           eps=eps, reward_stats=reward_stats, reduction=reduction, **head)
        if not token_nll:
            return loss
        with torch.no_grad():
            nll = weighted_ce(hidden.detach(), weight.detach(), labels, seq_ids, None,
                              bias=bias.detach() if bias is not None else None, reduction="none", **head)
        return loss, nll


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


class ConversationWeights:
    """What each conversation's log-likelihood is weighted by: ``weights(conversations, stats)`` gives
    the float64 weights of those conversations in a step with statistics ``stats``. Refit: the
    rewards. Swift: the rewards standardized by :func:`refit_fast.ops.standardize_rewards` (the one
    home of that rule) with the statistics of each conversation's group (``swift_stats="group"``,
    ``groups`` int64 ids) or of the data set (``dataset``), both computed once here and kept in
    ``fixed``, or of the step's conversations (``step``, from ``stats``). Use
    :func:`conversation_weights`, which returns None for the unweighted objectives.

    Example:
        >>> from refit_fast.train.data import step_stats
        >>> r = np.array([1.0, 0.0, 0.5, 0.5])
        >>> w = conversation_weights("swift", r, swift_stats="group", groups=np.array([0, 0, 1, 1]))
        >>> w(np.arange(4), step_stats(r, np.ones(4), 4)).round(4).tolist(), w.fixed is not None
        ([1.0, -1.0, 0.0, 0.0], True)
    """

    def __init__(self, algorithm: str, rewards: np.ndarray, *, swift_stats: str = "group", groups=None,
                 eps: float = 1e-6):
        self.rewards, self.eps = np.asarray(rewards, np.float64), eps
        self.per_step = algorithm == "swift" and swift_stats == "step"
        self.fixed = None
        if algorithm == "swift" and not self.per_step:
            self.fixed = swift_weights(self.rewards, groups if swift_stats == "group" else None, eps)

    def __call__(self, conversations: np.ndarray, stats: StepStats) -> np.ndarray:
        if self.fixed is not None:
            return self.fixed[conversations]
        r = self.rewards[conversations]
        if not self.per_step:
            return r
        mean_std = (torch.tensor(stats.reward_mean, dtype=torch.float64), torch.tensor(stats.reward_std, dtype=torch.float64))
        return standardize_rewards(torch.from_numpy(r), eps=self.eps, stats=mean_std).numpy()


def conversation_weights(algorithm: str, rewards: np.ndarray, *, swift_stats: str = "group", groups=None,
                         eps: float = 1e-6) -> ConversationWeights | None:
    """The :class:`ConversationWeights` of ``algorithm`` (refit, swift), None for sft, filtered_sft,
    star_gate and dpo (every conversation weighs 1).

    Example:
        >>> conversation_weights("sft", np.zeros(3)) is None
        True
    """
    if algorithm not in ("refit", "swift"):
        return None
    return ConversationWeights(algorithm, rewards, swift_stats=swift_stats, groups=groups, eps=eps)


def micro_batch_loss(lm, mb: MicroBatch, algorithm: str, stats: StepStats, *, parts: bool = False, dpo_beta=0.1):
    """The loss of one packed row, scaled so that the sum over the step's rows is the step objective.

    ``mb``: a :class:`refit_fast.train.data.MicroBatch` on the model's device (its ``row`` has *local*
    conversation ids; ``weights`` for refit and swift, ``ref_logps`` for dpo, whose rows hold pairs as
    consecutive (chosen, rejected) conversations). ``parts`` (Swift, on logging steps): also compute
    the loss's positive- and negative-weight parts. Returns ``(loss, extras)``; ``extras`` is None,
    ``{"dpo_z": margins}`` (detached, per pair) or ``{"parts": tensor([loss_pos, loss_neg])}``
    (detached, float64).
    """
    row = mb.row
    args = (row["input_ids"], row["position_ids"], row["cu_seqlens"], row["max_seqlen"], row["labels"], row["seq_ids"])
    if algorithm in ("sft", "filtered_sft", "star_gate"):
        return lm(*args) / stats.denominator, None
    if algorithm in ("refit", "swift"):
        if not parts:
            return lm(*args, mb.weights) / stats.denominator, None
        # The parts from the per-conversation NLL of a forward-only second pass of the head (no body
        # rerun): +2*N*D*V FLOPs on logging steps only, about a third of the head's forward+backward.
        # reduction="none" for the gradient itself would cost 8*N*D*V on every step instead of 6.
        loss, nll_tok = lm(*args, mb.weights, token_nll=True)
        nll = -sequence_logps(nll_tok.double(), row["seq_ids"], mb.weights64.numel())
        w = mb.weights64.to(nll.device, torch.float64)
        parts_ = torch.stack([(w.clamp(min=0) * nll).sum(), (w.clamp(max=0) * nll).sum()]) / stats.denominator
        return loss / stats.denominator, {"parts": parts_}
    if algorithm == "dpo":
        per_token = lm(*args, reduction="none")
        k = mb.ref_logps.numel()
        logps = sequence_logps(per_token, row["seq_ids"], k)
        delta = (logps - mb.ref_logps).view(-1, 2)  # (chosen, rejected) per pair
        z = dpo_beta * (delta[:, 0] - delta[:, 1])
        loss = F.softplus(-z).sum() / stats.denominator  # -log sigmoid(z)
        return loss, {"dpo_z": z.detach()}
    raise ValueError(f"unknown algorithm {algorithm!r}")
