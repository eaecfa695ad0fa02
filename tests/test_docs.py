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


def test_readme_demo_tables_are_the_committed_results():
    """The README's demo tables (seed 0 in full, every seed's mean reward) are the numbers in
    docs/demo_results/, so a rerun that is not committed cannot leave the README behind."""
    import json
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    results = os.path.join(root, "docs", "demo_results")
    policies = ("base", "star_gate", "dpo", "refit", "swift", "filtered_sft")
    rows = [(int(m.group(1)), [float(x) for x in m.group(2).split(" | ")])
            for m in re.finditer(r"^\| (\d) \| ([\d. |]+?) \|$", readme, re.M)]
    # the scratch base's table (six policies + the logged data), then --base smollm2's (five + logged)
    scratch = {s: r for s, r in rows if len(r) == 7}
    smol = {s: r for s, r in rows if len(r) == 6}
    assert sorted(scratch) == [0, 1, 2, 3, 4] and sorted(smol) == [0, 1] and len(rows) == 7
    for seed, row in scratch.items():
        scores = json.load(open(os.path.join(results, f"seed{seed}.json")))
        info = json.load(open(os.path.join(results, f"seed{seed}_run_info.json")))
        assert row[:6] == [round(scores[p]["mean_reward"], 3) for p in policies], seed
        assert row[6] == round(info["logged"]["all"]["mean_reward"], 3), seed
    for seed, row in smol.items():
        d = os.path.join(results, "smollm2", "seed1" if seed else "")
        scores = json.load(open(os.path.join(d, "results.json")))
        info = json.load(open(os.path.join(d, "run_info.json")))
        assert row[:5] == [round(scores[p]["mean_reward"], 3) for p in policies[:5]], ("smollm2", seed)
        assert row[5] == round(info["logged"]["all"]["mean_reward"], 3), ("smollm2", seed)
    seed0 = json.load(open(os.path.join(results, "seed0.json")))
    for p in policies:
        r = seed0[p]
        line = (f"| {p} | {r['mean_reward']:.3f} | {r['stderr']:.3f} | {r['accuracy']:.3f} | "
                f"{r['accuracy_stderr']:.3f} | {r['questions_per_episode']:.2f} |")
        assert line in readme, line
