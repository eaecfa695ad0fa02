"""Every docstring example in the package runs and prints what it says (examples marked
``# doctest: +SKIP`` need files, a GPU or a model and are only read)."""
import doctest
import importlib
import pkgutil

import pytest

import refit_fast

MODULES = sorted(m.name for m in pkgutil.walk_packages(refit_fast.__path__, "refit_fast.")
                 if not m.name.endswith("__main__") and not m.name.startswith("refit_fast._"))


def test_the_walk_sees_every_stage():
    stages = {name.split(".")[1] for name in MODULES}
    assert {"data", "packing", "model", "ops", "train", "envs", "demo"} <= stages


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        if "pip install 'refit-fast[" not in str(e):  # only an optional extra may be missing
            raise
        pytest.skip(str(e))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module, name, globs=vars(module).copy()):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
