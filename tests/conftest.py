"""Test setup: the compile settings (before JAX is imported), the parity fixture root and the shared
fixtures; the tiers and the checks of a whole run are in run_checks.py."""

from compile_settings import configure

configure()  # before anything imports JAX: it reads its cache settings at import

import gc  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from gcs_emulator import gcs, gs_dir  # noqa: E402,F401  (a GCS emulator for gs:// tests)

pytest_plugins = ["run_checks"]  # the two tiers, and the checks of a whole run

FIXTURES = Path(os.environ.get("MIMO_FIXTURES", Path(__file__).parent / "fixtures"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's data directory (a small eSpeak NG corpus tokenized by a random audio tokenizer,
    tokenizer.json, shards/), read-only: made once per run, under a file lock, for every xdist
    worker (their base temporary directories share a parent)."""
    from filelock import FileLock

    from experiments import demo

    root = tmp_path_factory.getbasetemp().parent / "shared-demo"
    data = root / "data"
    with FileLock(str(root) + ".lock"):
        if not (data / "shards" / "manifest.json").exists():
            demo.build_corpus(data, 3)
            demo.random_tokenizer(root / "audio_tokenizer")
            demo.tokenize(data, root / "audio_tokenizer")
    return data


@pytest.fixture(scope="module")
def lm(fixtures_root):
    """(config, model) of the LM fixture, converted from its official checkpoint (per module: a
    module may define its own `lm`)."""
    from mimo_jax.conversion.convert import load_torch_checkpoint
    from mimo_jax.lm.conversion import LMFamily

    return load_torch_checkpoint(fixtures_root / "lm", LMFamily())


@pytest.fixture(scope="module")
def prompt(lm, fixtures_root):
    """The LM fixture's prompt as (text [1, G], codes [1, G, group_size, channels])."""
    import numpy as np

    from mimo_jax.lm.layout import from_official

    ref = np.load(fixtures_root / "lm" / "reference.npz")
    return from_official(ref["prompt_ids"], lm[0].group_size)


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"MIMO_FIXTURES={FIXTURES} is not a directory")
    return FIXTURES


@pytest.fixture(scope="module")
def fx(fixtures_root):
    """The tasks/ fixture: prompts, generations and outputs of every task."""
    from tasks_support import TasksFixture

    return TasksFixture(fixtures_root)


@pytest.fixture(scope="module")
def mimo(fx):
    """MimoAudio over the tasks/ fixture's LM, audio tokenizer and text tokenizer."""
    from tasks_support import fixture_lm

    from mimo_jax.inference.mimo_audio import MimoAudio
    from mimo_jax.lm.model import unstack_for_decoding
    from mimo_jax.tokenizer.audio_tokenizer import Tokenizer

    config, model = fixture_lm(fx)
    # Decoding with the stacks' layers unstacked, as MimoAudio.load holds the model on the CPU.
    return MimoAudio(
        config,
        unstack_for_decoding(model),
        Tokenizer.load(str(fx.dir / fx.meta["audio_tokenizer"])),
        fx.tok,
    )


# XLA:CPU maps each executable's code into memory (a few mappings each, held while a jit cache keeps
# the executable). A worker that runs half the suite reached 60,000 of Linux's 65,530 mappings
# (vm.max_map_count), where the next compile or cache write dies in native code: a crashed worker,
# not a failed test. Past this many mappings a finished module's compiled programs are released.
MAX_MAPPINGS = 16384


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to keep under
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    if _mappings() > MAX_MAPPINGS:
        import jax

        jax.clear_caches()
        gc.collect()
