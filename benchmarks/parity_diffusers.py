"""Parity of diffalign's deterministic samplers with the wave-2 diffusers pipelines, on the tiny
random pipelines of the tests: the largest ``max |diff| / max(1, max |ref|)`` per family over 4
and 10 steps and CFG 1 and 3 (FLUX.2 [dev]: 1), against each pipeline's own ``__call__`` from the
same noise (``tests/pipeline_reference.py``). The tests assert the 4-step case at 1e-5. Run:
``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/parity_diffusers.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline_reference import REFERENCE  # noqa: E402
from test_diffusers_families import ARCHS, guidance_scales, load, prompts_for  # noqa: E402
from tiny_pipelines import all_builders  # noqa: E402

from diffalign.core.prompts import negative_prompts  # noqa: E402
from diffalign.core.sampling import sample, seeded_noise  # noqa: E402


def main() -> dict[str, float]:
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp())
    built: dict = {}

    def tiny(arch):
        if arch not in built:
            b = all_builders()[arch](tmp / arch)
            if not isinstance(b, Path):
                return b  # an in-memory pipeline: a fresh one each time
            built[arch] = b
        return built[arch]

    out = {}
    for arch in ARCHS:
        errors = []
        for steps in (4, 10):
            model, source = load(tiny, arch)
            if arch.startswith("flux2"):  # FLUX.2's mu depends on the step count
                model.options.num_steps = steps
                model.schedule = model._schedule()[1]
            prompts = prompts_for(model, tmp)
            sampler = "ddim" if model.schedule.kind == "vp" else "flow_ode"
            for g in guidance_scales(arch):
                noise = seeded_noise(model.sample_shape, [0, 1])
                with torch.no_grad():
                    ref = REFERENCE[arch](model, source, prompts, noise.clone(), g, steps)
                    cond = model.encode_prompts(prompts)
                    uncond = model.encode_prompts(negative_prompts(prompts)) if g != 1 else None
                    ours = sample(model, cond, sampler=sampler, eta=0.0, num_steps=steps, guidance_scale=g,
                                  noise=noise, uncond=uncond).x0
                errors.append((ours - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
        out[arch] = max(errors)
        print(f"{arch:16} {out[arch]:.1e}", flush=True)
    return out


if __name__ == "__main__":
    main()
