"""NVlabs/edm EDMPrecond(SongUNet) and VPPrecond(SongUNet): state-dict layout of the published CIFAR-10 models (which
are EDMPrecond), numerical agreement with the official code on small networks of both wrappers, the preconditioning
formulas, the restricted reader of EDM's pickles and the registry loader's check of the wrapper class they name."""

import builtins
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from helpers import randomize
from torch import nn
from torch.nn import functional as F

from diffrobust.networks import build_network
from diffrobust import models
from diffrobust.config import ConfigError, load_checkpoint_registry
from diffrobust.errors import DiffrobustError
from diffrobust.networks import edm


def manifest(fixtures_dir, name):
    return json.loads((fixtures_dir / "architectures" / f"{name}.json").read_text())


def registry_entry(repo_root, name):
    return yaml.safe_load((repo_root / "config" / "checkpoints.yaml").read_text())[name]


def layout(module):
    return [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in module.state_dict().items()]


@pytest.fixture(scope="module")
def small(fixtures_dir):
    """The fixture's small VPPrecond(SongUNet): random N(0, 0.05) weights and the official network's output."""
    return torch.load(fixtures_dir / "architectures" / "edm_vp_songunet_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def small_edm(fixtures_dir):
    """The fixture's small EDMPrecond(SongUNet) (augment_dim 9): random N(0, 0.05) weights, the official output."""
    return torch.load(fixtures_dir / "architectures" / "edm_precond_songunet_small.pt", weights_only=True)


def vp_config(small):
    """The VPPrecond fixture's constructor kwargs as a registry config (precond: vp)."""
    return {**small["config"], "precond": "vp"}


def edm_config(small_edm):
    return {**small_edm["config"], "precond": "edm"}


def small_network(small):
    net = edm.build_edm_vp_songunet(vp_config(small))
    net.load_state_dict(small["state_dict"], strict=True)
    return net.eval()


def small_edm_network(small_edm):
    net = edm.build_edm_vp_songunet(edm_config(small_edm))
    net.load_state_dict(small_edm["state_dict"], strict=True)
    return net.eval()


# --- the published CIFAR-10 networks -------------------------------------------------------------------------------

def test_cond_vp_registry_network_has_the_official_state_dict_layout(fixtures_dir, repo_root):
    expected = manifest(fixtures_dir, "edm_cifar10_cond_vp_ddpmpp")
    entry = registry_entry(repo_root, "edm_cifar10_cond_vp")
    config = dict(entry["architecture"]["config"])
    # The released file was trained with train.py's default --precond=edm; the manifest was made with VPPrecond,
    # whose keys and shapes are the same (tests/fixtures/README.md), so everything else must equal its config.
    assert config.pop("precond") == "edm"
    assert config == expected["config"]
    with torch.device("meta"):
        net = build_network(entry["architecture"])
    assert isinstance(net, edm.EDMPrecond)
    assert layout(net) == expected["state_dict"]  # keys, order, shapes, dtypes
    assert sum(p.numel() for p in net.parameters()) == expected["num_params"] == 55_734_147


def test_uncond_vp_registry_network_is_the_cond_one_without_label_mapping(fixtures_dir, repo_root):
    expected = manifest(fixtures_dir, "edm_cifar10_cond_vp_ddpmpp")
    entry = registry_entry(repo_root, "edm_cifar10_uncond_vp")
    assert entry["architecture"]["config"]["precond"] == "edm"
    with torch.device("meta"):
        net = build_network(entry["architecture"])
    assert isinstance(net, edm.EDMPrecond)
    without_labels = [row for row in expected["state_dict"] if not row[0].startswith("model.map_label.")]
    assert layout(net) == without_labels
    # map_label is a 10 -> 128 linear layer: 1280 weights + 128 biases.
    assert sum(p.numel() for p in net.parameters()) == 55_734_147 - 1408


# --- numerical agreement with the official code --------------------------------------------------------------------

def test_small_network_reproduces_the_official_denoiser_output(small):
    net = small_network(small)
    with torch.no_grad():
        out = net(small["x"], small["sigma"], small["class_labels"])
    assert out.shape == small["out"].shape == (2, 3, 32, 32)
    assert (out - small["out"]).abs().max().item() < 1e-5
    # The reference is far from trivial: the denoiser changes its input by much more than the tolerance.
    assert (small["out"] - small["x"]).abs().max().item() > 0.1


def test_small_edm_precond_network_reproduces_the_official_denoiser_output(small_edm):
    # The wrapper of the released edm-cifar10-32x32-*-vp.pkl, with the augmentation map train.py adds (augment_dim 9).
    assert small_edm["precond"] == "EDMPrecond" and small_edm["config"]["augment_dim"] == 9
    net = edm.build_edm_vp_songunet(edm_config(small_edm))
    assert isinstance(net, edm.EDMPrecond) and net.precond == "edm" and net.sigma_data == 0.5
    assert net.model.map_augment is not None
    net.load_state_dict(small_edm["state_dict"], strict=True)
    args = (small_edm["x"], small_edm["sigma"], small_edm["class_labels"])
    with torch.no_grad():
        out = net.eval()(*args)
    assert out.shape == small_edm["out"].shape == (3, 3, 16, 16)
    assert (out - small_edm["out"]).abs().max().item() < 1e-5
    assert (small_edm["out"] - small_edm["x"]).abs().max().item() > 0.1

    # VPPrecond takes the same weights strictly (identical keys) and is another denoiser: why `precond` exists.
    vp = edm.build_edm_vp_songunet({**small_edm["config"], "precond": "vp"})
    vp.load_state_dict(small_edm["state_dict"], strict=True)
    with torch.no_grad():
        assert (vp.eval()(*args) - small_edm["out"]).abs().max().item() > 0.1


def test_precond_defaults_to_train_py_default_edm(small_edm, small):
    assert isinstance(edm.build_edm_vp_songunet(small_edm["config"]), edm.EDMPrecond)  # no precond key: --precond=edm
    assert isinstance(edm.build_edm_vp_songunet(vp_config(small)), edm.VPPrecond)
    assert edm.precond_of_class("EDMPrecond") == "edm" and edm.precond_of_class("training.networks.VPPrecond") == "vp"
    assert edm.precond_of_class("VEPrecond") is None and edm.precond_of_class("Unrelated") is None


@pytest.mark.parametrize("which", ["edm", "vp"])
def test_noise_prediction_is_the_noise_of_the_official_denoiser(which, small, small_edm):
    reference = small_edm if which == "edm" else small
    net = small_edm_network(small_edm) if which == "edm" else small_network(small)
    x, sigma, labels = reference["x"], reference["sigma"], reference["class_labels"]
    with torch.no_grad():
        eps = net.noise_prediction(x, sigma, labels)
    s = sigma.reshape(-1, 1, 1, 1).double()
    expected = (x.double() - reference["out"].double()) / s  # eps = (x - D(x; sigma)) / sigma
    # `out` matches to 1e-5, which dividing by sigma enlarges; eps itself is O(1)
    assert ((eps.double() - expected).abs() <= 2e-5 / s).all()
    assert expected.abs().max().item() > 0.05  # at least 50x that tolerance: the comparison is not vacuous


def test_class_labels_change_the_output_and_none_means_zero_labels(small):
    net = small_network(small)
    x, sigma = small["x"], small["sigma"]
    with torch.no_grad():
        other = net(x, sigma, small["class_labels"].roll(1, dims=1))
        no_labels = net(x, sigma)
        zero_labels = net(x, sigma, torch.zeros_like(small["class_labels"]))
    assert (other - small["out"]).abs().max().item() > 1e-4  # 10x the tolerance of the reference comparison
    torch.testing.assert_close(no_labels, zero_labels, rtol=0, atol=1e-6)


def test_dropout_acts_only_in_training_mode(small):
    config = dict(vp_config(small), dropout=0.5)
    net = edm.build_edm_vp_songunet(config)
    net.load_state_dict(small["state_dict"], strict=True)
    args = (small["x"], small["sigma"], small["class_labels"])
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(*args), small["out"], rtol=0, atol=1e-5)
        net.train()
        torch.manual_seed(0)
        assert (net(*args) - small["out"]).abs().max().item() > 1e-4


# --- preconditioning ----------------------------------------------------------------------------------------------

class RecordingUNet(nn.Module):
    """Replaces the U-Net to observe what the wrapper feeds it; returns a known function of its inputs."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen_x, self.seen_noise = x.clone(), noise_labels.clone()
        return 0.5 * x + noise_labels.reshape(-1, 1, 1, 1)


def test_vp_schedule_and_its_inverse():
    net = edm.VPPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[])

    def vp_sigma(t):  # Song et al.'s VP SDE with beta(t) = 0.1 + 19.9 t, as a noise level
        return math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1)

    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma(t), torch.tensor([vp_sigma(v) for v in t.tolist()], dtype=torch.float64))
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)
    assert net.sigma_max == pytest.approx(vp_sigma(1.0), rel=1e-6) and 152.0 < net.sigma_max < 152.3
    # EDM evaluates sigma(epsilon_t) in float32, where exp(1e-6) - 1 rounds to 2^-20: sigma_min is 2^-10, not 1.0005e-3.
    assert net.sigma_min == 2.0 ** -10 and vp_sigma(1e-5) == pytest.approx(1.0005e-3, rel=1e-4)


def test_vp_preconditioning_coefficients():
    net = edm.VPPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[])
    net.model = RecordingUNet()
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.3, 4.0])
    out = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(1 + s ** 2)
    t = ((0.1 ** 2 + 2 * 19.9 * torch.log(1 + sigma ** 2)).sqrt() - 0.1) / 19.9
    torch.testing.assert_close(net.model.seen_x, c_in * x)
    torch.testing.assert_close(net.model.seen_noise, 999 * t)
    # VP: the network predicts the noise; D = x - sigma * F.
    torch.testing.assert_close(out, x - s * (0.5 * c_in * x + 999 * t.reshape(-1, 1, 1, 1)))
    torch.testing.assert_close(net.noise_prediction(x, sigma), 0.5 * c_in * x + 999 * t.reshape(-1, 1, 1, 1))


def test_edm_preconditioning_coefficients():
    net = edm.EDMPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                         attn_resolutions=[])
    assert net.sigma_data == 0.5
    net.model = RecordingUNet()
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.02, 3.0])
    out = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    # Karras et al. (2022), Table 1, with sigma_data = 0.5.
    c_skip = 0.25 / (s ** 2 + 0.25)
    c_out = s * 0.5 / torch.sqrt(s ** 2 + 0.25)
    c_in = 1 / torch.sqrt(s ** 2 + 0.25)
    c_noise = torch.log(sigma) / 4
    torch.testing.assert_close(net.model.seen_x, c_in * x)
    torch.testing.assert_close(net.model.seen_noise, c_noise)
    torch.testing.assert_close(out, c_skip * x + c_out * (0.5 * c_in * x + c_noise.reshape(-1, 1, 1, 1)))
    # The noise estimate, in closed form, is (x - D) / sigma.
    torch.testing.assert_close(net.noise_prediction(x, sigma), (x - out) / s, rtol=1e-5, atol=1e-5)


# --- layers and variants ------------------------------------------------------------------------------------------

def test_two_tap_resampling_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 4, 8, 8)
    down = edm.Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 1])
    up = edm.Conv2d(4, 4, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert down.state_dict()["resample_filter"].tolist() == [[[[0.25, 0.25], [0.25, 0.25]]]]


def test_attention_is_scaled_dot_product_attention():
    # The small fixture's random weights give near-uniform attention, which hides the 1/sqrt(c) scale; check it
    # against torch's own attention on large logits. Layout: (batch*heads, channels, positions).
    torch.manual_seed(0)
    q, k, v = (3 * torch.randn(2, 8, 16) for _ in range(3))
    ours = torch.einsum("nqk,nck->ncq", edm.attention_weights(q, k), v)
    reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(ours, reference.transpose(1, 2))


def test_ncsnpp_variant_builds_with_fourier_embedding_and_residual_encoder():
    config = dict(img_resolution=16, img_channels=3, label_dim=0, embedding_type="fourier", encoder_type="residual",
                  decoder_type="skip", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    net = edm.build_edm_vp_songunet(config).eval()
    shapes = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    assert shapes["model.map_noise.freqs"] == (16,)  # noise_channels / 2 = 16 * 2 / 2
    assert shapes["model.map_layer0.weight"] == (64, 32)
    assert shapes["model.enc.8x8_aux_residual.weight"] == (16, 3, 3, 3)  # from the image to the 16-channel path
    assert shapes["model.enc.8x8_aux_residual.resample_filter"] == (1, 1, 4, 4)
    assert shapes["model.dec.16x16_aux_up.resample_filter"] == (1, 1, 4, 4)
    assert "model.dec.8x8_aux_conv.weight" in shapes and "model.dec.16x16_aux_conv.weight" in shapes
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_builder_rejects_unknown_keys_and_other_model_types():
    base = dict(img_resolution=32, img_channels=3)
    with pytest.raises(ValueError, match="unknown edm_vp_songunet config keys for precond 'edm': num_res_blocks"):
        edm.build_edm_vp_songunet(dict(base, num_res_blocks=2))
    with pytest.raises(ValueError, match="DhariwalUNet"):
        edm.build_edm_vp_songunet(dict(base, model_type="DhariwalUNet"))
    with pytest.raises(ValueError, match="img_channels"):
        edm.build_edm_vp_songunet(dict(img_resolution=32))
    with pytest.raises(ValueError, match="'precond' must be one of edm, vp.*got 've'"):
        edm.build_edm_vp_songunet(dict(base, precond="ve"))
    # each wrapper takes its own keys: the VP schedule is not EDMPrecond's, sigma_data not VPPrecond's
    with pytest.raises(ValueError, match="for precond 'edm': beta_d"):
        edm.build_edm_vp_songunet(dict(base, precond="edm", beta_d=19.9))
    with pytest.raises(ValueError, match="for precond 'vp': sigma_data"):
        edm.build_edm_vp_songunet(dict(base, precond="vp", sigma_data=0.5))
    assert edm.build_edm_vp_songunet(dict(base, precond="edm", sigma_data=0.25, model_channels=16,
                                          channel_mult=[1], num_blocks=1)).sigma_data == 0.25


# --- the multi-head wrapper (this project's, for RDC's multi-head classifier) ----------------------------------------

MULTIHEAD = dict(img_resolution=8, img_channels=2, model_channels=8, channel_mult=[1, 1], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)


def test_each_head_of_the_multihead_wrapper_is_edm_precond_of_its_output_channels():
    """Head k = EDMPrecond (no labels) whose U-Net output conv is channels 2k..2k+1 of the multi-head one."""
    multihead = randomize(edm.build_edm_multihead_songunet(dict(MULTIHEAD, heads=3)), 0, scale=0.2).eval()
    assert multihead.model.dec["8x8_aux_conv"].weight.shape[0] == 6 and multihead.label_dim == 0
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 2.5])
    with torch.no_grad():
        denoised, eps = multihead(x, sigma), multihead.noise_prediction(x, sigma)
        assert denoised.shape == eps.shape == (2, 3, 2, 8, 8)
        for k in range(3):
            single = edm.build_edm_vp_songunet(dict(MULTIHEAD, precond="edm")).eval()
            weights = dict(multihead.state_dict())
            for name in ("model.dec.8x8_aux_conv.weight", "model.dec.8x8_aux_conv.bias"):
                weights[name] = weights[name][2 * k:2 * k + 2]
            single.load_state_dict(weights, strict=True)
            torch.testing.assert_close(denoised[:, k], single(x, sigma), rtol=0, atol=0)
            torch.testing.assert_close(eps[:, k], single.noise_prediction(x, sigma), rtol=0, atol=0)
        torch.testing.assert_close(eps, (x[:, None] - denoised) / sigma.view(-1, 1, 1, 1, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no label input"):
        multihead(x, sigma, torch.eye(3)[:2])


def test_multihead_builder_needs_heads_and_refuses_a_label_input():
    with pytest.raises(ValueError, match="'heads' must be a positive integer"):
        edm.build_edm_multihead_songunet(MULTIHEAD)
    with pytest.raises(ValueError, match="unknown edm_multihead_songunet config keys: label_dim"):
        edm.build_edm_multihead_songunet(dict(MULTIHEAD, heads=3, label_dim=3))
    with pytest.raises(ValueError, match="unknown edm_multihead_songunet config keys: precond"):
        edm.build_edm_multihead_songunet(dict(MULTIHEAD, heads=3, precond="edm"))
    network = models.build_architecture({"family": "edm_multihead_songunet", "config": dict(MULTIHEAD, heads=4)})
    assert isinstance(network, edm.MultiheadEDMPrecond) and network.heads == 4 and network.precond == "edm"
    assert models.FAMILIES["edm_multihead_songunet"].kind == "multihead_diffusion"


# --- reading EDM's pickles ----------------------------------------------------------------------------------------
# A stand-in for the real `.pkl` (which cannot be downloaded here), written the way torch_utils.persistence writes:
# every instance of an EDM class becomes torch_utils.persistence._reconstruct_persistent_obj(meta), with meta
# holding the class's module source, the class name and the instance __dict__ (plus _init_args/_init_kwargs);
# torch.nn.ModuleDict and tensors are pickled by torch as usual; numpy floats appear in _init_kwargs.

EMBEDDED_SOURCE = "import builtins\nbuiltins.EDM_EMBEDDED_SOURCE_WAS_EXECUTED = True\n"


class VPLoss:
    """Like EDM's persistent loss object, which the snapshot stores next to the network."""

    def __init__(self):
        self.beta_d, self.beta_min, self.epsilon_t = 19.9, 0.1, 1e-5


class AugmentPipe:
    def __init__(self):
        self.p, self.xflip, self.yflip = 0.12, 1e8, 1


class PersistencePickler(pickle.Pickler):
    def __init__(self, file, reconstruct, network_init_kwargs, protocol, wrapper_class_name=None):
        super().__init__(file, protocol=protocol)
        self.reconstruct = reconstruct
        self.network_init_kwargs = network_init_kwargs
        self.wrapper_class_name = wrapper_class_name

    def reducer_override(self, obj):
        persistent = isinstance(obj, (VPLoss, AugmentPipe)) or (
            isinstance(obj, nn.Module) and type(obj).__module__ == edm.__name__)
        if not persistent:
            return NotImplemented
        state = dict(obj.__dict__)
        if isinstance(obj, edm._Preconditioned):
            state["_init_kwargs"] = dict(self.network_init_kwargs)
        elif isinstance(obj, edm.UNetBlock):
            state["_init_kwargs"] = dict(skip_scale=np.sqrt(0.5), eps=1e-6)
        else:
            state["_init_kwargs"] = {}
        state["_init_args"] = ()
        class_name = type(obj).__name__
        if isinstance(obj, edm._Preconditioned) and self.wrapper_class_name:
            class_name = self.wrapper_class_name
        meta = dict(type="class", version=6, module_src=EMBEDDED_SOURCE, class_name=class_name, state=state)
        return self.reconstruct, (meta,)


def write_edm_like_pickle(path, network, init_kwargs, protocol=4, extra=None, wrapper_class_name=None):
    """Pickle {ema, loss_fn, augment_pipe, dataset_kwargs} as EDM's training loop does, with the function
    reference torch_utils.persistence._reconstruct_persistent_obj resolvable only while writing.
    wrapper_class_name: the class name recorded for the network (default: its own, e.g. EDMPrecond)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called: the reader must not import torch_utils")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    data = dict(ema=network, loss_fn=VPLoss(), augment_pipe=AugmentPipe(),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                    use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000))
    data.update(extra or {})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch_utils", package)
        patch.setitem(sys.modules, "torch_utils.persistence", persistence)
        with open(path, "wb") as f:
            PersistencePickler(f, _reconstruct_persistent_obj, init_kwargs, protocol,
                               wrapper_class_name).dump(data)
    assert "torch_utils" not in sys.modules


@pytest.mark.parametrize("protocol", [2, 4])
def test_edm_like_pickle_loads_without_running_its_embedded_source(tmp_path, small, protocol):
    network = small_network(small).requires_grad_(False)  # EDM pickles eval(), requires_grad_(False) copies
    path = tmp_path / "network-snapshot.pkl"
    write_edm_like_pickle(path, network, vp_config(small), protocol=protocol)
    raw = path.read_bytes()
    assert b"_reconstruct_persistent_obj" in raw and b"EDM_EMBEDDED_SOURCE_WAS_EXECUTED" in raw

    contents = edm.read_edm_network_pickle(path)
    assert not hasattr(builtins, "EDM_EMBEDDED_SOURCE_WAS_EXECUTED")
    assert contents.class_name == "VPPrecond"
    assert contents.init_kwargs == vp_config(small)

    state_dict = edm.load_edm_pickle_state_dict(path)
    assert list(state_dict) == list(network.state_dict())  # `model.`-prefixed, in VPPrecond's order
    for key, value in network.state_dict().items():
        assert torch.equal(state_dict[key], value), key

    fresh = edm.build_edm_vp_songunet(vp_config(small))
    fresh.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        out = fresh.eval()(small["x"], small["sigma"], small["class_labels"])
    assert (out - small["out"]).abs().max().item() < 1e-5


def test_pickle_reader_refuses_other_globals_without_calling_them(tmp_path):
    class Exploit:
        def __reduce__(self):
            return eval, ("__import__('builtins').__setattr__('EDM_EXPLOIT_RAN', True)",)

    path = tmp_path / "exploit.pkl"
    path.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(edm.EDMPickleError, match=r"refusing to load global builtins\.eval"):
        edm.load_edm_pickle_state_dict(path)
    assert not hasattr(builtins, "EDM_EXPLOIT_RAN")


def test_pickle_reader_explains_files_that_are_not_network_snapshots(tmp_path, small):
    no_ema = tmp_path / "no_ema.pkl"
    no_ema.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(edm.EDMPickleError, match="expected a dict with key 'ema'.*found \\['net'\\]"):
        edm.load_edm_pickle_state_dict(no_ema)

    torch_file = tmp_path / "weights.pt"
    torch.save(small["state_dict"], torch_file)
    with pytest.raises(edm.EDMPickleError, match="not a readable EDM network pickle"):
        edm.load_edm_pickle_state_dict(torch_file)


def test_registry_loader_drops_the_augmentation_map_that_sampling_never_uses(tmp_path, small):
    # EDM's CIFAR-10 pickles were trained with augment_dim = 9; the registry network (as the manifest) has none
    trained = edm.build_edm_vp_songunet({**vp_config(small), "augment_dim": 9})
    weights = dict(small["state_dict"])
    weights["model.map_augment.weight"] = torch.randn(trained.model.map_augment.weight.shape) * 0.3
    trained.load_state_dict(weights, strict=True)
    trained.eval().requires_grad_(False)
    (tmp_path / "tiny_edm").mkdir()
    write_edm_like_pickle(tmp_path / "tiny_edm" / "net.pkl", trained, {**small["config"], "augment_dim": 9})
    registry = {"tiny_edm": {"files": [{"path": "net.pkl", "urls": []}],
                             "architecture": {"family": "edm_vp_songunet", "config": vp_config(small)}}}
    loaded = models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry)
    assert "model.map_augment.weight" not in loaded.network.state_dict()
    with torch.no_grad():
        out = loaded.network(small["x"], small["sigma"], small["class_labels"])
        with_augment_net = trained(small["x"], small["sigma"], small["class_labels"])
        augmented = trained(small["x"], small["sigma"], small["class_labels"],
                            augment_labels=torch.ones(len(small["x"]), 9))
    assert (out - small["out"]).abs().max().item() < 1e-5
    assert torch.equal(out, with_augment_net)
    assert (augmented - out).abs().max().item() > 1e-4  # the map is real (float error is ~1e-6): unused labels make it vanish


def registry_for_pickle(tmp_path, network, init_kwargs, config, wrapper_class_name=None):
    """Write `network` as an EDM-like pickle at tmp_path/tiny_edm/net.pkl and a registry entry with `config`."""
    (tmp_path / "tiny_edm").mkdir(exist_ok=True)
    write_edm_like_pickle(tmp_path / "tiny_edm" / "net.pkl", network.eval().requires_grad_(False), init_kwargs,
                          wrapper_class_name=wrapper_class_name)
    return {"tiny_edm": {"files": [{"path": "net.pkl", "urls": []}],
                         "architecture": {"family": "edm_vp_songunet", "config": config}}}


def test_registry_loads_an_edm_precond_pickle_with_or_without_its_augmentation_map(tmp_path, small_edm):
    trained = small_edm_network(small_edm)
    args = (small_edm["x"], small_edm["sigma"], small_edm["class_labels"])

    # augment_dim 9 in the registry: every weight of the pickle is loaded, strictly
    registry = registry_for_pickle(tmp_path, trained, small_edm["config"], edm_config(small_edm))
    loaded = models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry)
    assert isinstance(loaded.network, edm.EDMPrecond)
    assert torch.equal(loaded.network.state_dict()["model.map_augment.weight"],
                       small_edm["state_dict"]["model.map_augment.weight"])
    with torch.no_grad():
        out = loaded.network(*args)
    assert (out - small_edm["out"]).abs().max().item() < 1e-5

    # no augment_dim (the registry's CIFAR-10 entries): the map is dropped and the denoiser is exactly the same,
    # because EDM's SongUNet applies it only to augmentation labels, which no defense passes
    config = {key: value for key, value in edm_config(small_edm).items() if key != "augment_dim"}
    registry["tiny_edm"]["architecture"]["config"] = config
    without_map = models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry)
    assert "model.map_augment.weight" not in without_map.network.state_dict()
    with torch.no_grad():
        assert torch.equal(without_map.network(*args), out)
        augmented = trained(*args, augment_labels=torch.ones(len(small_edm["x"]), 9))
    # the map is real (here ~2e-5, 300x the float32 rounding of `out`); only unused labels make it vanish
    assert (augmented - out).abs().max().item() > 1e-6

    # the pickle may name the class with its module (a plainly pickled training.networks.EDMPrecond)
    registry = registry_for_pickle(tmp_path, trained, small_edm["config"], edm_config(small_edm),
                                   wrapper_class_name="training.networks.EDMPrecond")
    assert isinstance(models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry).network,
                      edm.EDMPrecond)


@pytest.mark.parametrize("pickled, registered", [("edm", "vp"), ("vp", "edm")])
def test_registry_refuses_a_pickle_whose_wrapper_class_disagrees(tmp_path, small, small_edm, pickled, registered):
    # Same keys, same shapes: a strict load would succeed and silently compute the other denoiser.
    if pickled == "edm":
        network, init_kwargs, config = small_edm_network(small_edm), small_edm["config"], edm_config(small_edm)
    else:
        network, init_kwargs, config = small_network(small), small["config"], vp_config(small)
    class_name = type(network).__name__
    registry = registry_for_pickle(tmp_path, network, init_kwargs, {**config, "precond": registered})
    with pytest.raises(models.ModelFileError) as error:
        models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry)
    assert isinstance(error.value, DiffrobustError)
    message = str(error.value)
    assert str(tmp_path / "tiny_edm" / "net.pkl") in message  # the file
    assert f"holds an NVlabs/edm {class_name} network (precond '{pickled}')" in message  # what the pickle says
    other = "VPPrecond" if pickled == "edm" else "EDMPrecond"
    assert f"the registry says precond '{registered}' ({other})" in message  # what the registry says
    assert f"set `precond: {pickled}`" in message and "config/checkpoints.yaml" in message  # the fix


def test_registry_refuses_edm_wrappers_that_are_not_implemented(tmp_path, small_edm):
    registry = registry_for_pickle(tmp_path, small_edm_network(small_edm), small_edm["config"],
                                   edm_config(small_edm), wrapper_class_name="VEPrecond")
    with pytest.raises(models.ModelFileError, match="holds an NVlabs/edm VEPrecond network, which this code does "
                                                    "not implement .*EDMPrecond, VPPrecond"):
        models.load_registry_checkpoint("tiny_edm", tmp_path, registry=registry)


def test_registry_schema_requires_precond_for_edm_entries(tmp_path, repo_root):
    registry = yaml.safe_load((repo_root / "config" / "checkpoints.yaml").read_text())
    assert {name: entry["architecture"]["config"]["precond"] for name, entry in registry.items()
            if entry.get("architecture", {}).get("family") == "edm_vp_songunet"} == \
        {"edm_cifar10_cond_vp": "edm", "edm_cifar10_uncond_vp": "edm"}
    del registry["edm_cifar10_cond_vp"]["architecture"]["config"]["precond"]
    registry["edm_cifar10_uncond_vp"]["architecture"]["config"]["precond"] = "ve"
    path = tmp_path / "checkpoints.yaml"
    path.write_text(yaml.safe_dump(registry))
    with pytest.raises(ConfigError) as error:
        load_checkpoint_registry(path)
    message = str(error.value)
    assert "edm_cifar10_cond_vp.architecture.config': 'precond' is a required property" in message
    assert "edm_cifar10_uncond_vp.architecture.config.precond': 've' is not one of ['edm', 'vp']" in message
