"""DiffPure: the purifier follows the official runner (forward level, reverse grid, time input, rand_t), its full
gradient is the true derivative of the discretised chain, and the attack jobs are resumable and scored right."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffrobust import diffusion as dp
from diffrobust.defenses.diffpure import DiffPurePurifier
from diffrobust.stages import diffpure, robustness
from helpers import tiny_mnist_project


class TinyEps(nn.Module):
    """A smooth nonlinear eps network (float64) that also records the time inputs it was called with."""

    def __init__(self, channels=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.3)
        self.times = []

    def forward(self, x, t, y=None):
        self.times.append(float(t[0]))
        return torch.tanh(self.conv(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _purify(purifier, x, seed=5):
    return purifier(x, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_full_gradient_through_a_three_step_purifier_equals_finite_differences(checkpoint):
    purifier = DiffPurePurifier(TinyEps(), t_star=0.003, dt=0.001, checkpoint=checkpoint)
    assert purifier.network_evaluations() == 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x_var = x.clone().requires_grad_(True)
    (_purify(purifier, x_var) * w).sum().backward()
    h = 1e-6
    numeric = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=torch.float64)
        step[i] = h
        step = step.view_as(x)
        up = (_purify(purifier, x + step) * w).sum()
        down = (_purify(purifier, x - step) * w).sum()
        numeric.view(-1)[i] = (up - down) / (2 * h)
    assert torch.allclose(x_var.grad, numeric, rtol=1e-6, atol=1e-8)


def test_the_forward_step_uses_the_discrete_alpha_bar_at_index_tstar_n_minus_one():
    class Zero(nn.Module):
        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    x = torch.rand(1, 1, 2, 2, dtype=torch.float64)
    purifier = DiffPurePurifier(Zero(), t_star=0.1, dt=0.1 - dp.VPSDE_T_END)  # one reverse step
    noise = dp.noise_like(dp.imagespace.to_model_space(x), torch.Generator().manual_seed(5))
    betas = np.linspace(0.1 / 1000, 20 / 1000, 1000)
    a = float(np.cumprod(1 - betas)[99])
    x_t = math.sqrt(a) * (2 * x - 1) + math.sqrt(1 - a) * noise
    t, h = 0.1, 0.1 - dp.VPSDE_T_END
    beta = 0.1 + t * 19.9
    generator = torch.Generator().manual_seed(5)
    dp.noise_like(x_t, generator)  # the forward noise comes first from the same stream
    z = dp.noise_like(x_t, generator)
    expected = x_t + h * beta * 0.5 * x_t + math.sqrt(beta * h) * z
    assert torch.allclose(_purify(purifier, x), (expected + 1) / 2)


@pytest.mark.parametrize("time_input,first,last", [("discrete", 100.0, 1.0), ("continuous", 99.9, 0.999)])
def test_the_network_reads_time_as_its_family_says(time_input, first, last):
    net = TinyEps()
    purifier = DiffPurePurifier(net, t_star=0.1, time_input=time_input)
    assert purifier.network_evaluations() == 100  # dt 1e-3 at t* = 0.1, as DiffPure
    _purify(purifier, torch.rand(1, 1, 4, 4, dtype=torch.float64))
    assert len(net.times) == 100
    assert net.times[0] == pytest.approx(first) and net.times[-1] == pytest.approx(last, abs=1e-6)


def test_rand_t_moves_the_forward_level_only(monkeypatch):
    levels = []
    real_q_sample = dp.vpsde_q_sample
    monkeypatch.setattr(dp, "vpsde_q_sample", lambda x0, t, noise, *a: levels.append(round(t * 1000)) or
                        real_q_sample(x0, t, noise, *a))
    net = TinyEps()
    purifier = DiffPurePurifier(net, t_star=0.02, dt=0.01, rand_t=True, t_delta=5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        purifier(torch.rand(1, 1, 4, 4, dtype=torch.float64), generator)
    assert set(levels) <= set(range(15, 25)) and len(set(levels)) > 5
    assert net.times[0] == 20.0  # the reverse process still starts at t* (as the official runner)


def test_the_ddpm_variant_runs_the_models_own_chain_from_tstar():
    net = TinyEps()
    schedule = dp.GaussianDiffusion.linear(1000, variance="fixed_small")
    purifier = DiffPurePurifier(net, t_star=0.005, variant="ddpm", schedule=schedule)
    assert purifier.network_evaluations() == 5
    _purify(purifier, torch.rand(1, 1, 4, 4, dtype=torch.float64))
    assert net.times == [4.0, 3.0, 2.0, 1.0, 0.0]


def test_bad_purifier_settings_are_refused():
    with pytest.raises(ValueError, match="t\\* must lie"):
        DiffPurePurifier(TinyEps(), t_star=0.1005)
    with pytest.raises(ValueError, match="schedule"):
        DiffPurePurifier(TinyEps(), t_star=0.1, variant="ddpm")
    with pytest.raises(ValueError, match="variant"):
        DiffPurePurifier(TinyEps(), t_star=0.1, variant="ode")


# ---------------------------------------------------------------------------------------------------------------
# The attack jobs
# ---------------------------------------------------------------------------------------------------------------

SETTINGS = {
    "threats": {"linf": {"eps": 0.1, "t_star": 0.01, "large_eps": 0.4}},
    "purifier": {"variant": "sde", "dt": 0.005, "rand_t": False, "t_delta": 15, "checkpoint": False},
    "attacks": {"rand": {"method": "autoattack", "version": "rand", "gradient_mode": "full", "n_iter": 2,
                         "eot_iter": 1},
                "bpda_eot": {"method": "eot_pgd", "gradient_mode": "bpda", "steps": 3, "relative_step_size": 0.25,
                             "eot_attack_reps": 2, "eot_defense_reps": 2}},
    "checks": {"attack": "rand", "iterations_factor": 2},
    "eval_draws": 1, "batch_size": 3, "shard_size": 7, "seed": 0,
}
SUBSET = {"n": 10, "seeds": [0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 20-image MNIST test split and random-weight models."""
    return tiny_mnist_project(tmp_path_factory.mktemp("diffpure"), attention_resolutions="")


def _run(setup, out, defense="diffpure", attack="bpda_eot", shard=0, settings=SETTINGS):
    return diffpure.attack_shard(defense=defense, attack=attack, threat="linf", shard=shard, settings=settings,
                                 subset=SUBSET, dataset_dir=setup / "mnist",
                                 models={"diffusion": str(setup / "diffusion.pt"),
                                         "classifier": str(setup / "classifier.pt")},
                                 out_path=out / "shard.npz", work_dir=out / "work", progress=False)


def _read(setup, path, settings=SETTINGS):
    return diffpure.read_set([path], setup / "mnist", threat="linf", settings=settings)


def test_a_killed_attack_job_resumes_without_redoing_finished_batches(setup, tmp_path, monkeypatch):
    real = robustness._attack_batch
    calls = []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(int(args[3][0]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(robustness, "_attack_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "killed")
    assert not (tmp_path / "killed/shard.npz").exists()
    finished = sorted((tmp_path / "killed/work").glob("batch*.npz"))
    stamps = [path.stat().st_mtime_ns for path in finished]
    assert len(finished) == 1
    calls.clear()
    monkeypatch.setattr(robustness, "_attack_batch", lambda *a, **k: calls.append(int(a[3][0])) or real(*a, **k))
    _run(setup, tmp_path / "killed")
    assert len(calls) == 2  # 7 images in batches of 3: only the two unfinished batches ran
    assert [path.stat().st_mtime_ns for path in finished] == stamps
    resumed = _read(setup, tmp_path / "killed/shard.npz")
    monkeypatch.setattr(robustness, "_attack_batch", real)
    _run(setup, tmp_path / "clean")
    clean = _read(setup, tmp_path / "clean/shard.npz")
    for key in ("idx", "label", "x_adv", "attack_robust", "adv_correct", "clean_correct"):
        assert np.array_equal(resumed[key], clean[key]), key
    assert resumed["x_adv"].dtype == np.float32 and len(resumed["idx"]) == 7


def test_a_settings_change_restarts_the_work_folder(setup, tmp_path):
    _run(setup, tmp_path)
    first = _read(setup, tmp_path / "shard.npz")
    changed = {**SETTINGS, "threats": {"linf": {**SETTINGS["threats"]["linf"], "eps": 0.05}}}
    _run(setup, tmp_path, settings=changed)
    second = _read(setup, tmp_path / "shard.npz", changed)
    assert second["identity"]["settings"]["eps"] == 0.05 != first["identity"]["settings"]["eps"]
    assert (tmp_path / "work.stale").exists()


def test_derived_check_attacks_double_the_iterations_and_raise_the_budget():
    assert diffpure.attack_names(SETTINGS) == ["rand", "bpda_eot", "rand-more", "rand-large"]
    eps, plan = diffpure.attack_plan(SETTINGS, "rand-more", "linf")
    assert (eps, plan["n_iter"]) == (0.1, 4)
    eps, plan = diffpure.attack_plan(SETTINGS, "rand-large", "linf")
    assert (eps, plan["n_iter"]) == (0.4, 2)
    eps, plan = diffpure.attack_plan(SETTINGS, "bpda_eot", "linf")
    assert plan["step_size"] == pytest.approx(0.025) and "relative_step_size" not in plan
    with pytest.raises(ValueError, match="unknown attack"):
        diffpure.attack_plan(SETTINGS, "bpda_eot-more", "linf")


def test_a_transfer_set_is_scored_on_another_defense_and_a_tampered_set_is_refused(setup, tmp_path):
    _run(setup, tmp_path / "undefended", defense="undefended", attack="rand")
    models_ = {"diffusion": str(setup / "diffusion.pt"), "classifier": str(setup / "classifier.pt")}
    summary = diffpure.evaluate_set(defense="diffpure", threat="linf", set_paths=[tmp_path / "undefended/shard.npz"],
                                    settings=SETTINGS, dataset_dir=setup / "mnist", models=models_,
                                    out_path=tmp_path / "transfer.npz")
    scored = dict(np.load(tmp_path / "transfer.npz"))
    assert summary["images"] == 7 and scored["adv_correct"].shape == (7,)
    assert 0 <= summary["flip_rate"] <= 1
    tampered = dict(np.load(tmp_path / "undefended/shard.npz"))
    tampered["x_adv"] = np.clip(tampered["x_adv"] + 0.2, 0, 1).astype(np.float32)
    np.savez(tmp_path / "tampered.npz", **tampered)
    with pytest.raises(diffpure.SetError, match="outside the linf ball"):
        diffpure.evaluate_set(defense="diffpure", threat="linf", set_paths=[tmp_path / "tampered.npz"],
                              settings=SETTINGS, dataset_dir=setup / "mnist", models=models_,
                              out_path=tmp_path / "never.npz")
    assert not (tmp_path / "never.npz").exists()


def _fake_set(robust):
    robust = np.asarray(robust, dtype=bool)
    n = robust.size
    return {"idx": np.arange(n), "clean_correct": np.ones(n, bool), "attack_robust": robust,
            "adv_correct": np.ones(n, bool)}


def test_the_table_takes_diffpures_minimum_and_the_per_image_worst_case():
    sets = {("diffpure", "standard"): _fake_set([1, 1, 0, 0]), ("diffpure", "rand"): _fake_set([1, 0, 1, 0])}
    settings = {**SETTINGS, "attacks": {"standard": {}, "rand": {}}}
    rows = {row["attack"]: row for row in diffpure.table_rows(sets, "linf", settings)}
    assert rows["min(standard, rand)"]["robust_accuracy"] == 0.5
    assert rows["worst case per image"]["robust_accuracy"] == 0.25
    assert rows["standard"]["clean_accuracy"] == 1.0
