"""Wave-3 preference methods learn on a tiny budget (slow): the shipped ``shapes-flow`` fine-tuned for
a few epochs on four prompts, compared with the base model on the same seeds. Settings and the
verifier calibration are in docs/algorithms/preference.md; the easy reward (image brightness)
is what every method raises within a CI-sized run."""

import pytest
from test_preference import SUBSET, brightness, train_on_subset, verifier_result

from diffalign.models import load_model

PAIRS = {"source": "policy", "pairs_per_epoch": 4, "group_size": 8, "inner_epochs": 2, "beta": 250.0}


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,lr,epochs", [  # on the v2 base (0.857): SmPO 6 epochs +0.008, DCPO 3e-5 +0.010
    # the shipped (layout-role) base: SDPO's brightness 0.851 -> 0.844 at 3e-5 (12 epochs 0.847, 6e-5 0.839, without
    # guided training 0.825; on the verifier: accuracy -1 / 64): open, see docs/algorithms/preference.md
    pytest.param("sdpo", {**PAIRS, "train_guidance_scale": 3.0}, 3e-5, 6,
                 marks=pytest.mark.xfail(strict=True, reason="SDPO lowers brightness on the shipped base")),
    ("smpo", PAIRS, 3e-5, 12),
    ("dense_reward_dpo", PAIRS, 3e-5, 6),
    ("ranking_dpo", PAIRS, 3e-5, 6),
    ("dcpo", PAIRS, 1e-4, 6),
    ("ipr", {"prompts_per_epoch": 8, "threshold": 0.0}, 1e-4, 6),
])
def test_it_learns_brightness(method, extra, lr, epochs, tmp_path):
    tuned = train_on_subset(method, "brightness", lr, extra, tmp_path, epochs=epochs)
    before, after = brightness(load_model("shapes-flow").eval()), brightness(tuned)
    assert after > before + 0.01, (before, after)
