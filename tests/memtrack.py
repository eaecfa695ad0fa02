"""Peak-allocation tracking on any device, by allocator-level hooks on tensor storages.

A TorchDispatchMode sees every tensor an op returns; each new storage adds its bytes to the live
total, and a finalizer on the storage takes them off when it is freed. Tensors that existed before
the `with` block (the inputs), and views of them, are not counted, so `peak` is the extra memory of
the code inside. For peak RSS of a whole computation in a fresh process see :func:`peak_rss`.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """with PeakMemory() as m: ...;  m.peak is the most bytes alive at once, m.live at the end."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view of an argument shares its storage: not new memory (also when the argument is an
        # input from before the block, which was never counted)
        aliased = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                   if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._seen or key in aliased or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())
        return out


_RSS_SCRIPT = r"""
import json, resource, sys, torch
sys.path[:0] = {paths!r}
torch.set_num_threads({threads})
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))
{setup}
try:  # reset the high-water mark, so that a peak during setup does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before, file_before = rss(), status("RssFile")
{code}
peak = status("VmHWM")
file_growth = max(0, status("RssFile") - file_before)
print(json.dumps(dict(before=before, peak=peak, file_growth=file_growth, extra=peak - before - file_growth)))
"""


def peak_rss(setup: str, code: str, *, paths=(), threads: int = 2, timeout: float = 600) -> dict:
    """Peak resident memory of `code` in a fresh Python process, beyond what `setup` left resident.

    `setup` builds the inputs and should warm the code paths up on small tensors (avoid large
    temporaries there: a peak during setup would count), `code` runs the computation. Returns
    {"before", "peak", "file_growth", "extra"} in bytes: extra = the process's peak RSS (VmHWM,
    reset after setup where /proc/self/clear_refs allows) minus its RSS after setup, minus the
    growth of its file-backed resident pages (shared-library code paged in during `code`, which
    depends on the page cache, not on tensors). Not ru_maxrss: Linux carries the parent's RSS at
    fork over to the child's ru_maxrss across exec, so under a large pytest process it would
    measure the parent. Large CPU tensors
    are their own mmap'd blocks, given back to the system when freed, so RSS follows the live tensors."""
    import json
    import subprocess
    import sys
    import textwrap

    script = _RSS_SCRIPT.format(paths=list(map(str, paths)), threads=threads, setup=textwrap.dedent(setup),
                                code=textwrap.dedent(code))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_weighted_ce_rss(N: int, D: int, V: int, root: str) -> dict:
    """Extra peak RSS of weighted_ce (impl="torch") and of the plain materializing PyTorch loss
    (refit_fast.ops.reference), forward + backward, fp32, each in a fresh process."""
    setup = (f"g = torch.Generator().manual_seed(0)\n"
             f"h = torch.randn({N}, {D}, generator=g).requires_grad_()\n"
             f"W = torch.randn({V}, {D}, generator=g).div_({D}**0.5).requires_grad_()\n"
             f"y = torch.randint(0, {V}, ({N},), generator=g)\n")
    warm = ("h0 = torch.randn(8, 64).requires_grad_()\nW0 = torch.randn(100, 64).requires_grad_()\n"
            "y0 = torch.randint(0, 100, (8,))\n{fn}(h0, W0, y0{kw}).backward()\ndel h0, W0, y0\n")
    ours = peak_rss("from refit_fast import weighted_ce\n" + warm.format(fn="weighted_ce", kw=", impl='torch'") + setup,
                    "weighted_ce(h, W, y, impl='torch').backward()", paths=[root], timeout=3600)
    plain = peak_rss("from refit_fast.ops.reference import weighted_ce_reference\n"
                     + warm.format(fn="weighted_ce_reference", kw="") + setup,
                     "weighted_ce_reference(h, W, y).backward()", paths=[root], timeout=3600)
    return dict(N=N, D=D, V=V, ours=ours["extra"], plain=plain["extra"], ratio=ours["extra"] / plain["extra"],
                file_growth=(ours["file_growth"], plain["file_growth"]))


if __name__ == "__main__":  # python tests/memtrack.py [N D V]: issue #14's CPU measurement (default 1024 2048 128256)
    import json
    import os
    import sys

    shape = [int(x) for x in sys.argv[1:4]] or [1024, 2048, 128256]
    print(json.dumps(compare_weighted_ce_rss(*shape, root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
