import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

# one thread per test worker (see Makefile); set before any test builds a model
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    """Every test starts from a seed derived from its own id, so a test that draws unseeded random
    tensors draws the same ones on every run, whichever worker (pytest-xdist) runs it and in
    whatever order: a failure reproduces on the next run instead of passing by chance."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """``tiny_pipeline(arch)``: a tiny random diffusers pipeline directory (tests/tiny_*.py), built
    once per session (per test worker) under the session's tmp directory. Builders that return an
    in-memory pipeline (Qwen-Image-Edit: its processor cannot be saved here) build a fresh one on
    every call, since LoRA injection modifies a pipeline in place."""
    cache = {}
    root = tmp_path_factory.getbasetemp() / "tiny_pipelines"

    def get(arch: str):
        from tiny_pipelines import all_builders

        if arch in cache:
            return cache[arch]
        built = all_builders()[arch](root / arch)
        if isinstance(built, Path):
            cache[arch] = built
        return built

    return get


@pytest.fixture(scope="module")
def quiet_diffusers():
    """diffusers' and transformers' progress bars and warnings off (tiny random pipelines warn a lot)."""
    import logging

    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
