"""Varlen (packed-row) attention for Hugging Face causal LMs.

A packed row holds several conversations back to back; ``cu_seqlens`` (int32, ``[k+1]``) marks where each
one starts. Every token may attend only to earlier tokens of its own conversation. This module registers
one attention implementation, ``"refit_varlen"``, with transformers' ``AttentionInterface``; the model's
attention layers call it with the packing metadata that :func:`refit_fast.model.packed_hidden_states`
threads through the forward kwargs.

The backend rule lives here and only here: :func:`check_backend_name` (the valid names, also used to
validate configs) and :func:`resolve_backend` (installed? runs on this device and dtype? what does
``"auto"`` pick?). :func:`refit_fast.model.prepare_model` checks the choice once and records it on the
model; each forward only turns ``"auto"`` into a kernel for the tensors it meets (once per forward).

Backends, chosen per forward by ``backend="auto"`` in this order:

1. ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, flash-attn installed);
2. ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.9);
3. ``"sdpa"``: ``F.scaled_dot_product_attention``; works on every device and dtype, with backward.
   On CPU it attends block by block (:meth:`PackedAttentionMeta.blocks`): each conversation of at least
   :data:`SMALL_SEGMENT` tokens alone with ``is_causal=True`` (no mask tensor), runs of shorter ones
   together in blocks of at most :data:`BLOCK_TOKENS` tokens with a small block-diagonal mask; GQA k/v
   go in unrepeated (``enable_gqa``). Work is sum(L^2) over blocks, not T^2. A conversation longer than
   a layer's ``sliding_window`` gets a windowed mask of its own length. Elsewhere (CUDA fp32) it is one
   call with a block-diagonal causal boolean mask built from ``cu_seqlens``, ``[B, 1, T, T]``, i.e.
   O(T^2) memory (32k-token GPU rows use 1. or 2.). Masks and blocks are built once per forward and
   shared by all layers (and by the recomputation under gradient checkpointing), never once per layer.

Under ``torch.autocast`` the kernel is chosen for the autocast dtype: q/k/v are cast to it first
(:func:`autocast_inputs`; HF's rotary embedding hands over fp32 q/k beside a bf16 v), so an fp32 model
trained under bf16 autocast on CUDA runs 1. or 2., not the O(T^2)-mask SDPA path.

``flex_attention`` is not used: on CPU it has no backward (see ENV-NOTES), and on GPU the varlen
kernels above are faster and need no mask.

Batches: the usual call is one row, ``[1, T]``. ``B`` rows of equal length ``T`` also work: give
``cu_seqlens`` over the flattened ``B*T`` tokens (the flash-attn convention), with every row boundary
``b*T`` among its entries. :func:`concat_cu_seqlens` builds that from per-row ``cu_seqlens``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "refit_varlen"
BACKENDS = ("auto", "flash", "torch_varlen", "sdpa")

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "BackendUnavailableError",
    "PackedAttentionMeta",
    "autocast_dtype",
    "autocast_inputs",
    "available_backends",
    "block_causal_mask",
    "check_backend_name",
    "concat_cu_seqlens",
    "group_segments",
    "register_attention",
    "resolve_backend",
    "row_segments",
    "varlen_attention_forward",
]


class BackendUnavailableError(RuntimeError):
    """A forced attention backend cannot run here (not installed, wrong device, or wrong dtype)."""


# ----------------------------------------------------------------------------------------------------
# Backend discovery
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flash_varlen_func():
    """flash-attn's varlen kernel, or None. Import is lazy: flash-attn is an optional CUDA-only extra."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_func():
    """(torch's varlen_attn, its parameter names), or None when this torch has none (< 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    # The signature moved between releases (2.9/2.10: is_causal; 2.11: scale, window_size;
    # 2.12+: enable_gqa), so calls adapt to the parameters actually present.
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Concrete backends that can run for tensors on ``device`` with ``dtype``, best first.

    Example:
        >>> available_backends("cpu")
        ['sdpa']
    """
    device = torch.device(device)
    out = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and _flash_varlen_func() is not None:
        out.append("flash")
    if device.type == "cuda" and half and _torch_varlen_func() is not None:
        out.append("torch_varlen")
    out.append("sdpa")
    return out


def _why_not_installed(backend: str) -> str | None:
    if backend == "flash" and _flash_varlen_func() is None:
        return "flash-attn is not installed (pip install 'refit-fast[flash]'; needs CUDA)"
    if backend == "torch_varlen" and _torch_varlen_func() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.9)"
    return None


def _why_cannot_run(backend: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    if backend in ("auto", "sdpa"):
        return None
    if device.type != "cuda":
        return f"it has no kernel for device {device.type!r} (CUDA only); use backend='sdpa' or 'auto'"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"its kernels take fp16/bf16, got {dtype}; use backend='sdpa' or 'auto' for fp32"
    return None


def check_backend_name(name, argument: str = "attn_backend") -> str:
    """Return ``name`` if it is one of :data:`BACKENDS`, else raise ``ValueError`` naming ``argument``.

    Only the name is checked (nothing is imported), so configs can be validated on any machine.

    Example:
        >>> check_backend_name("sdpa")
        'sdpa'
        >>> check_backend_name("xformers", "model.attn_backend")
        Traceback (most recent call last):
        ...
        ValueError: model.attn_backend: unknown attention backend 'xformers'; must be auto, flash, torch_varlen or sdpa
    """
    if not isinstance(name, str) or name not in BACKENDS:
        names = ", ".join(BACKENDS[:-1]) + f" or {BACKENDS[-1]}"
        raise ValueError(f"{argument}: unknown attention backend {name!r}; must be {names}")
    return name


def resolve_backend(
    backend: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    argument: str = "backend",
) -> str:
    """Check a backend name against this installation and, given a ``device``, pick the kernel to run.

    Without ``device`` (set-up time, the model may still move): the name is checked and a forced backend
    must be installed; the name comes back unchanged, ``"auto"`` included. With ``device`` (and the
    tensors' ``dtype``): ``"auto"`` becomes the best concrete backend, and a forced one must be able to
    run there. Raises ``ValueError`` for an unknown name (naming ``argument``) and
    :class:`BackendUnavailableError` (with the reason) when a forced backend cannot run.

    Example:
        >>> resolve_backend("auto"), resolve_backend("auto", "cpu")
        ('auto', 'sdpa')
        >>> resolve_backend("flash", "cpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        refit_fast.model.attention.BackendUnavailableError: attention backend 'flash' is unavailable: ...
    """
    check_backend_name(backend, argument)
    if device is None:
        why = _why_not_installed(backend)
    else:
        device = torch.device(device)
        if backend == "auto":
            return available_backends(device, dtype if dtype is not None else torch.float32)[0]
        why = _why_not_installed(backend) or _why_cannot_run(backend, device, dtype)
    if why is not None:
        hint = ". Use attn_backend='auto'." if device is None else ""
        raise BackendUnavailableError(f"attention backend {backend!r} is unavailable: {why}{hint}")
    return backend


# ----------------------------------------------------------------------------------------------------
# Packing metadata and the block-diagonal mask
# ----------------------------------------------------------------------------------------------------
def concat_cu_seqlens(rows: list[torch.Tensor], seqlen: int) -> torch.Tensor:
    """Join per-row ``cu_seqlens`` of ``B`` rows (each spanning ``seqlen`` tokens) into one over ``B*seqlen``.

    Example:
        >>> concat_cu_seqlens([torch.tensor([0, 3, 5]), torch.tensor([0, 5])], 5).tolist()
        [0, 3, 5, 10]
    """
    parts = [rows[0].to(torch.int32)]
    for b, cu in enumerate(rows[1:], start=1):
        parts.append(cu[1:].to(torch.int32) + b * seqlen)
    return torch.cat(parts)


def block_causal_mask(
    cu_seqlens: torch.Tensor, batch: int, seqlen: int, sliding_window: int | None = None
) -> torch.Tensor:
    """Boolean ``[batch, 1, seqlen, seqlen]`` mask, True where query i may attend to key j.

    ``j <= i`` and both in the same segment of ``cu_seqlens`` (offsets over the flattened ``batch*seqlen``
    tokens); with ``sliding_window`` w also ``i - j < w`` (transformers' convention). O(seqlen^2) memory.

    Example:
        >>> block_causal_mask(torch.tensor([0, 2, 3]), 1, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    device = cu_seqlens.device
    pos = torch.arange(batch * seqlen, device=device, dtype=cu_seqlens.dtype)
    # Segment index of each token: how many segment starts (after the first) are <= its position.
    seg = torch.bucketize(pos, cu_seqlens[1:-1], right=True).view(batch, seqlen)
    idx = torch.arange(seqlen, device=device)
    allowed = idx[None, :] <= idx[:, None]
    if sliding_window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < sliding_window)
    mask = (seg[:, :, None] == seg[:, None, :]) & allowed
    return mask.unsqueeze(1)


# CPU block rule (measured, benchmarks/NOTES.md "CPU attention"): a conversation of at least
# SMALL_SEGMENT tokens attends alone (plain causal SDPA, no mask); runs of shorter neighbours are merged
# into blocks of at most BLOCK_TOKENS tokens with a small block-diagonal mask, because below ~16 tokens
# the per-call overhead of SDPA (forward + backward) costs more than the masked-out work of a block.
SMALL_SEGMENT = 16
BLOCK_TOKENS = 64


def group_segments(
    lengths: list[int], small: int = SMALL_SEGMENT, block_tokens: int = BLOCK_TOKENS
) -> list[list[int]]:
    """Group consecutive segment lengths into attention blocks (the CPU rule; zero lengths dropped).

    A segment of at least ``small`` tokens is a block of its own; consecutive shorter ones share a
    block while it stays within ``block_tokens`` tokens.

    Example:
        >>> group_segments([300, 5, 7, 0, 3, 40, 60, 60, 9])
        [[300], [5, 7, 3], [40], [60], [60], [9]]
        >>> group_segments([10] * 8, small=16, block_tokens=32)
        [[10, 10, 10], [10, 10, 10], [10, 10]]
    """
    groups: list[list[int]] = []
    open_group: list[int] | None = None  # the block short segments are being added to
    for n in lengths:
        if n <= 0:
            continue
        if n >= small:
            groups.append([n])
            open_group = None
        elif open_group is not None and sum(open_group) + n <= block_tokens:
            open_group.append(n)
        else:
            open_group = [n]
            groups.append(open_group)
    return groups


def row_segments(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> list[list[int]]:
    """Segment lengths of each row; a segment crossing a row boundary is cut there (as the mask does).

    Example:
        >>> row_segments(torch.tensor([0, 3, 7, 10]), 2, 5)
        [[3, 2], [2, 3]]
    """
    cuts = sorted(set(cu_seqlens.tolist()) | set(range(0, batch * seqlen + 1, seqlen)))
    rows: list[list[int]] = [[] for _ in range(batch)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if 0 <= a < batch * seqlen and b > a:
            rows[a // seqlen].append(b - a)
    return rows


@dataclass
class PackedAttentionMeta:
    """Packing metadata for one forward, passed to every attention layer as the ``refit_packed`` kwarg.

    ``cu_seqlens`` int32 ``[k+1]`` over the flattened ``batch*seqlen`` tokens (on the model's device),
    ``max_seqlen`` the longest segment, ``backend`` a name of :data:`BACKENDS` (``"auto"`` included).
    SDPA masks and the CPU blocks (:meth:`blocks`) are built lazily, once per sliding-window size, and
    the kernel ``"auto"`` picks once per device and dtype (:meth:`kernel`); all are cached here, so all
    layers (and checkpoint recomputation) share them.

    Example:
        >>> meta = PackedAttentionMeta.build(torch.tensor([0, 4, 7]), 4, batch=1, seqlen=7, backend="sdpa")
        >>> meta.mask().shape
        torch.Size([1, 1, 7, 7])
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int
    backend: str
    _masks: dict = field(default_factory=dict, repr=False)
    _kernels: dict = field(default_factory=dict, repr=False)
    _blocks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        *,
        batch: int,
        seqlen: int,
        backend: str = "sdpa",
        device: torch.device | str | None = None,
        validate: bool = True,
    ) -> "PackedAttentionMeta":
        """Check ``cu_seqlens`` against the row shape and move it to ``device`` as int32.

        Validation reads ``cu_seqlens`` on the host (one small sync); pass ``validate=False`` to skip it.

        Example:
            >>> PackedAttentionMeta.build(torch.tensor([0, 2, 5]), None, batch=1, seqlen=5).max_seqlen
            3
        """
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        total = batch * seqlen
        if validate or max_seqlen is None:
            cu = cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
            if validate:
                if cu[0] != 0 or cu[-1] != total:
                    raise ValueError(
                        f"cu_seqlens must start at 0 and end at the number of tokens {total} "
                        f"({batch} row(s) x {seqlen}), got {cu[0]} .. {cu[-1]}"
                    )
                if min(lengths) < 0:
                    raise ValueError("cu_seqlens must be non-decreasing")
                missing = set(range(seqlen, total, seqlen)) - set(cu)
                if missing:
                    raise ValueError(
                        f"with {batch} rows every row boundary must be in cu_seqlens; missing {sorted(missing)}"
                    )
            longest = max(lengths)
            if max_seqlen is None:
                max_seqlen = longest
            elif validate and int(max_seqlen) < longest:
                raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest segment ({longest})")
        device = cu_seqlens.device if device is None else torch.device(device)
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        return cls(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen), batch=batch, seqlen=seqlen, backend=backend)

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """The cached block-diagonal causal mask (see :func:`block_causal_mask`).

        Example:
            >>> m = PackedAttentionMeta.build(torch.tensor([0, 3]), 3, batch=1, seqlen=3)
            >>> m.mask() is m.mask()
            True
        """
        key = sliding_window
        if key not in self._masks:
            self._masks[key] = block_causal_mask(self.cu_seqlens, self.batch, self.seqlen, sliding_window)
        return self._masks[key]

    def blocks(self, sliding_window: int | None = None) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        """Per row: the block sizes (:func:`group_segments`) and each block's mask, None for plain causal.

        A block holding several segments gets a block-diagonal causal mask, a single segment longer than
        ``sliding_window`` a windowed one (:func:`block_causal_mask` of that block alone). Cached per
        sliding-window size, like :meth:`mask`, so all layers and checkpoint recomputation share them.

        Example:
            >>> m = PackedAttentionMeta.build(torch.tensor([0, 40, 45, 50]), None, batch=1, seqlen=50)
            >>> [(sizes, [None if x is None else tuple(x.shape) for x in masks]) for sizes, masks in m.blocks()]
            [([40, 10], [None, (1, 1, 10, 10)])]
        """
        key = sliding_window
        if key not in self._blocks:
            plan = []
            for lengths in row_segments(self.cu_seqlens.cpu(), self.batch, self.seqlen):
                sizes, masks = [], []
                for group in group_segments(lengths):
                    n = sum(group)
                    windowed = sliding_window is not None and n > sliding_window
                    if len(group) == 1 and not windowed:
                        masks.append(None)  # is_causal=True: no mask tensor at all
                    else:
                        cu = torch.tensor([0] + group, device=self.cu_seqlens.device).cumsum(0)
                        masks.append(block_causal_mask(cu, 1, n, sliding_window))
                    sizes.append(n)
                plan.append((sizes, masks))
            self._blocks[key] = plan
        return self._blocks[key]

    def kernel(self, device: torch.device | str, dtype: torch.dtype | None) -> str:
        """The concrete backend for query tensors on ``device`` with ``dtype`` (:func:`resolve_backend`),
        decided at the first layer and reused by the others.

        Example:
            >>> PackedAttentionMeta.build(torch.tensor([0, 3]), 3, batch=1, seqlen=3, backend="auto").kernel(
            ...     "cpu", torch.float32)
            'sdpa'
        """
        # Keyed on the query's dtype, not the model's: the forward casts q/k/v to the autocast dtype first
        # (autocast_inputs), so an fp32 model under bf16 autocast gets the bf16 varlen kernels.
        key = (str(device), dtype)
        if key not in self._kernels:
            self._kernels[key] = resolve_backend(self.backend, device, dtype)
        return self._kernels[key]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
def _sdpa(query, key, value, meta: PackedAttentionMeta, scaling, dropout, sliding_window):
    if query.device.type == "cpu":
        return _sdpa_blocks(query, key, value, meta, scaling, dropout, sliding_window)
    return _sdpa_dense(query, key, value, meta, scaling, dropout, sliding_window)


def _sdpa_dense(query, key, value, meta: PackedAttentionMeta, scaling, dropout, sliding_window):
    """One SDPA call over the whole row with the cached ``[B, 1, T, T]`` mask (the non-CPU path)."""
    mask = meta.mask(sliding_window)
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:
        # Some CUDA SDPA kernels reject enable_gqa together with an explicit mask: repeat k/v instead.
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)  # [B, T, H, D], the layout HF's attention modules expect


@functools.lru_cache(maxsize=None)
def _sdpa_takes_enable_gqa() -> bool:
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_blocks(query, key, value, meta: PackedAttentionMeta, scaling, dropout, sliding_window,
                 *, enable_gqa: bool | None = None):
    """Attention block by block (:meth:`PackedAttentionMeta.blocks`): no ``T x T`` mask (the CPU path).

    A single-conversation block is plain causal SDPA (``is_causal=True``, no mask tensor); a block of
    several short conversations, or a conversation longer than ``sliding_window``, uses its own small mask.
    Work is sum(L^2) over blocks instead of T^2. GQA k/v are not repeated when this torch has
    ``enable_gqa`` (measured faster on CPU without a dense mask: benchmarks/NOTES.md, CPU attention).
    """
    hq, hkv = query.shape[1], key.shape[1]
    kwargs = {}
    if hq != hkv:
        if enable_gqa is None:
            enable_gqa = _sdpa_takes_enable_gqa()
        if enable_gqa:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(hq // hkv, dim=1)
            value = value.repeat_interleave(hq // hkv, dim=1)
    rows = []
    for b, (sizes, masks) in enumerate(meta.blocks(sliding_window)):
        # split (not slicing) so the backward of each input is one concatenation, not one
        # full-size zero tensor per block.
        qs, ks, vs = (x[b: b + 1].split(sizes, dim=2) for x in (query, key, value))
        outs = [
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, dropout_p=dropout, is_causal=m is None, scale=scaling, **kwargs
            ).transpose(1, 2)
            for q, k, v, m in zip(qs, ks, vs, masks)
        ]
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]  # [B, T, H, D]


def _to_tokens(x):
    """[B, H, T, D] -> [B*T, H, D] (the varlen kernels' layout)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)


def _flash(query, key, value, meta, scaling, dropout, sliding_window, softcap):
    fn = _flash_varlen_func()
    b, h, t, d = query.shape
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    extra = {} if softcap is None else {"softcap": softcap}  # flash-attn < 2.6 has no softcap argument
    out = fn(
        _to_tokens(query), _to_tokens(key), _to_tokens(value),
        meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
        dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=window, **extra,
    )
    return out.view(b, t, h, d)


def _torch_varlen(query, key, value, meta, scaling, dropout, sliding_window):
    if dropout:
        raise NotImplementedError("torch_varlen has no attention dropout; use backend='flash' or 'sdpa'")
    fn, params = _torch_varlen_func()
    b, h, t, d = query.shape
    hkv = key.shape[1]
    kwargs = {}
    if "window_size" in params:  # torch >= 2.11: causality is a (left, right=0) window
        kwargs["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    else:
        if sliding_window is not None:
            raise NotImplementedError(f"torch {torch.__version__} varlen_attn has no sliding window")
        kwargs["is_causal"] = True
    if scaling is not None and "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - d**-0.5) > 1e-12:
        query = query * (scaling / d**-0.5)  # old torch: fold a non-default scale into q
    if h != hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(h // hkv, dim=1)
            value = value.repeat_interleave(h // hkv, dim=1)
    out = fn(
        _to_tokens(query), _to_tokens(key), _to_tokens(value),
        meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, **kwargs,
    )
    return out.view(b, t, h, d)


# ----------------------------------------------------------------------------------------------------
# The AttentionInterface entry point
# ----------------------------------------------------------------------------------------------------
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix work in on ``device_type`` right now, or None when it is off there.

    Example:
        >>> autocast_dtype("cpu") is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
    """
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (e.g. "meta")
        return None


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the active autocast dtype of their device (as autocast casts SDPA's inputs);
    unchanged when autocast is off. float64 stays float64, as under autocast.

    Example:
        >>> q, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     [t.dtype for t in autocast_inputs(q, v)]
        [torch.bfloat16, torch.bfloat16]
        >>> autocast_inputs(q)[0] is q
        True
    """
    target = autocast_dtype(tensors[0].device.type)
    if target is None:
        return tensors
    return tuple(t.to(target) if t.dtype in _AUTOCAST_CASTS and t.dtype != target else t for t in tensors)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    refit_packed: PackedAttentionMeta | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    refit_backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows, in transformers' attention-function signature.

    ``query`` ``[B, H, T, D]``, ``key``/``value`` ``[B, H_kv, T, D]`` (GQA when ``H_kv < H``); returns
    ``([B, T, H, D], None)``. Packing comes from ``refit_packed`` (a :class:`PackedAttentionMeta`), or from
    raw ``cu_seqlens`` + ``max_seqlen`` (+ optional ``refit_backend``) kwargs. Without either (e.g. a
    single unpadded sequence in generation) it defers to transformers' plain ``"sdpa"`` function.

    Example (what a model layer does; normally reached through ``model.model(..., refit_packed=meta)``):
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, _ = varlen_attention_forward(None, q, k, v, None, cu_seqlens=torch.tensor([0, 2, 5]))
        >>> out.shape
        torch.Size([1, 5, 2, 8])
    """
    b, _, t, _ = query.shape
    if refit_packed is None and cu_seqlens is None:
        # Not a packed call: HF's sdpa function handles causality, masks and cached decoding itself.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.shape[2] != t:
        raise ValueError("refit_varlen attention is for training/scoring packed rows: no KV cache (use_cache=False)")
    meta = refit_packed
    if meta is None:
        meta = PackedAttentionMeta.build(cu_seqlens, max_seqlen, batch=b, seqlen=t, backend=refit_backend,
                                         device=query.device)
    if meta.batch != b or meta.seqlen != t:
        raise ValueError(f"packing metadata is for [{meta.batch}, {meta.seqlen}] but attention got [{b}, {t}]")
    # Under autocast HF's rotary embedding multiplies bf16 q/k by fp32 cos/sin, so q/k arrive in fp32 while
    # v is bf16: choosing the kernel from that fp32 would pick SDPA with its O(T^2) mask (and the varlen
    # kernels need one dtype anyway). Autocast would cast them for SDPA itself; cast first, then choose.
    query, key, value = autocast_inputs(query, key, value)
    # A forced backend may meet a device/dtype it cannot run (e.g. the model moved): this says why.
    backend = meta.kernel(query.device, query.dtype)
    if softcap is not None and backend != "flash":
        raise NotImplementedError(f"attention softcap is only supported by backend 'flash', not {backend!r}")
    if backend == "flash":
        out = _flash(query, key, value, meta, scaling, dropout, sliding_window, softcap)
    elif backend == "torch_varlen":
        out = _torch_varlen(query, key, value, meta, scaling, dropout, sliding_window)
    else:
        out = _sdpa(query, key, value, meta, scaling, dropout, sliding_window)
    return out, None


def register_attention() -> str:
    """Register :func:`varlen_attention_forward` as ``"refit_varlen"`` with transformers (idempotent).

    No mask function is registered on purpose: transformers then builds no attention mask at all for
    this implementation (it would be an O(T^2) tensor per forward that we would ignore).

    Example:
        >>> register_attention()
        'refit_varlen'
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    return ATTN_IMPLEMENTATION
