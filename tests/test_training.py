"""diffrobust.training on a tiny synthetic dataset: learning, determinism, resuming after a kill, RDC's multi-head
initialisation and fine-tuning, the classifier, and the sample grid."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import Interrupted, class_distinct_edm, interrupt_at, randomize, write_toy_dataset

from diffrobust import data, models, training

NUM_CLASSES = 3


def synthetic_images(count, seed):
    """8x8 single-channel images: class c is a bright 2-pixel-wide bar at columns 2c+1, 2c+2 (row offset varies)
    on a dim noisy background."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % NUM_CLASSES
    images = rng.integers(0, 60, size=(count, 1, 8, 8))
    for i, label in enumerate(labels):
        top = rng.integers(0, 3)
        images[i, 0, top:top + 6, 2 * label + 1:2 * label + 3] = rng.integers(180, 256, size=(6, 2))
    return images.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("synthetic"), synthetic_images,
                             (("train", 48, 0), ("test", 30, 1)),
                             {"name": "synthetic", "num_classes": NUM_CLASSES, "class_names": ["a", "b", "c"]})


TINY_UNET = {"family": "adm_unet", "config": {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
                                               "attention_resolutions": "", "num_heads": 1, "dropout": 0.1}}
DIFFUSION = dict(architecture=TINY_UNET, schedule="linear", num_timesteps=100, batch_size=8, lr=2e-3,
                 ema_decay=0.9, label_dropout=0.3, seed=0, log_every=2, warmup_steps=2)
CLASSIFIER = dict(architecture={"family": "small_resnet", "config": {"width": 8, "depth": 8}}, batch_size=16,
                  lr=0.1, seed=0, augment=True, max_shift=1, log_every=1)


def read_losses(out_dir):
    lines = (out_dir / training.LOSS_FILE).read_text().splitlines()
    assert lines[0] == "step\tloss\tseconds"
    return [(int(step), float(loss)) for step, loss, _ in (line.split("\t") for line in lines[1:])]


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def weights_differ(a, b):
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- pieces ---------------------------------------------------------------------------------------------------------

def test_batch_stream_order_depends_on_the_step_alone():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    stream = training.BatchStream(images, np.zeros(10), batch_size=4, seed=3)
    rows = torch.cat([stream.rows(step) for step in range(5)]).tolist()  # 20 positions = epochs 0 and 1
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # each epoch has its own permutation
    fresh = training.BatchStream(images, np.zeros(10), batch_size=4, seed=3)
    assert fresh.rows(3).tolist() == rows[12:16]  # no need to replay steps 0..2
    assert fresh.position(3) == (1, 2)
    x01, _ = fresh.batch(3)
    assert torch.equal(x01.flatten(), torch.tensor(rows[12:16], dtype=torch.float32) / 255)


def test_ema_warmup_and_update():
    assert training.ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert training.ema_decay_at(0.999, 10_000) == 0.999
    average, current = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        average.weight.fill_(1.0)
        current.weight.fill_(5.0)
    training.update_ema(average, current, 0.75)
    assert average.weight.item() == pytest.approx(0.75 * 1.0 + 0.25 * 5.0)


def test_noise_table_draws_q_samples_at_the_network_timestep():
    chain = models.build_diffusion(models.diffusion_settings("linear", 100, rescale_timesteps=True))
    table = training.NoiseTable(chain)
    x0 = torch.full((4, 1, 2, 2), 0.5)
    x_t, noise, t_model = table.noisy(x0, torch.Generator().manual_seed(0))
    index = (t_model / chain.timestep_scale).round().long()
    assert torch.allclose(t_model, index.float() * 10.0)  # rescale_timesteps: 1000 / T = 10
    for i in range(4):
        level = int(index[i]) + 1  # table index i is time i + 1 (diffusion.py's convention)
        expected = chain.q_sample(x0[i:i + 1].double(), level, noise[i:i + 1].double())
        assert torch.allclose(x_t[i:i + 1].double(), expected, atol=1e-6)


def test_label_dropout_uses_the_null_class():
    labels = torch.arange(3).repeat(2000)
    dropped = training.drop_labels(labels, 0.25, 3, torch.Generator().manual_seed(0))
    replaced = dropped != labels
    assert torch.all(dropped[replaced] == 3)
    assert abs(replaced.float().mean().item() - 0.25) < 0.02


# --- diffusion training ---------------------------------------------------------------------------------------------

def test_diffusion_training_learns_and_writes_its_outputs(dataset_dir, tmp_path):
    loaded = training.train_diffusion(dataset_dir, tmp_path, steps=40, checkpoint_every=10, **DIFFUSION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.tsv", "model.pt"]  # resume file removed
    losses = [loss for _, loss in read_losses(tmp_path)]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])
    assert loaded.kind == "diffusion" and loaded.null_class == NUM_CLASSES
    config = loaded.architecture["config"]
    assert (config["in_channels"], config["image_size"], config["num_classes"]) == (1, 8, NUM_CLASSES + 1)
    assert loaded.extra["training"]["label_dropout"] == 0.3
    assert models.num_label_classes(loaded) == NUM_CLASSES
    # the posterior variance: DensePure's 2-step reverse with beta-sized steps (fixed_large) adds too much noise
    assert models.load_model(tmp_path / "model.pt").diffusion_settings["variance"] == "fixed_small"


def test_same_seed_gives_identical_weights(dataset_dir, tmp_path):
    first = training.train_diffusion(dataset_dir, tmp_path / "a", steps=6, **DIFFUSION)
    second = training.train_diffusion(dataset_dir, tmp_path / "b", steps=6, **DIFFUSION)
    assert_same_weights(first.network, second.network)
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")
    other = training.train_diffusion(dataset_dir, tmp_path / "c", steps=6, **{**DIFFUSION, "seed": 1})
    assert weights_differ(first.network, other.network)


KILLED_RUN = """
import os, torch
from diffrobust import training
torch.set_num_threads({threads})
def stop(step):
    if step == 7:
        os._exit(17)  # no cleanup, no exception handling: as a killed job
training.train_diffusion({dataset!r}, {out!r}, steps=10, checkpoint_every=3, on_step=stop, **{kwargs!r})
"""


def test_killed_diffusion_job_resumes_to_the_uninterrupted_result(dataset_dir, tmp_path):
    uninterrupted = training.train_diffusion(dataset_dir, tmp_path / "whole", steps=10, checkpoint_every=3,
                                             **DIFFUSION)
    out = tmp_path / "killed"
    script = KILLED_RUN.format(threads=torch.get_num_threads(), dataset=str(dataset_dir), out=str(out),
                               kwargs=DIFFUSION)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert completed.returncode == 17, completed.stderr
    assert not (out / "model.pt").exists()
    resume = torch.load(out / training.RESUME_FILE, weights_only=True)
    assert resume["step"] == 6 and resume["data_position"] == [1, 0]  # 6 batches of 8 = one epoch of 48
    assert [step for step, _ in read_losses(out)] == [2, 4, 6]

    resumed = training.train_diffusion(dataset_dir, out, steps=10, checkpoint_every=3, **DIFFUSION)
    assert_same_weights(resumed.network, uninterrupted.network)
    assert read_losses(out) == read_losses(tmp_path / "whole")
    assert not (out / training.RESUME_FILE).exists()


# --- RDC's multi-head model -----------------------------------------------------------------------------------------

def conditional_network(seed=0, **config):
    architecture = {"family": "adm_unet", "config": {
        **TINY_UNET["config"], "image_size": 8, "in_channels": 1, "class_cond": True, "num_classes": 4, **config}}
    return randomize(models.build_architecture(architecture), seed).eval()


def test_multihead_initialisation_copies_shared_weights_and_replicates_the_output_layer():
    conditional = conditional_network(learn_sigma=True)  # 2 output channels per head: eps and v
    multihead, architecture = training.multihead_from_conditional(conditional, NUM_CLASSES, fold_label=3)
    source, target = conditional.state_dict(), multihead.state_dict()
    assert set(target) == set(source) - {"label_emb.weight"}
    assert architecture["config"]["output_heads"] == NUM_CLASSES and not architecture["config"]["class_cond"]
    for key in target:
        if key == "time_embed.2.bias":
            assert torch.equal(target[key], source[key] + source["label_emb.weight"][3])
        elif key.startswith("out.2."):
            assert target[key].shape[0] == NUM_CLASSES * 2
            for head in range(NUM_CLASSES):
                assert torch.equal(target[key][2 * head:2 * head + 2], source[key])
        else:
            assert torch.equal(target[key], source[key]), key


@pytest.mark.parametrize("patch", [{}, {"patch_size": 2, "attention_resolutions": "4"}], ids=["plain", "patched"])
def test_every_head_starts_at_the_folded_class_and_only_there(patch):
    conditional = conditional_network(**patch)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5.0, 80.0])
    multihead, _ = training.multihead_from_conditional(conditional, NUM_CLASSES, fold_label=3)
    with torch.no_grad():
        heads = models.multihead_outputs(multihead, x, t, NUM_CLASSES)
        for k in range(4):
            eps_k = conditional(x, t, y=torch.full((2,), k))
            if k == 3:  # the folded null class: every head, up to the rounding of the moved addition
                for head in range(NUM_CLASSES):
                    assert (heads[:, head] - eps_k).abs().max().item() < 1e-5
            else:  # a real class has its own embedding: its eps is not what the heads start from
                assert (heads[:, k] - eps_k).abs().max().item() > 1e-3

        # Without folding, the heads compute the network with a zero label embedding: exactly eps(x, t, k) for a
        # class k whose embedding row is zero (adding 0.0 changes no bit).
        conditional.label_emb.weight[1] = 0.0
        unfolded, _ = training.multihead_from_conditional(conditional, NUM_CLASSES, fold_label=None)
        heads = models.multihead_outputs(unfolded, x, t, NUM_CLASSES)
        eps_1 = conditional(x, t, y=torch.full((2,), 1))
        assert all(torch.equal(heads[:, head], eps_1) for head in range(NUM_CLASSES))


def test_distilling_a_subset_of_heads_estimates_the_all_heads_loss_without_bias():
    teacher = conditional_network(seed=4, dropout=0.0)
    with torch.no_grad():
        teacher.label_emb.weight.mul_(40.0)
    student, _ = training.multihead_from_conditional(teacher, NUM_CLASSES, fold_label=3)
    table = training.NoiseTable(models.build_diffusion(models.diffusion_settings("linear", 100)))
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])

    def loss(seed, distill_classes):
        with torch.no_grad():  # same seed: same x_t and noise (drawn first), different heads only when subsampled
            return training.multihead_loss(student, teacher, table, x0, labels, torch.Generator().manual_seed(seed),
                                           NUM_CLASSES, true_class_weight=0.0, distill_classes=distill_classes).item()

    full = np.array([loss(seed, None) for seed in range(150)])
    one_head = np.array([loss(seed, 1) for seed in range(150)])
    assert np.array_equal(full, [loss(seed, NUM_CLASSES) for seed in range(150)])
    assert not np.allclose(one_head, full)  # a different estimate per draw ...
    assert one_head.mean() == pytest.approx(full.mean(), rel=0.05)  # ... of the same loss


def head_gap(multihead, teacher, x_t, t_model):
    """Mean squared difference between the heads and the teacher's eps for every class."""
    with torch.no_grad():
        heads = models.multihead_outputs(multihead, x_t, t_model, NUM_CLASSES)
        targets = training.teacher_all_class_eps(teacher, x_t, t_model, NUM_CLASSES, 1)
    return ((heads - targets) ** 2).mean().item()


def test_multihead_finetuning_moves_the_heads_towards_the_teacher(dataset_dir, tmp_path):
    teacher = conditional_network(seed=4, dropout=0.0)
    with torch.no_grad():  # distinct classes: large label embeddings, so heads must move to match the teacher
        teacher.label_emb.weight.mul_(40.0)
    settings = models.diffusion_settings("linear", 100, null_class=3)
    path = models.save_model(tmp_path / "teacher.pt", teacher, kind="diffusion",
                             architecture={"family": "adm_unet", "config": models.adm_unet_config_of(teacher)},
                             diffusion=settings, extra={"training": {"label_dropout": 0.3}})
    loaded = training.finetune_diffusion(path, dataset_dir, tmp_path / "mh", variant="multihead", steps=25,
                                         batch_size=8, lr=2e-3, ema_decay=0.5, seed=0, log_every=5,
                                         true_class_weight=0.0)  # pure distillation: the random teacher's eps
                                                                 # are not the data's noise
    assert loaded.kind == "multihead_diffusion" and loaded.diffusion_settings["null_class"] is None
    assert loaded.extra["num_classes"] == NUM_CLASSES
    x_t = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t_model = torch.tensor([3.0, 10.0, 30.0, 50.0, 70.0, 95.0])
    initial, _ = training.multihead_from_conditional(teacher, NUM_CLASSES, fold_label=3)
    before, after = head_gap(initial, teacher, x_t, t_model), head_gap(loaded.network, teacher, x_t, t_model)
    assert before > 1e-4 and after < 0.2 * before
    eps = models.eps_model(loaded)(x_t, t_model, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert eps.shape == x_t.shape


def test_conditional_finetuning_continues_the_same_network(dataset_dir, tmp_path):
    base = training.train_diffusion(dataset_dir, tmp_path / "base", steps=4, **DIFFUSION)
    tuned = training.finetune_diffusion(tmp_path / "base" / "model.pt", dataset_dir, tmp_path / "ft",
                                        variant="conditional", steps=4, batch_size=8, lr=1e-3, ema_decay=0.5,
                                        seed=0, log_every=2)
    assert tuned.kind == "diffusion" and tuned.architecture == base.architecture
    assert tuned.diffusion_settings == base.diffusion_settings
    assert tuned.extra["training"]["label_dropout"] == 0.3  # inherited from the init model
    assert weights_differ(tuned.network, base.network)
    assert [step for step, _ in read_losses(tmp_path / "ft")] == [2, 4]
    with pytest.raises(ValueError, match="variant"):
        training.finetune_diffusion(base, dataset_dir, tmp_path / "x", variant="lora", steps=1, batch_size=8,
                                    lr=1e-3, ema_decay=0.5, seed=0)


# --- RDC's multi-head model distilled from EDM's conditional model (paper scale) --------------------------------------

LABEL_KEYS = {"model.map_label.weight", "model.map_label.bias"}
TINY_EDM = {"precond": "edm", "img_resolution": 8, "img_channels": 1, "label_dim": NUM_CLASSES, "model_channels": 8,
            "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def one_hot(classes, count):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), count).float()


def fixture_teacher(fixtures_dir):
    """The fixture's small EDMPrecond (16 px, 3 channels, 10 classes, augment_dim 9) with 40x class embeddings, its
    config, and its three inputs at sigma 0.02, 0.5 and 3."""
    from diffrobust.networks import edm

    small = torch.load(fixtures_dir / "architectures" / "edm_precond_songunet_small.pt", weights_only=True)
    config = {**small["config"], "precond": "edm"}
    network = edm.build_edm_vp_songunet(config)
    network.load_state_dict(small["state_dict"], strict=True)
    with torch.no_grad():
        network.model.map_label.weight.mul_(40.0)
    return network.eval().requires_grad_(False), config, small["x"], small["sigma"]


@pytest.mark.parametrize("decoder", ["standard", "skip"])
def test_edm_student_copies_the_teacher_and_repeats_its_output_layers(fixtures_dir, decoder):
    teacher, config, _, _ = fixture_teacher(fixtures_dir)
    if decoder == "skip":  # an output convolution at every level, summed: each must be repeated per head
        config = {**config, "decoder_type": "skip", "encoder_type": "residual"}
        teacher = class_distinct_edm(config, seed=1)
    student, architecture = training.edm_multihead_from_conditional(teacher, config)
    assert architecture["family"] == "edm_multihead_songunet" and architecture["config"]["heads"] == 10
    assert "label_dim" not in architecture["config"] and "precond" not in architecture["config"]
    source, target = teacher.state_dict(), student.state_dict()
    assert set(target) == set(source) - LABEL_KEYS
    repeated = sorted(key for key in target if target[key].shape != source[key].shape)
    levels = 2 if decoder == "skip" else 1  # of channel_mult [1, 2]; weight and bias each
    assert repeated == sorted(key for key in source if "_aux_conv." in key) and len(repeated) == 2 * levels
    for key in repeated:
        for head in range(10):
            assert torch.equal(target[key][3 * head:3 * head + 3], source[key]), key
    # the fold: + W0·e with e the mean of the ten class embeddings (map_label of sqrt(10)·one-hot, SongUNet's scaling)
    embeddings = teacher.model.map_label(one_hot(range(10), 10) * 10 ** 0.5)
    expected = source["model.map_layer0.bias"] + source["model.map_layer0.weight"] @ embeddings.mean(dim=0)
    torch.testing.assert_close(target["model.map_layer0.bias"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(target["model.map_layer0.bias"], source["model.map_layer0.bias"], atol=1e-3)
    for key in set(target) - set(repeated) - {"model.map_layer0.bias"}:
        assert torch.equal(target[key], source[key]), key


def test_every_edm_head_starts_at_the_teacher_with_the_mean_label(fixtures_dir):
    teacher, config, x, sigma = fixture_teacher(fixtures_dir)  # 3 images at sigma 0.02, 0.5, 3
    student, _ = training.edm_multihead_from_conditional(teacher, config)
    with torch.no_grad():
        heads = student(x, sigma)
        assert heads.shape == (3, 10, 3, 16, 16)
        mean_label = teacher(x, sigma, torch.full((3, 10), 0.1))
        assert (heads - mean_label[:, None]).abs().max().item() < 1e-5  # every head, to float rounding
        eps = student.noise_prediction(x, sigma)
        assert (eps - teacher.noise_prediction(x, sigma, torch.full((3, 10), 0.1))[:, None]).abs().max() < 1e-4
        for k in (0, 4, 9):  # a real class has its own embedding: the heads do not start at its output ...
            assert (heads[:, k] - teacher(x, sigma, one_hot([k] * 3, 10))).abs().max().item() > 1e-4
        # ... and the mean embedding is nearer (in mean square) to the class embeddings than the all-zero label's
        embeddings = teacher.model.map_label(one_hot(range(10), 10) * 10 ** 0.5)
        to_mean = (embeddings - embeddings.mean(dim=0)).square().sum(dim=1).mean()
        to_zero_label = (embeddings - teacher.model.map_label.bias).square().sum(dim=1).mean()
        assert to_mean < 0.99 * to_zero_label


def test_edm_distillation_refuses_teachers_it_cannot_distil():
    from diffrobust.networks import edm

    unconditional = edm.build_edm_vp_songunet({**TINY_EDM, "label_dim": 0})
    with pytest.raises(ValueError, match="class-conditional EDMPrecond"):
        training.edm_multihead_from_conditional(unconditional, {**TINY_EDM, "label_dim": 0})
    vp = edm.build_edm_vp_songunet({**TINY_EDM, "precond": "vp"})
    with pytest.raises(ValueError, match="class-conditional EDMPrecond"):
        training.edm_multihead_from_conditional(vp, {**TINY_EDM, "precond": "vp"})


def test_edm_sigma_draws_follow_edms_training_distribution_and_the_weight_is_lambda():
    x0 = torch.zeros(20000, 1, 1, 1)
    x_noisy, sigma = training.edm_noisy(x0, torch.Generator().manual_seed(0))
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03
    torch.testing.assert_close((x_noisy[:, 0, 0, 0] / sigma).std(), torch.tensor(1.0), atol=0.02, rtol=0)
    # lambda(sigma)·c_out² = 1: the weighted error of D is the error of the U-Net output
    s = torch.tensor([0.002, 0.3, 5.0])
    c_out = s * 0.5 / (s ** 2 + 0.25).sqrt()
    torch.testing.assert_close(training.edm_loss_weight(s, 0.5) * c_out ** 2, torch.ones(3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["edm_code", "edm_textbook"])
def test_the_dc_weighted_error_of_a_head_is_at_most_its_distillation_loss(weighting):
    """docs/fidelity.md: with F-space error e(sigma) = lambda·mean (D_student - D_teacher)², the DC's sum
    sum_i w_i·mean (D_student - D_teacher)² = sum_i w_i·c_out_i²·e_i is at most E[e] under the training draws
    (ln sigma ~ N(-1.2, 1.2²)): equal for the textbook density, at most for the code's (whose log-density is
    N(-1.2, 1/1.2²) over P_std², a ratio <= P_std² to the training one)."""
    from diffrobust.defenses import diffusion_classifier as dcm

    sigma, dt = dcm.edm_sigma_grid(1e-4, 3.0, 1001)
    w = dcm.WEIGHTINGS[weighting](sigma, dt, -1.2, 1.2, 0.5) / sigma ** 2
    c_out_squared = (sigma * 0.5) ** 2 / (sigma ** 2 + 0.25)
    u = torch.linspace(-15.0, 8.0, 400_001, dtype=torch.float64)  # ln sigma, for E[e] by quadrature
    density = torch.exp(-((u + 1.2) ** 2) / (2 * 1.2 ** 2)) / (1.2 * math.sqrt(2 * math.pi))
    errors = {"constant": lambda s: torch.ones_like(s), "small sigma": lambda s: 1 / s,
              "large sigma": lambda s: s ** 2, "only below 0.05": lambda s: (s < 0.05).double()}
    ratios = {}
    for name, e in errors.items():
        dc_weighted = (w * c_out_squared * e(sigma)).sum()
        expected_loss = torch.trapezoid(density * e(u.exp()), u)
        ratios[name] = (dc_weighted / expected_loss).item()
    assert all(ratio <= 1.0 + 1e-3 for ratio in ratios.values()), ratios
    if weighting == "edm_textbook":  # the same distribution, truncated to the grid [1e-4, 3]: Phi(1.916) = 0.972
        assert ratios["constant"] == pytest.approx(0.972, abs=2e-3)
    else:  # 1/P_std² = 0.694 times its mass inside the grid, Phi((ln 3 + 1.2)·1.2) = 0.997
        assert ratios["constant"] == pytest.approx(0.6924, abs=1e-3)


def distillation_loss(student, teacher, seeds=range(20)):
    """The pure distillation loss (every head against the teacher) on fixed inputs and draws."""
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    labels = torch.arange(8) % NUM_CLASSES
    with torch.no_grad():
        return np.mean([training.edm_multihead_loss(student.eval(), teacher, x0, labels,
                                                    torch.Generator().manual_seed(seed), true_class_weight=0.0).item()
                        for seed in seeds])


@pytest.fixture(scope="module")
def distilled(dataset_dir, tmp_path_factory):
    """(teacher, its model file, the distilled LoadedModel, its folder): 30 steps of EDM distillation."""
    root = tmp_path_factory.mktemp("edm_distillation")
    teacher = class_distinct_edm(TINY_EDM, seed=3)
    architecture = {"family": "edm_vp_songunet", "config": TINY_EDM}
    path = models.save_model(root / "teacher.pt", teacher, kind="diffusion", architecture=architecture,
                             diffusion=models.registry_diffusion_settings(architecture))
    loaded = training.finetune_diffusion(path, dataset_dir, root / "mh", variant="multihead", steps=30, batch_size=8,
                                         lr=2e-3, ema_decay=0.5, seed=0, log_every=10, true_class_weight=0.0)
    return teacher, path, loaded, root / "mh"


def test_a_few_distillation_steps_lower_the_distillation_loss(distilled):
    teacher, _, loaded, out_dir = distilled
    initial, _ = training.edm_multihead_from_conditional(teacher, TINY_EDM)
    before, after = distillation_loss(initial, teacher), distillation_loss(loaded.network, teacher)
    assert before > 1e-3 and after < 0.25 * before  # measured: 0.0080 -> 0.0010
    assert [step for step, _ in read_losses(out_dir)] == [10, 20, 30]
    assert sorted(p.name for p in out_dir.iterdir()) == ["loss.tsv", "model.pt"]
    training_config = loaded.extra["training"]
    assert training_config["recipe"] == "edm_distillation" and training_config["P_mean"] == -1.2
    assert training_config["init"] == training.network_digest(teacher)


def test_the_distilled_model_loads_as_a_multihead_edm_model_and_the_dc_picks_its_denoiser(distilled):
    from diffrobust.defenses import EDMMultiheadDenoiser, denoiser_for

    teacher, path, _, out_dir = distilled
    loaded = models.load_source(str(out_dir / "model.pt"))
    assert loaded.kind == "multihead_diffusion" and loaded.architecture["family"] == "edm_multihead_songunet"
    assert loaded.extra["num_classes"] == NUM_CLASSES and loaded.diffusion_settings["null_class"] is None
    assert loaded.diffusion_settings == {**models.load_model(path).diffusion_settings, "null_class": None}
    assert models.num_label_classes(loaded) == NUM_CLASSES and training.image_shape(loaded) == (1, 8, 8)
    denoiser = denoiser_for(loaded)
    assert isinstance(denoiser, EDMMultiheadDenoiser) and denoiser.num_classes == NUM_CLASSES
    assert denoiser.evaluations_per_input == 1
    with pytest.raises(ValueError, match="multi-head"):
        denoiser_for(loaded, unconditional=True)
    x_noisy = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0], dtype=torch.float64)
    eps = denoiser.eps_all_classes(x_noisy, sigma)
    torch.testing.assert_close(eps, loaded.network.noise_prediction(x_noisy, sigma.float()), rtol=0, atol=0)
    # on the chain (eps_model, all_class_eps): x_t = x / sqrt(1 + sigma²) at the level's sigma, one pass for all
    x_t, t_model = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([99.0, 499.0])
    per_class = models.all_class_eps(loaded, x_t, t_model)
    chain = models.eps_model(loaded)
    level_sigma = chain.sigma(t_model, x_t).float()
    expected = loaded.network.noise_prediction(x_t * (1 + level_sigma.view(-1, 1, 1, 1) ** 2).sqrt(), level_sigma)
    torch.testing.assert_close(per_class, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chain(x_t, t_model, torch.tensor([2, 0])), per_class[[0, 1], [2, 0]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        models.eps_model(loaded, unconditional=True)


def test_edm_distillation_refuses_label_dropout_and_a_class_count_mismatch(distilled, dataset_dir, tmp_path):
    _, path, _, _ = distilled
    with pytest.raises(ValueError, match="label_dropout"):
        training.finetune_diffusion(path, dataset_dir, tmp_path, variant="multihead", steps=1, batch_size=8, lr=1e-3,
                                    ema_decay=0.5, seed=0, label_dropout=0.1)
    other = class_distinct_edm({**TINY_EDM, "label_dim": 5})
    architecture = {"family": "edm_vp_songunet", "config": {**TINY_EDM, "label_dim": 5}}
    loaded = models.LoadedModel(other, "diffusion", architecture,
                                diffusion_settings=models.registry_diffusion_settings(architecture))
    with pytest.raises(ValueError, match="5 classes"):
        training.finetune_diffusion(loaded, dataset_dir, tmp_path, variant="multihead", steps=1, batch_size=8,
                                    lr=1e-3, ema_decay=0.5, seed=0)


# --- classifier -----------------------------------------------------------------------------------------------------

def test_augmentations_move_digits_within_their_limits():
    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 5:7, 5:7] = 1.0  # a 2x2 blob centred at (5.5, 5.5)
    generator = torch.Generator().manual_seed(0)
    shifted = training.random_shift(x, 2, generator)
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # integer shifts keep every pixel
    same = training.random_affine(x, 0, 0.0, 0.0, generator)
    assert torch.allclose(same, x, atol=1e-5)
    moved = training.random_affine(x, 2, 0.0, 0.0, generator)
    rows = torch.arange(12.0).view(1, 12, 1)
    centre = (moved[:, 0] * rows).sum(dim=(1, 2)) / moved[:, 0].sum(dim=(1, 2))
    assert (centre - 5.5).abs().max() <= 2.0 + 1e-4 and (centre - 5.5).abs().max() > 1.0
    assert torch.allclose(moved.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), atol=1e-4)  # blob stays inside
    with pytest.raises(ValueError, match="augment"):
        training.train_classifier("unused", "unused", augment="mixup", epochs=1, **{
            k: v for k, v in CLASSIFIER.items() if k != "augment"})


def test_classifier_learns_far_above_chance(dataset_dir, tmp_path):
    loaded = training.train_classifier(dataset_dir, tmp_path, epochs=8, **CLASSIFIER)
    metrics = (tmp_path / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.tsv", "metrics.json", "model.pt"]
    test = data.load_dataset(dataset_dir)["test"]
    accuracy = training.accuracy(models.classifier(loaded), test.images, test.labels)
    assert accuracy >= 0.9  # chance is 1/3
    assert f'"test_accuracy": {accuracy}' in metrics
    assert loaded.extra["metrics"]["steps"] == 24  # ceil(8 epochs x 48 images / 16)


def test_classifier_resumes_and_ignores_a_resume_file_of_another_config(dataset_dir, tmp_path, caplog):
    whole = training.train_classifier(dataset_dir, tmp_path / "whole", epochs=2, checkpoint_every=2, **CLASSIFIER)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # killed with another learning rate
        training.train_classifier(dataset_dir, out, epochs=2, checkpoint_every=2, on_step=interrupt_at(3),
                                  **{**CLASSIFIER, "lr": 0.05})
    assert torch.load(out / training.RESUME_FILE, weights_only=True)["step"] == 2
    with pytest.raises(Interrupted), caplog.at_level("WARNING", logger="diffrobust"):
        # this run must start afresh rather than resume the lr=0.05 state, and say why
        training.train_classifier(dataset_dir, out, epochs=2, checkpoint_every=2, on_step=interrupt_at(5),
                                  **CLASSIFIER)
    assert f"lr: 0.05 -> {CLASSIFIER['lr']}" in caplog.text
    resumed = training.train_classifier(dataset_dir, out, epochs=2, checkpoint_every=2, **CLASSIFIER)
    assert_same_weights(resumed.network, whole.network)  # batch-norm statistics and momentum included
    assert read_losses(out) == read_losses(tmp_path / "whole")


# --- samples --------------------------------------------------------------------------------------------------------

def test_class_conditional_samples_are_deterministic_images(dataset_dir, tmp_path):
    loaded = training.train_diffusion(dataset_dir, tmp_path, steps=4, **DIFFUSION)
    classes = torch.tensor([0, 1, 2, 0])
    first = training.sample_class_conditional(loaded, classes, 5, 0.0, torch.Generator().manual_seed(0))
    again = training.sample_class_conditional(loaded, classes, 5, 0.0, torch.Generator().manual_seed(0))
    guided = training.sample_class_conditional(loaded, classes, 5, 2.0, torch.Generator().manual_seed(0))
    assert first.shape == (4, 1, 8, 8) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, guided)
    path = training.save_image_grid(tmp_path / "grid.png", first, nrow=2)
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (2 * 10 + 2, 2 * 10 + 2)


def test_image_grid_places_images_row_by_row():
    images = torch.stack([torch.full((1, 2, 2), value) for value in (0.2, 0.6, 1.0)])
    grid = training.image_grid(images, nrow=2)
    assert grid.shape == (10, 10, 1)
    assert grid[2, 2, 0] == 51 and grid[2, 6, 0] == 153 and grid[6, 2, 0] == 255
    assert grid[6, 6, 0] == 0 and grid[0, 0, 0] == 0  # empty slot and gaps stay black


def test_a_resume_file_of_another_code_version_is_not_continued(dataset_dir, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        training.train_classifier(dataset_dir, out, epochs=1, checkpoint_every=2, on_step=interrupt_at(3),
                                  **CLASSIFIER)
    assert torch.load(out / training.RESUME_FILE, weights_only=True)["step"] == 2
    monkeypatch.setattr(training, "TRAINING_VERSION", training.TRAINING_VERSION + 1)
    steps = []
    with caplog.at_level("WARNING", logger="diffrobust"):
        training.train_classifier(dataset_dir, out, epochs=1, checkpoint_every=2, on_step=steps.append, **CLASSIFIER)
    assert steps[0] == 1  # started from step 0, not from the stored step 2
    assert f"code_version: {training.TRAINING_VERSION - 1} -> {training.TRAINING_VERSION}" in caplog.text


def test_v_prediction_trains_on_v_and_every_method_gets_eps(dataset_dir, tmp_path):
    # the target: v = sqrt(a)·eps - sqrt(1 - a)·x0, and the adapter turns the true v back into the true eps
    settings = models.diffusion_settings("linear", 100, null_class=3, prediction="v")
    table = training.NoiseTable(models.build_diffusion(settings))
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_t, noise, t_model = table.noisy(x0, torch.Generator().manual_seed(1))
    v = training.prediction_target(table, x0, noise, t_model, "v")
    oracle = models.VPredictionEps(lambda x, t, y=None: v, models.build_diffusion(settings))
    assert torch.allclose(oracle(x_t, t_model), noise, atol=1e-5)
    # a trained v model stores the setting; eps_model, guidance and the multi-head heads all return eps
    loaded = training.train_diffusion(dataset_dir, tmp_path / "v", steps=6, prediction="v", **DIFFUSION)
    assert loaded.diffusion_settings["prediction"] == "v"
    assert "prediction" not in models.diffusion_settings("linear", 100)  # eps models' files and identities unchanged
    t = torch.full((16,), 99.0)  # near T an eps(v) model is the identity up to sqrt(alpha_bar_T)·v
    raw = loaded.network(x_t, t, y=torch.zeros(16, dtype=torch.long))
    eps = models.eps_model(loaded)(x_t, t, torch.zeros(16, dtype=torch.long))
    a = float(table.sqrt_alpha_bar[99]) ** 2
    assert torch.allclose(eps, a ** 0.5 * raw + (1 - a) ** 0.5 * x_t, atol=1e-5)
    assert models.eps_model(loaded, guidance_scale=1.0)(x_t, t, torch.zeros(16, dtype=torch.long)).shape == x_t.shape
    heads = training.finetune_diffusion(loaded, dataset_dir, tmp_path / "mh", variant="multihead", steps=2,
                                        batch_size=8, lr=1e-3, ema_decay=0.5, seed=0, log_every=1)
    assert heads.diffusion_settings["prediction"] == "v"
    per_class = models.all_class_eps(heads, x_t, t)
    assert per_class.shape == (16, NUM_CLASSES, 1, 8, 8)
    raw_heads = models.multihead_outputs(heads.network, x_t, t, NUM_CLASSES)
    assert torch.allclose(per_class, a ** 0.5 * raw_heads + (1 - a) ** 0.5 * x_t[:, None], atol=1e-5)


# --- devices --------------------------------------------------------------------------------------------------------

# Weights of a tiny run of every job (model files' state dicts, `training.network_digest`), one thread, as the code
# before device support made them (commit ecee343, 2026-12-01). The device-aware code must give the same bits on
# the CPU: the draws still come from CPU generators and every move to the device is a no-op there. Float rounding
# differs between CPUs and torch builds (README, "Variance across machines"), so the digests are checked only on
# the machine type they were computed on.
REFERENCE_MACHINE = {"torch": "2.15.0+cu132", "cpu_capability": "AVX512", "cpu": "Intel(R) Xeon(R) Processor"}
REFERENCE_DIGESTS = {
    "diffusion": "6b046c8514b0488dd9682127f2bec9e9a9946d498bff6c22403aa9a9b29a18ef",
    "diffusion_v": "5770813c831c6dce11118cef26d948320c5622ca4afb1aef45b1bab81b5c0a50",
    "finetune_conditional": "34840d6fddabae5b7c7e56209052b231db58efa5027f6971b3d06d5d3360eb5c",
    "finetune_multihead": "6eee5118a73d10269d81d1aee69551e98045409cb95be8c0f1d1db0913207dc1",
    "classifier_shift": "f8c01df151e5700980cf12e326c18e383bda3c6247cbab8cef4543febccce36c",
    "classifier_affine": "95bdc6cb3e465d56b7ce6e099f9e000199f87b4d39601b8fc1ce6a413b7dd33c",
}


def this_machine():
    import platform

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": model}


def tiny_runs(dataset_dir, root, **device):
    """Models of every job (both diffusion objectives, both fine-tunes, both augmentations), a few steps each."""
    runs = {"diffusion": training.train_diffusion(dataset_dir, root / "diffusion", steps=4, **DIFFUSION, **device),
            "diffusion_v": training.train_diffusion(dataset_dir, root / "v", steps=3,
                                                    **{**DIFFUSION, "prediction": "v"}, **device)}
    for variant, extra in (("conditional", {}), ("multihead", {"distill_classes": 2})):
        runs[f"finetune_{variant}"] = training.finetune_diffusion(
            root / "diffusion" / "model.pt", dataset_dir, root / variant, variant=variant, steps=3, batch_size=8,
            lr=1e-3, ema_decay=0.5, seed=0, log_every=1, **extra, **device)
    for augment in ("shift", "affine"):
        runs[f"classifier_{augment}"] = training.train_classifier(dataset_dir, root / augment, epochs=1,
                                                                  **{**CLASSIFIER, "augment": augment}, **device)
    return runs


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_on_the_cpu_gives_the_weights_of_the_code_before_device_support(dataset_dir, tmp_path, one_thread):
    if this_machine() != REFERENCE_MACHINE:
        pytest.skip(f"reference digests are of {REFERENCE_MACHINE}; this machine is {this_machine()}")
    runs = tiny_runs(dataset_dir, tmp_path, device="cpu")
    assert {name: training.network_digest(loaded.network) for name, loaded in runs.items()} == REFERENCE_DIGESTS
    for loaded in runs.values():
        assert loaded.extra["device"]["device"] == "cpu" and loaded.extra["device"]["precision"] == "fp32"


def test_model_files_hold_cpu_tensors_and_the_run_says_where_they_were_trained(dataset_dir, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = training.train_classifier(dataset_dir, tmp_path, epochs=0.5, device=device, **CLASSIFIER)
    record = torch.load(tmp_path / training.MODEL_FILE, weights_only=True)  # no map_location: as stored
    assert {value.device.type for value in record["state_dict"].values()} == {"cpu"}
    # the device is the run's, not the weights': in the returned model (the run record) and metrics.json only
    assert "device" not in record["extra"] and "seconds" not in record["extra"]["metrics"]
    assert loaded.extra["device"]["device"].startswith(device) and loaded.extra["device"]["torch"]
    assert json.loads((tmp_path / training.METRICS_FILE).read_text())["device"] == loaded.extra["device"]
    assert training.module_device(loaded.network).type == "cpu"  # the returned model is on the CPU too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_is_deterministic_and_uses_the_cpu_draws(dataset_dir, tmp_path):
    first = tiny_runs(dataset_dir, tmp_path / "first", device="cuda")
    again = tiny_runs(dataset_dir, tmp_path / "again", device="cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    for name in first:
        assert_same_weights(first[name].network, again[name].network)
        assert first[name].extra["device"]["device"] == "cuda:0" and "gpu" in first[name].extra["device"]
    # the draws are the CPU's: a training pair made on the GPU from a CPU generator equals the CPU's up to rounding
    table = training.NoiseTable(models.build_diffusion(models.diffusion_settings("linear", 100)))
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    on_cpu = table.noisy(x0, torch.Generator().manual_seed(1))
    on_gpu = table.noisy(x0.cuda(), torch.Generator().manual_seed(1))
    for cpu_value, gpu_value in zip(on_cpu, on_gpu):
        assert gpu_value.device.type == "cuda" and torch.allclose(cpu_value, gpu_value.cpu(), atol=1e-6)


def test_training_commands_take_the_device_and_record_it(dataset_dir, tmp_path, capsys):
    import json

    from diffrobust import cli

    settings = json.dumps({"architecture": CLASSIFIER["architecture"], "training": {
        key: value for key, value in CLASSIFIER.items() if key not in ("architecture", "seed")} | {"epochs": 0.5}})
    command = ["train-classifier", "--dataset-dir", str(dataset_dir), "--out-dir", str(tmp_path / "model"),
               "--settings", settings, "--run-record", str(tmp_path / "run.json")]
    assert cli.main([*command, "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["device"]["device"] == "cpu" and record["device"]["torch"] == torch.__version__
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    (tmp_path / "run.json").unlink()
    assert cli.main([*command[:4], str(tmp_path / "none"), *command[5:], "--device", missing]) == 1
    error = capsys.readouterr().err
    assert "train-classifier: error: device = " in error and "Traceback" not in error
    assert not (tmp_path / "none").exists() and not (tmp_path / "run.json").exists()
