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
from refit_fast.ops.function import WeightedCEFunction, dtype_name, weighted_ce_op
from refit_fast.ops.validation import _standardize_mode, head_of, prepare_inputs

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
    normalize: str | None = None,
    denominator=None,
    shift: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    validate: bool = True,
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
            the backward is exact for any upstream gradient); "sum"; "mean" -> the sum divided by
            the normalizer (`normalize`, or `denominator`).
        normalize: the normalizer of "mean": "sequence", the number of conversations with at least
            one trained token (the paper's objective, the default when `seq_ids` is given);
            "token", the number of trained tokens (the token mean of ``F.cross_entropy``, Liger and
            CCE: the default without `seq_ids`); "none", 1.
        denominator: a positive number or 0-dim tensor (on any device; no gradient) to divide the
            sum by instead, with reduction="mean" only: e.g. the trained tokens of all
            gradient-accumulation micro-batches, HF's ``num_items_in_batch``.
        shift: labels are not yet shifted (``labels == input_ids`` with untrained positions at
            ignore_index, as HF models take them): position t is trained on ``labels[..., t + 1]``,
            the last position of each row, and with `seq_ids` of each packed conversation, on
            nothing. Only the labels are copied, never the hidden states.
        softcap: > 0: the logits are ``softcap * tanh(z / softcap)`` (Gemma 2's
            ``final_logit_softcapping``), in the kernel, with the exact gradient. None: off.
        logit_scale: > 0, the logits are ``logit_scale * z`` before the softcap (Cohere's
            ``logit_scale``; Granite's ``1 / logits_scaling``).
        z_loss: >= 0, adds ``z_loss * logsumexp(z)^2`` per trained token (PaLM's z-loss), NOT
            reward-weighted (a negative Swift weight would reward a growing normalizer), divided by
            the same normalizer.
        label_smoothing: in [0, 1], as ``F.cross_entropy(label_smoothing=)``: the target puts
            ``label_smoothing / V`` on every class and the rest on the label; reward-weighted.
        validate: False skips the value checks (labels and seq_ids in range, finite rewards, group
            ids, a positive denominator): less work, and wrong values give wrong results instead of
            errors. Shapes, dtypes and devices are always checked, and the number of trained tokens
            is read back to the host once either way (it sizes the work).
        impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch), or
            "auto" (triton on CUDA, torch elsewhere).

    Under ``torch.compile`` (``fullgraph=True`` included) weighted_ce is one custom op
    (``torch.ops.refit_fast.weighted_ce``) with its own backward, so the host read and the
    data-dependent number of trained tokens cause no graph break. Its backward scales the
    gradients out of place (one gradient-sized temporary each; the eager path scales in place), and
    the :func:`chunk_budget` in force when the function is traced is the one it keeps.

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

    A token-mean loss like ``F.cross_entropy`` on labels that are the inputs (HF's convention),
    with a Gemma 2 head and the normalizer of two accumulated micro-batches::

        >>> import torch.nn.functional as F
        >>> ids = torch.tensor([5, 9, 2, 7, 7, 1, 3])
        >>> loss = weighted_ce(hidden, weight, ids, shift=True)
        >>> ref = F.cross_entropy(hidden[:-1] @ weight.T, ids[1:])
        >>> bool(torch.allclose(loss, ref, rtol=1e-5))
        True
        >>> loss = weighted_ce(hidden, weight, ids, shift=True, softcap=30.0, denominator=12)
    """
    head = head_of(logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, label_smoothing=label_smoothing)
    if torch.compiler.is_compiling():
        return _weighted_ce_compiled(hidden, weight, labels, seq_ids, rewards, bias, standardize, groups, eps,
                                     reward_stats, ignore_index, reduction, normalize, denominator, shift, validate,
                                     impl, head)
    p = prepare_inputs(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize, groups=groups,
                       eps=eps, reward_stats=reward_stats, ignore_index=ignore_index, reduction=reduction,
                       normalize=normalize, impl=impl, denominator=denominator, shift=shift, validate=validate)
    opts = replace(OPTIONS.get(), head=head)
    if p.compute_dtype is not None:
        opts = replace(opts, compute_dtype=p.compute_dtype)
    out = WeightedCEFunction.apply(p.hidden, p.weight, p.bias, p.labels_v, p.idx_v, p.w_v, p.denom, reduction, p.impl,
                                   opts, torch.is_grad_enabled())
    return out.reshape(p.lead) if reduction == "none" else out


@torch.compiler.assume_constant_result
def _traced_options() -> tuple[int, int]:
    # the chunk_budget in force when torch.compile traces weighted_ce (a context variable is not traceable)
    o = OPTIONS.get()
    return o.chunk_bytes, -1 if o.fp32_weight_grad is None else int(o.fp32_weight_grad)


def _weighted_ce_compiled(hidden, weight, labels, seq_ids, rewards, bias, standardize, groups, eps, reward_stats,
                          ignore_index, reduction, normalize, denominator, shift, validate, impl, head,
                          chunk_bytes=None, fp32_weight_grad=None):
    """weighted_ce under torch.compile: the arguments spelled for the custom op, which checks them.
    chunk_bytes / fp32_weight_grad: a WeightedCELoss's own (None: the traced chunk_budget's)."""
    device = hidden.device
    if rewards is not None and not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    if seq_ids is not None and not isinstance(seq_ids, torch.Tensor):
        seq_ids = torch.as_tensor(seq_ids, device=device)
    stats = None
    if reward_stats is not None:
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in reward_stats])
    if denominator is not None and not isinstance(denominator, torch.Tensor):
        denominator = torch.tensor(float(denominator), dtype=torch.float64, device=device)
    compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    traced_bytes, fp32_wg = _traced_options()
    chunk_bytes = traced_bytes if chunk_bytes is None else int(chunk_bytes)
    fp32_wg = fp32_wg if fp32_weight_grad is None else int(bool(fp32_weight_grad))
    grad = torch.is_grad_enabled()
    mode = _standardize_mode(standardize)
    out = weighted_ce_op(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, denominator, mode, float(eps),
                         int(ignore_index), reduction, normalize or "", shift, validate, impl, chunk_bytes, fp32_wg,
                         dtype_name(compute), head.scale, head.softcap, head.z_loss, head.smoothing,
                         grad and hidden.requires_grad, grad and weight.requires_grad,
                         grad and bias is not None and bias.requires_grad)
    return out[0]


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
                 normalize=None, shift=False, softcap=None, logit_scale=1.0, z_loss=0.0, label_smoothing=0.0,
                 validate=True, impl="auto", chunk_bytes=None, fp32_weight_grad=None):
        super().__init__()
        self.kwargs = dict(standardize=standardize, eps=eps, ignore_index=ignore_index, reduction=reduction,
                           normalize=normalize, shift=shift, softcap=softcap, logit_scale=logit_scale,
                           z_loss=z_loss, label_smoothing=label_smoothing, validate=validate, impl=impl)
        self.chunk_bytes, self.fp32_weight_grad = chunk_bytes, fp32_weight_grad

    def forward(self, hidden, weight, labels, seq_ids=None, rewards=None, *, bias=None, groups=None,
                reward_stats=None, denominator=None):
        """See :func:`weighted_ce`; `groups` [B] is needed with ``standardize="group"``."""
        if torch.compiler.is_compiling():  # a context manager is not traceable: the options go to the op
            k = dict(self.kwargs)
            head = head_of(**{n: k.pop(n) for n in ("logit_scale", "softcap", "z_loss", "label_smoothing")})
            return _weighted_ce_compiled(hidden, weight, labels, seq_ids, rewards, bias, k["standardize"], groups,
                                         k["eps"], reward_stats, k["ignore_index"], k["reduction"], k["normalize"],
                                         denominator, k["shift"], k["validate"], k["impl"], head,
                                         self.chunk_bytes, self.fp32_weight_grad)
        with chunk_budget(self.chunk_bytes, fp32_weight_grad=self.fp32_weight_grad):
            return weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, groups=groups,
                               reward_stats=reward_stats, denominator=denominator, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
