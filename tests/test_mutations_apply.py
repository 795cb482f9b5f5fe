"""Every deliberate bug of the mutation check (benchmarks/mutations.py) still finds the one place
it patches: code that moves on must not silently retire a mutation."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutations", ROOT / "benchmarks" / "mutations.py")
mutations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutations)


@pytest.mark.parametrize("m", mutations.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_patches_exactly_one_place(m):
    assert mutations.mutated(m) != (ROOT / m.file).read_text()  # raises unless m.old occurs once
    for arg in m.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg).is_file(), arg


def test_every_outcome_of_a_mutations_tests_is_a_verdict(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def test_pass(): pass\n"
        "def test_skip(): pytest.skip('no')\n"
        "def test_fail(): assert False\n"
    )
    verdict = lambda k: mutations.run_tests(tmp_path, ("tests/test_x.py", "-k", k), {}).verdict
    assert verdict("fail") == "tests/test_x.py::test_fail"
    assert verdict("pass") == "NOT CAUGHT"
    assert verdict("skip") == "NOT RUN: 1 skipped, 0 passed"
    assert verdict("nothing").startswith("NOT RUN: pytest exited 5")
