"""Issue 22's paper-scale departures 7-9: the SDEdit strengths Diff-Protect evaluates, its SSIM's grey conversion
(OpenCV 4.1.2, the version its env.yml pins), and APGD's step-size schedule after an iteration override."""

import pytest
import torch
from torch import nn

from diffrobust import quality
from diffrobust.attacks import autoattack
from diffrobust.config import load_config


# --- 7: SDEdit strengths -------------------------------------------------------------------------------------------

def test_paper_scale_edits_use_every_strength_diff_protect_evaluates():
    # Diff-Protect's eval (attacks_rdc_pdm.md, Evaluation): SDEdit at 0.01, 0.05, 0.1, 0.2, 0.3
    edit = load_config({"preset": "imagenet"})["pixel_barrier"]["edit"]
    assert edit["strengths"] == [0.01, 0.05, 0.1, 0.2, 0.3]
    assert edit["purified_strength"] in edit["strengths"]


# --- 8: SSIM grey conversion ---------------------------------------------------------------------------------------

# (R, G, B) -> grey level from cv2.cvtColor(COLOR_BGR2GRAY) of opencv-python-headless 4.1.2.30 (Diff-Protect's
# env.yml pin), run on Python 3.8: colours where the 14-bit constants (4899, 9617, 1868) give one level more or less.
OPENCV_4_1_2_GREY = {(8, 140, 245): 112, (35, 146, 231): 122, (119, 6, 214): 63, (128, 247, 160): 202,
                     (192, 82, 254): 134, (243, 22, 245): 113}


def test_grey_conversion_is_opencv_4_1_2s_to_the_level():
    colours = torch.tensor(list(OPENCV_4_1_2_GREY), dtype=torch.float64) / 255
    images = colours.view(-1, 3, 1, 1).expand(-1, 3, 2, 3)
    levels = (quality.diffprotect_grayscale(images) * 255).round().to(torch.int64)
    assert levels.shape == (len(OPENCV_4_1_2_GREY), 1, 2, 3)
    assert levels[:, 0, 0, 0].tolist() == list(OPENCV_4_1_2_GREY.values())
    assert (levels == levels[:, :, :1, :1]).all()


def test_grey_of_a_grey_colour_image_is_its_level():
    # the weights sum to 2^shift, so R = G = B = v gives v exactly (a grey PNG read by cv2 as three equal channels)
    levels = torch.arange(256, dtype=torch.float64).view(1, 1, 16, 16).expand(1, 3, 16, 16) / 255
    assert torch.equal(quality.diffprotect_grayscale(levels), levels[:, :1])


# --- 9: APGD's schedule after an iteration override ----------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("version, attacks", [("custom", ["apgd-ce", "apgd-dlr"]), ("rand", None),
                                              ("standard", None)])
def test_an_iteration_override_gets_the_schedule_apgd_builds_for_it(version, attacks):
    from pyautoattack.autopgd_base import APGDAttack

    adversary = autoattack.build(_model(), threat="linf", eps=0.1, version=version, attacks=attacks, n_iter=200)
    built = APGDAttack(_model(), n_iter=200, eps=0.1)
    assert (built.n_iter_2, built.n_iter_min, built.size_decr) == (44, 12, 6)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        assert (apgd.n_iter, apgd.n_iter_orig) == (200, 200)
        assert (apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == (44, 12, 6)


@pytest.mark.parametrize("n_iter", [1, 3, 17, 100, 1000])
def test_the_schedule_is_the_librarys_at_any_count(n_iter):
    from pyautoattack.autopgd_base import APGDAttack

    built = APGDAttack(_model(), n_iter=n_iter, eps=0.1)
    assert autoattack.apgd_schedule(n_iter) == (built.n_iter_2, built.n_iter_min, built.size_decr)


def test_an_overridden_apgd_runs_the_attack_a_freshly_built_one_runs():
    from pyautoattack.autopgd_base import APGDAttack

    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    model = _model()
    adversary = autoattack.build(model, threat="linf", eps=0.3, version="custom", attacks=["apgd-ce"], seed=5,
                                 n_iter=40, n_restarts=1)
    fresh = APGDAttack(model, n_iter=40, n_restarts=1, eps=0.3, seed=5, norm="Linf")
    outcomes = []
    for apgd in (adversary.apgd, fresh):
        apgd.init_hyperparam(x)
        torch.manual_seed(7)  # the random start
        outcomes.append(apgd.attack_single_run(x, y))
    (best_overridden, _, loss_overridden, _), (best_fresh, _, loss_fresh, _) = outcomes
    assert torch.equal(loss_overridden, loss_fresh)
    assert torch.equal(best_overridden, best_fresh)
