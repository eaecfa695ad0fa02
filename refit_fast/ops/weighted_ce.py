"""weighted_ce: fused linear + cross-entropy with per-conversation reward weights (Refit / Swift).

Layout of refit_fast/ops/ (one job per file):

- kernels.py: the Triton kernels with their launchers (per-token reward weights; per-row
  log-sum-exp, loss and softmax gradient);
- weighted_ce_torch.py: their plain-PyTorch statements (the CPU path) and `standardize_rewards`;
- chunking.py: the chunk plan (`plan_chunks` -> `ChunkPlan`, pure arithmetic) and the chunked
  driver that follows it (`fused_linear_ce`), shared by both implementations;
- function.py: the `torch.autograd.Function` (`WeightedCEFunction`), one options object;
- validation.py: the argument checks and input preparation (`prepare_inputs`);
- this file: the public `weighted_ce`, `WeightedCELoss` and `chunk_budget`;
- reference.py: the naive materializing reference the tests compare against.

Algorithm (both implementations). Only trained tokens (label != ignore_index) are computed at all:
conversation data leaves user/system/tool tokens untrained, so this skips a large share of the
work. The trained rows go through in staging blocks of sub-chunks (chunking.py):

    z  = h_c @ W.T (+ b)                   [sub_rows, V] fp32, the logits of one sub-chunk (BLAS)
    l  = logsumexp(z) - z[y];  loss = w * l (row kernel, one program per row, two passes over V)
    G[c] = w * coef * (softmax(z) - onehot(y)) into the staging block (same kernel)
    per staging block: dh_S = G @ W,  dW += G.T @ h_S (fp32 accumulator),  db += G.sum(0)

With reduction "sum"/"mean" the upstream gradient is a scalar, so the gradients are computed in the
forward pass (6*N*D*V FLOPs in all, no recomputation) and only scaled in backward (in place, not at
all when it is 1). With reduction "none" the upstream gradient differs per token, so the forward
computes losses only and the backward recomputes the chunks with coef = upstream gradient
(8*N*D*V FLOPs).

Reward weights (before the chunks, one small kernel): w = r~[seq_ids] per trained token, with r~
the rewards as given (Refit) or standardized (Swift) by the batch statistics (`standardize=True`),
given statistics (`reward_stats`) or per-group statistics (`standardize="group"`, `groups` [B]:
the prompt of each conversation). Statistics are float64, each set shifted by one of its members
before the sums (identical rewards -> weight exactly 0; no overflow for huge rewards); a set with
std 0 gives weight 0. The rule is stated once in plain PyTorch as `standardize_rewards`.

Memory beyond inputs and gradients: `ChunkPlan.extra_bytes` (one sub-chunk of fp32 logits bounded
by `chunk_budget`, one staging block, and for bf16/fp16 weights the fp32 [V, D] weight-gradient
accumulator), independent of N, plus O(N) vectors.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from refit_fast.ops.chunking import OPTIONS, ChunkPlan, plan_chunks  # noqa: F401  (re-exported)
from refit_fast.ops.function import WeightedCEFunction
from refit_fast.ops.validation import prepare_inputs

__all__ = ["weighted_ce", "WeightedCELoss", "WeightedCEFunction", "chunk_budget", "plan_chunks", "ChunkPlan"]


@contextlib.contextmanager
def chunk_budget(nbytes: int | None = None, *, fp32_weight_grad: bool | None = None):
    """Set weighted_ce's memory budget for the code inside the `with` block.

    nbytes: the fp32 logits of one sub-chunk (default 256 MiB, or the environment variable
        REFIT_FAST_CHUNK_MB): ``sub_rows = nbytes // (4 V)`` rows, rounded down to a multiple of 128
        from 128 on. A staging block of up to 16 sub-chunks (2048 rows when the budget allows) holds
        their gradients for the dh / dW GEMMs. The whole extra memory of weighted_ce is
        ``plan_chunks(...).extra_bytes`` plus O(N) vectors, whatever the number of tokens N
        (2.72 GiB for bf16 at D=4096, V=128256 with the defaults, the fp32 accumulator included).
    fp32_weight_grad: accumulate the lm_head weight gradient over the staging blocks in an fp32
        [V, D] buffer when the weight is bf16/fp16 (V*D*4 bytes; the gradient is rounded to the
        weight's dtype once, at the end). Default on (REFIT_FAST_FP32_WEIGHT_GRAD=0 turns it off;
        False keeps the accumulator in the weight's dtype). fp32 weights always accumulate in fp32.

        >>> hidden, weight, labels = torch.randn(5, 8), torch.randn(13, 8), torch.tensor([1, 2, -100, 3, 4])
        >>> with chunk_budget(64 << 20):
        ...     loss = weighted_ce(hidden, weight, labels)
        >>> bool(torch.isfinite(loss))
        True
    """
    opts = OPTIONS.get()
    if nbytes is not None:
        if int(nbytes) < 1:
            raise ValueError(f"chunk_budget: nbytes must be >= 1, got {nbytes}")
        opts = replace(opts, chunk_bytes=int(nbytes))
    if fp32_weight_grad is not None:
        opts = replace(opts, fp32_weight_grad=bool(fp32_weight_grad))
    token = OPTIONS.set(opts)
    try:
        yield opts
    finally:
        OPTIONS.reset(token)


def weighted_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    standardize: bool | str | None = False,
    groups: torch.Tensor | None = None,
    eps: float = 1e-6,
    reward_stats=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "sequence",
    impl: str = "auto",
) -> torch.Tensor:
    """Reward-weighted cross-entropy of the linear head `hidden @ weight.T (+ bias)`, without ever
    building the [N, V] logits.

    Per token t:  l_t = -log softmax(hidden_t @ weight.T + bias)[labels_t]  (0 where ignored) and
    w_t = r~[seq_ids_t], where r~ is, per conversation i,

    - ``standardize=False`` (or None / "none"): r_i as given (Refit); w_t = 1 without rewards
      (SFT / plain NLL);
    - ``standardize=True`` (or "batch"): (r_i - mean) / (std + eps) with the mean and population
      std of all entries of `rewards` (Swift with batch statistics), or of ``reward_stats=(mean,
      std)`` when given (e.g. statistics all-reduced over ranks and micro-batches);
    - ``standardize="group"``: (r_i - mean_g) / (std_g + eps) with the mean and population std of
      the rewards of conversation i's group g = groups[i] (the paper's Swift, when the batch holds
      whole groups: the m conversations logged for each prompt, GRPO-style).

    The statistics are computed inside the loss, in float64, shifted by a member of each set so
    that identical rewards give deviations of exactly 0 (see :func:`standardize_rewards`, the same
    rule as a public function). A set whose std is 0 (one member, identical rewards, or a given std
    of 0) gives weight exactly 0, also with eps=0, never NaN. The Triton path computes them in the
    same launch that gathers the per-token weights, with no host sync; with groups it compares the
    group ids of all B conversations for every trained token, O(N_trained * B) (negligible next to
    the 6*N*D*V matmul work for B up to a few thousand).

    Args:
        hidden: [N, D] or [..., D] (e.g. [B, T, D]) fp32/bf16/fp16 (fp64 with impl="torch").
        weight: [V, D] the output embedding (lm_head.weight), same dtype and device as hidden.
        labels: hidden.shape[:-1] integer targets, already aligned with hidden (shifted by the
            caller/packer); ``ignore_index`` marks untrained positions.
        seq_ids: hidden.shape[:-1] integers, the conversation of each token, in [0, B) on trained
            tokens (ignored tokens may hold anything, e.g. -1 on padding). None: each row of a
            [B, T, D] input is a conversation; any other shape is one conversation. A list or
            array is moved to hidden's device, like rewards.
        rewards: [B] one finite reward per conversation (|r| <= 1e100; no gradient flows to it).
        bias: optional [V] output bias.
        standardize: False / None / "none", True / "batch", or "group" (above).
        groups: [B] integer tensor on hidden's device, only with ``standardize="group"``: the
            group (prompt) of each conversation, ids >= 0, e.g. in [0, n_groups); ids need not be
            sorted or all used, and a group's conversations may lie anywhere in the packed rows.
        eps: >= 0, added to the std in the standardization.
        reward_stats: (mean, std) numbers to standardize with instead of the batch's own (only
            with ``standardize=True``/"batch").
        reduction: "none" -> w_t * l_t per token, shape hidden.shape[:-1] (0 on ignored tokens;
            the backward is exact for any upstream gradient); "sum"; "mean" -> sum divided by the
            number of conversations with at least one trained token (normalize="sequence", the
            paper's objective), by the number of trained tokens ("token"), or by 1 ("none").
        impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch), or
            "auto" (triton on CUDA, torch elsewhere).

    Returns:
        fp32 tensor (fp64 for fp64 inputs): a scalar, or per-token losses for reduction="none". Gradients flow to hidden,
        weight and bias. Memory beyond inputs and gradients: ``plan_chunks(...).extra_bytes``, independent of N (see :func:`chunk_budget`).

    Raises:
        ValueError: labels outside [0, V) other than ignore_index, seq_ids outside [0, B) on trained
            tokens, non-finite rewards, groups missing with "group" or given without it, groups of
            the wrong shape/dtype/device or with negative ids, shape/dtype/device mismatches,
            unknown options (each message names the argument).

    Example::

        >>> import torch
        >>> from refit_fast import weighted_ce
        >>> hidden = torch.randn(7, 16, requires_grad=True)       # 7 packed tokens, D=16
        >>> weight = torch.randn(50, 16, requires_grad=True)      # V=50
        >>> labels = torch.tensor([3, 9, -100, -100, 4, 4, 11])   # -100: not trained
        >>> seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])         # two conversations
        >>> rewards = torch.tensor([1.0, 0.2])
        >>> loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, standardize=True)
        >>> loss.backward()

    Swift with per-prompt statistics: 4 conversations, two prompts with two plays each::

        >>> seq_ids = torch.tensor([0, 0, 1, 2, 2, 3, 3])
        >>> rewards = torch.tensor([0.9, 0.1, 0.5, 0.5])          # prompt 1's plays tie: weight 0
        >>> groups = torch.tensor([0, 0, 1, 1])
        >>> loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, standardize="group", groups=groups)
    """
    p = prepare_inputs(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize, groups=groups,
                       eps=eps, reward_stats=reward_stats, ignore_index=ignore_index, reduction=reduction,
                       normalize=normalize, impl=impl)
    opts = OPTIONS.get() if p.compute_dtype is None else replace(OPTIONS.get(), compute_dtype=p.compute_dtype)
    out = WeightedCEFunction.apply(p.hidden, p.weight, p.bias, p.labels_v, p.idx_v, p.w_v, p.denom, reduction, p.impl,
                                   opts, torch.is_grad_enabled())
    return out.reshape(p.lead) if reduction == "none" else out


class WeightedCELoss(torch.nn.Module):
    """Module form of :func:`weighted_ce` with the options fixed at construction.

        >>> hidden, weight = torch.randn(6, 8), torch.randn(13, 8)           # e.g. model.lm_head.weight
        >>> labels, seq_ids = torch.tensor([1, 2, -100, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> rewards, groups = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
        >>> loss_fn = WeightedCELoss(standardize=True, chunk_bytes=64 << 20)
        >>> loss = loss_fn(hidden, weight, labels, seq_ids, rewards)
        >>> swift = WeightedCELoss(standardize="group")             # per-prompt statistics
        >>> loss = swift(hidden, weight, labels, seq_ids, rewards, groups=groups)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, *, standardize=False, eps=1e-6, ignore_index=-100, reduction="mean",
                 normalize="sequence", impl="auto", chunk_bytes=None, fp32_weight_grad=None):
        super().__init__()
        self.kwargs = dict(standardize=standardize, eps=eps, ignore_index=ignore_index,
                           reduction=reduction, normalize=normalize, impl=impl)
        self.chunk_bytes, self.fp32_weight_grad = chunk_bytes, fp32_weight_grad

    def forward(self, hidden, weight, labels, seq_ids=None, rewards=None, *, bias=None, groups=None,
                reward_stats=None):
        """See :func:`weighted_ce`; `groups` [B] is needed with ``standardize="group"``."""
        with chunk_budget(self.chunk_bytes, fp32_weight_grad=self.fp32_weight_grad):
            return weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, groups=groups,
                               reward_stats=reward_stats, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
