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
{setup}
before = rss()
{code}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(before=before, peak=peak, extra=peak - before)))
"""


def peak_rss(setup: str, code: str, *, paths=(), threads: int = 2, timeout: float = 600) -> dict:
    """Peak resident memory of `code` in a fresh Python process, beyond what `setup` left resident.

    `setup` builds the inputs (avoid temporaries there: a peak during setup would count), `code`
    runs the computation. Returns {"before", "peak", "extra"} in bytes: extra = the process's peak
    RSS (ru_maxrss) minus its RSS after setup. Large CPU tensors are their own mmap'd blocks, given
    back to the system when freed, so RSS follows the live tensors."""
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
