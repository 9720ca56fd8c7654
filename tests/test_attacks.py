"""Attacks: budgets are enforced, gradient modes compute what they claim, AutoAttack finds the analytic answer on a
linear model, DiffPure's BPDA+EOT PGD follows its protocol, and the masking checks judge what they say."""

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from diffrobust import seeds
from diffrobust.attacks import BudgetError, attack, check_inside_budget, masking, run_attack
from diffrobust.attacks.budget import project
from diffrobust.attacks.gradients import BPDAPurifier, BoundDefense, EOTLogits, eot_gradient, with_gradient_mode
from diffrobust.attacks.pgd import eot_pgd
from diffrobust.defenses import PurifiedClassifier


def test_a_crafted_example_outside_the_budget_is_refused_and_one_inside_passes():
    x = torch.full((3, 1, 4, 4), 0.5)
    inside = x.clone()
    inside[0, 0, 0, 0] += 0.1
    assert check_inside_budget(x, inside, "linf", 0.1).tolist() == pytest.approx([0.1, 0, 0], abs=1e-7)
    outside = inside.clone()
    outside[2, 0, 1, 1] += 0.1001
    with pytest.raises(BudgetError, match=r"1 outside the linf ball.*rows \[2\]"):
        check_inside_budget(x, outside, "linf", 0.1)
    l2 = x.clone()
    l2[1, 0, :2, :2] += 0.26  # norm 0.52
    with pytest.raises(BudgetError, match="outside the l2 ball"):
        check_inside_budget(x, l2, "l2", 0.5)
    out_of_range = x.clone()
    out_of_range[0] = 1.05
    with pytest.raises(BudgetError, match=r"outside \[0, 1\]"):
        check_inside_budget(x, out_of_range, "linf", 0.6)


def test_projection_lands_inside_the_ball_and_the_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g)
    far = x + torch.randn(x.shape, generator=g)
    for threat, eps in (("linf", 0.05), ("l2", 0.3)):
        projected = project(far, x, threat, eps)
        norms = check_inside_budget(x, projected, threat, eps)
        assert float(norms.max()) > 0.5 * eps


class Quadratic:
    """A nonlinear, randomized purifier: x² + 0.1·noise."""

    def __call__(self, x, generator=None):
        return x ** 2 + 0.1 * torch.randn(x.shape, generator=generator)


def test_bpda_backward_is_the_identity_and_full_backward_is_the_true_derivative():
    x = torch.rand(2, 1, 3, 3, dtype=torch.float32).requires_grad_(True)
    w = torch.randn(2, 1, 3, 3)
    (BPDAPurifier(Quadratic())(x, torch.Generator().manual_seed(1)) * w).sum().backward()
    assert torch.equal(x.grad, w)
    x.grad = None
    (Quadratic()(x, torch.Generator().manual_seed(1)) * w).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach() * w)


def test_gradient_mode_wraps_only_the_purifier_of_a_composed_defense():
    classifier = nn.Flatten()
    defense = PurifiedClassifier(Quadratic(), classifier)
    assert with_gradient_mode(defense, "full") is defense
    bpda = with_gradient_mode(defense, "bpda")
    assert isinstance(bpda.purifier, BPDAPurifier) and bpda.classifier is classifier
    assert with_gradient_mode(classifier, "bpda") is classifier
    with pytest.raises(ValueError, match="gradient mode"):
        with_gradient_mode(defense, "adjoint")


def test_eot_gradient_is_the_mean_of_the_per_draw_gradients():
    x = torch.rand(3, 4, dtype=torch.float64)

    def loss(x, generator):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return (torch.sin(x * noise) * noise).sum(dim=1)

    mean_loss, grad = eot_gradient(loss, x, 5, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    per_draw = []
    for _ in range(5):
        noise = torch.randn(x.shape, generator=replay, dtype=x.dtype)
        per_draw.append(torch.cos(x * noise) * noise * noise)  # d/dx of sin(x·n)·n
    assert torch.allclose(grad, torch.stack(per_draw).mean(0))
    assert mean_loss.shape == (3,)


def test_eot_logits_average_the_draws():
    defense = PurifiedClassifier(Quadratic(), nn.Flatten())
    x = torch.rand(2, 1, 2, 2)
    averaged = EOTLogits(defense, 4)(x, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    draws = defense(x.repeat(4, 1, 1, 1), replay).reshape(4, 2, -1)
    assert torch.allclose(averaged, draws.mean(0))


def test_the_bound_defense_counts_forwards_and_backwards():
    bound = BoundDefense(PurifiedClassifier(Quadratic(), nn.Flatten()), torch.Generator().manual_seed(0))
    x = torch.rand(3, 1, 2, 2, requires_grad=True)
    for _ in range(2):  # the same input tensor twice, as APGD's EOT loop does
        bound(x).sum().backward()
    with torch.no_grad():
        bound(x[:1])
    assert (bound.forward_images, bound.gradient_images) == (7, 6)


def linear_classifier(num_classes=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, dim, generator=g))
        layer.bias.copy_(torch.randn(num_classes, generator=g) * 0.1)
    return nn.Sequential(nn.Flatten(), layer).eval()


def minimal_distance(model, x, y, dual):
    """Exact distance to misclassification of a linear model (box ignored): min over j of margin / ‖w_y - w_j‖_dual."""
    layer = model[1]
    logits = model(x).detach()
    w, b = layer.weight.detach(), layer.bias.detach()
    distances = []
    for i in range(x.shape[0]):
        others = [j for j in range(w.shape[0]) if j != y[i]]
        margins = torch.stack([logits[i, y[i]] - logits[i, j] for j in others])
        norms = torch.stack([(w[y[i]] - w[j]).norm(p=dual) for j in others])
        distances.append(float((margins / norms).min()))
    return np.array(distances)


@pytest.mark.parametrize("threat,dual", [("linf", 1), ("l2", 2)])
def test_autoattack_on_a_linear_model_reaches_the_analytic_minimal_perturbation(threat, dual):
    model = linear_classifier(dim=25)
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.05 * torch.rand(24, 1, 5, 5, generator=g)  # Square's l2 search needs images of 5 px or more  # far from the box: the exact answer is the hyperplane's
    y = model(x).argmax(1)
    distance = minimal_distance(model, x, y, dual)
    eps = float(np.median(distance))
    assert float((x.min() - eps)) > 0 and float(x.max() + eps) < 1
    x_adv = attack(model, x, y, threat=threat, eps=eps,
                   settings={"method": "autoattack", "version": "standard"}, generator=seeds.generator(0))
    broken = (model(x_adv).argmax(1) != y).numpy()
    # every image whose exact distance is within eps falls, none farther can (margin 1e-4 for float rounding)
    assert broken[distance < eps * (1 - 1e-3)].all()
    assert not broken[distance > eps * (1 + 1e-4)].any()
    assert broken.sum() >= (distance < eps).sum()


def test_bpda_eot_pgd_breaks_an_undefended_linear_model_and_keeps_the_first_success():
    model = linear_classifier()
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 0.05 * torch.rand(16, 1, 2, 4, generator=g)
    y = model(x).argmax(1)
    distance = minimal_distance(model, x, y, 1)
    eps = float(np.median(distance))
    defense = PurifiedClassifier(lambda x, generator=None: x + 0.0 * torch.randn(x.shape, generator=generator),
                                 model)
    x_adv, defended = eot_pgd(with_gradient_mode(defense, "bpda"), x, y, threat="linf", eps=eps, steps=40,
                              step_size=eps / 4, eot_attack_reps=2, eot_defense_reps=3,
                              generator=torch.Generator().manual_seed(0))
    check_inside_budget(x, x_adv, "linf", eps)
    wrong = model(x_adv).argmax(1) != y
    assert torch.equal(wrong, ~defended)  # the stored example of a broken image is a misclassified one
    assert (~defended).numpy()[distance < 0.9 * eps].all()
    assert defended.numpy()[distance > eps * 1.0001].all()


def test_run_attack_reports_its_cost_and_refuses_unknown_methods():
    model = linear_classifier()
    x = torch.rand(4, 1, 2, 4)
    y = model(x).argmax(1)
    result = run_attack(model, x, y, threat="l2", eps=0.1,
                        settings={"method": "eot_pgd", "steps": 3, "step_size": 0.05, "eot_attack_reps": 2,
                                  "eot_defense_reps": 0})
    assert result.gradient_images > 0 and result.forward_images >= result.gradient_images
    with pytest.raises(ValueError, match="unknown attack method"):
        run_attack(model, x, y, threat="l2", eps=0.1, settings={"method": "cw"})


def test_masking_checks_judge_the_numbers_they_are_given():
    clean = [True] * 40  # every image correctly classified clean: each check has 40 images to judge
    assert masking.undefended_falls([False] * 39 + [True], clean).passed  # 2.5%
    assert not masking.undefended_falls([False] * 30 + [True] * 10, clean).passed
    assert masking.large_budget_breaks([False] * 20, clean[:20], 0.5).passed
    assert not masking.large_budget_breaks([True] * 5 + [False] * 15, clean[:20], 0.5).passed
    reported = [True] * 20 + [False] * 20  # 0.5, interval about [0.34, 0.66]
    assert masking.more_iterations_agree(reported, [True] * 16 + [False] * 24, clean).passed
    failed = masking.more_iterations_agree(reported, [True] * 8 + [False] * 32, clean)
    assert failed.passed is False and failed.value == pytest.approx(0.2)
    assert masking.transfer_not_stronger(reported, [True] * 40, clean).passed
    stronger = masking.transfer_not_stronger([True] * 30 + [False] * 10, [False] * 40, clean)
    assert stronger.passed is False and stronger.value == pytest.approx(-0.75)
    flips = masking.flip_rate([1, 2, 3, 4], [1, 2, 0, 4])
    assert flips.value == pytest.approx(0.25)
    interval = masking.accuracy([True] * 3 + [False])
    assert interval["accuracy"] == 0.75 and 0.19 < interval["ci_low"] < 0.2 and 0.99 < interval["ci_high"] < 1


def test_the_check_summary_names_what_failed_and_what_it_casts_doubt_on():
    passed = masking.large_budget_breaks([False] * 10, [True] * 10, 0.5).row()
    failed = {**masking.undefended_falls([True] * 3 + [False], [True] * 4).row(), "threat": "linf"}
    assert masking.summary([passed]) == "**All checks passed**, each on 10 of 10 images correctly classified clean."
    text = masking.summary([passed, failed])
    assert text.startswith("**Failed:** linf undefended classifier falls (0.750, wanted <= 5%, on 4 of 4 images "
                           "correctly classified clean)")
    assert "casts doubt on every robust accuracy" in text


def test_the_check_table_indexes_by_threat_and_check_and_rounds_the_value():
    rows = [{**masking.flip_rate([1, 2, 3], [1, 2, 0]).row(), "threat": "l2"}]
    frame = masking.table(rows)
    assert list(frame.index) == [("l2", "prediction flips between two forwards")]
    assert frame.iloc[0]["value"] == "0.333"


class _TiedOffCleanImages(torch.nn.Module):
    """Logits 5 for the true class of a clean image; on any other image the true class and the next one tie at 5, so
    Square's margin is exactly 0 there: neither fooled (< 0) nor left to attack (> 0)."""

    def __init__(self, clean, labels, num_classes=3):
        super().__init__()
        self.clean, self.labels, self.num_classes = clean, labels, num_classes

    def forward(self, x):
        same = (x.flatten(1)[:, None] == self.clean.flatten(1)[None]).all(-1)
        true = self.labels[same.float().argmax(1)]
        logits = torch.nn.functional.one_hot(true, self.num_classes).float() * 5.0
        tie = torch.nn.functional.one_hot((true + 1) % self.num_classes, self.num_classes).float() * 5.0
        return logits + tie * (~same.any(1)).float()[:, None]


@pytest.mark.parametrize("threat", ["l2", "linf"])
def test_square_survives_a_step_with_no_point_left_to_attack(threat):
    # pyautoattack 0.2.0's L2 Square selects the points with margin > 0 at each query; with none (all fooled or tied
    # after its initialisation, not all fooled) it reshaped an empty batch (view(0, -1)) and crashed: seen in the
    # cifar10 rehearsal, RDC under rdc_standard l2
    autoattack = importlib.import_module("diffrobust.attacks.autoattack")  # the package names a function autoattack

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0])
    model = _TiedOffCleanImages(x, y)
    x_adv, robust = autoattack.run(model, x, y, threat=threat, eps=0.5 if threat == "l2" else 8 / 255,
                                   version="custom", attacks=["square"], n_queries=3)
    # a tie resolves to the true class (argmax takes the first): the points stay robust, and were perturbed
    assert robust.all()
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
