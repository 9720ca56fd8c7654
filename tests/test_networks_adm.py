"""The ADM UNet (improved-diffusion / guided-diffusion) against the official code's manifests and outputs."""

import json
import math

import pytest
import torch
import yaml

from diffrobust.networks import build_network
from diffrobust.networks.adm import (
    ADMUNet,
    Upsample,
    build_guided_diffusion_unet,
    build_improved_diffusion_unet,
    qkv_attention,
    set_cpu_fast_path,
    timestep_embedding,
    token_attention,
)


def registry_entry(repo_root, name):
    with open(repo_root / "config" / "checkpoints.yaml") as f:
        return yaml.safe_load(f)[name]


def state_dict_manifest(module):
    """[[key, shape, dtype], ...] in state-dict order, as the fixtures' JSON manifests write it."""
    return [[key, list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in module.state_dict().items()]


@pytest.mark.parametrize(
    "registry_name, manifest_file, num_params",
    [
        ("improved_diffusion_cifar10_uncond", "improved_diffusion_cifar10_uncond_50M.json", 52_546_438),
        ("guided_diffusion_256_uncond", "guided_diffusion_256x256_uncond.json", 552_814_086),
    ],
)
def test_registry_network_has_the_published_state_dict_layout(
    repo_root, fixtures_dir, registry_name, manifest_file, num_params
):
    manifest = json.loads((fixtures_dir / "architectures" / manifest_file).read_text())
    architecture = registry_entry(repo_root, registry_name)["architecture"]
    assert architecture["config"] == manifest["config"]

    with torch.device("meta"):  # no memory, no init cost, even for the 552M-parameter model
        network = build_network(architecture)

    assert state_dict_manifest(network) == manifest["state_dict"]
    assert sum(p.numel() for p in network.parameters()) == manifest["num_params"] == num_params


def load_reference(fixtures_dir, name):
    return torch.load(fixtures_dir / "architectures" / name, weights_only=True)


def test_improved_diffusion_unet_reproduces_the_official_output(fixtures_dir):
    reference = load_reference(fixtures_dir, "improved_diffusion_small.pt")
    network = ADMUNet(**reference["config"])  # the fixture holds improved_diffusion.unet.UNetModel kwargs
    network.load_state_dict(reference["state_dict"], strict=True)
    network.eval()
    assert reference["t"].is_floating_point()

    # The official steps, and the CPU fast path in both its layouts (this 32-channel network would pick standard).
    for fast, channels_last in ((False, False), (True, False), (True, True)):
        set_cpu_fast_path(network, fast).channels_last = channels_last
        with torch.no_grad():
            out = network(reference["x"], reference["t"], reference["y"])
        assert out.shape == (2, 6, 32, 32)
        torch.testing.assert_close(out, reference["out"], atol=1e-5, rtol=0)


def test_guided_diffusion_unet_reproduces_the_official_output(fixtures_dir):
    reference = load_reference(fixtures_dir, "guided_diffusion_small.pt")
    network = build_guided_diffusion_unet(reference["config"])  # guided-diffusion flags, class_cond (1000)
    assert network.label_emb.weight.shape == (1000, 128)
    network.load_state_dict(reference["state_dict"], strict=True)
    network.eval()

    for fast, channels_last in ((False, False), (True, False), (True, True)):
        set_cpu_fast_path(network, fast).channels_last = channels_last
        with torch.no_grad():
            out = network(reference["x"], reference["t"].float(), reference["y"])
            out_integer_t = network(reference["x"], reference["t"], reference["y"])
        torch.testing.assert_close(out, reference["out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_integer_t, out, atol=0, rtol=0)


def test_timestep_embedding_takes_real_valued_timesteps():
    # dim 5: half = 2, frequencies 1 and 10000**(-1/2) = 0.01; cos block, sin block, zero pad for the odd dim.
    t = torch.tensor([0.0, 2.5, 999.75])
    expected = torch.tensor(
        [[math.cos(s), math.cos(0.01 * s), math.sin(s), math.sin(0.01 * s), 0.0] for s in t.tolist()]
    )
    torch.testing.assert_close(timestep_embedding(t, 5), expected, atol=1e-5, rtol=0)


def small_unet(**overrides):
    kwargs = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(2,),
                  channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True)
    kwargs.update(overrides)
    torch.manual_seed(0)
    network = ADMUNet(**kwargs)
    # The official init zeroes every residual branch's last layer; give all weights values so that every path
    # (attention included) affects the output.
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.05)
    return network.eval()


def test_fractional_timesteps_interpolate_and_a_scalar_broadcasts():
    network = small_unet()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        at = {t: network(x, torch.full((2,), t)) for t in (300.0, 300.5, 301.0)}
        scalar = network(x, torch.tensor(300.5))
    torch.testing.assert_close(scalar, at[300.5], atol=0, rtol=0)
    assert not torch.equal(at[300.5], at[300.0]) and not torch.equal(at[300.5], at[301.0])


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("positions", [1, 7, 64])
def test_token_attention_is_the_official_attention_on_tokens(new_order, positions):
    torch.manual_seed(4)
    qkv = torch.randn(3, 3 * 4 * 16, positions)  # 4 heads of 16 channels
    reference = qkv_attention(qkv, 4, new_order)  # the official einsum form, [N, 3HC, T] -> [N, HC, T]
    tokens = qkv.transpose(1, 2).contiguous()  # [N, T, 3HC], as the attention block's qkv layer gives them
    torch.testing.assert_close(token_attention(tokens, 4, new_order).transpose(1, 2), reference, atol=1e-6, rtol=0)


def test_nearest_upsampling_of_standard_layout_features_equals_interpolate():
    upsample = Upsample(4, use_conv=False).eval()  # eval mode on the CPU: the fast path's broadcast copy
    x = torch.randn(2, 4, 3, 5)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(upsample(x), expected)
    assert torch.equal(upsample(x.contiguous(memory_format=torch.channels_last)), expected)
    assert torch.equal(set_cpu_fast_path(upsample, False)(x), expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_cpu_fast_path_is_the_official_function(channels_last):
    fast = small_unet()  # eval mode, on the CPU: the fast path
    assert not fast.channels_last  # 32 channels: 1 per GroupNorm group
    fast.channels_last = channels_last
    official = set_cpu_fast_path(small_unet(), False)
    assert fast.cpu_fast_path and not official.cpu_fast_path
    assert state_dict_manifest(fast) == state_dict_manifest(official)
    torch.manual_seed(5)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        out = fast(x, t)
        torch.testing.assert_close(out, official(x, t), atol=1e-6, rtol=0)
    assert out.is_contiguous()
    # Gradients through the input (attacks): the fast steps out of place, the same values.
    grads = []
    for network in (fast, official):
        x_in = x.clone().requires_grad_(True)
        network(x_in, t).square().sum().backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_the_fast_path_layout_follows_the_groupnorm_group_width():
    with torch.device("meta"):
        cifar10 = build_improved_diffusion_unet({"image_size": 32, "num_channels": 128, "num_res_blocks": 3})
        guided = build_guided_diffusion_unet({"image_size": 256, "num_channels": 256, "num_head_channels": 64})
    assert cifar10.channels_last and guided.channels_last and not small_unet().channels_last


def test_train_mode_runs_the_official_steps_bit_for_bit():
    fast, official = small_unet().train(), set_cpu_fast_path(small_unet(), False).train()
    torch.manual_seed(7)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    outputs = []
    for network in (fast, official):
        torch.manual_seed(8)  # dropout draws
        outputs.append(network(x, t))
    assert torch.equal(outputs[0], outputs[1])


def test_in_place_steps_without_autograd_change_neither_the_input_nor_the_output():
    network = small_unet(dropout=0.3)  # eval mode: dropout is the identity
    torch.manual_seed(6)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    x_before = x.clone()
    with torch.no_grad():
        in_place = network(x, t)
    assert torch.equal(x, x_before)
    with_graph = network(x.clone().requires_grad_(True), t)  # every step out of place
    torch.testing.assert_close(in_place, with_graph.detach(), atol=1e-6, rtol=0)


def legacy_to_new_qkv_order(qkv, num_heads):
    """Permute qkv rows from head-major [q0 k0 v0 | q1 k1 v1] to q/k/v-major [q0 q1 | k0 k1 | v0 v1]."""
    head_channels = qkv.shape[0] // (3 * num_heads)
    per_head = qkv.reshape(num_heads, 3, head_channels, *qkv.shape[1:])
    return per_head.transpose(0, 1).reshape(qkv.shape)


def test_new_attention_order_is_the_legacy_attention_with_permuted_qkv():
    legacy = small_unet(num_head_channels=16)  # 64 attention channels -> 4 heads
    new = small_unet(num_head_channels=16, use_new_attention_order=True)
    state = legacy.state_dict()
    assert list(state) == list(new.state_dict())
    permuted = {k: legacy_to_new_qkv_order(v, 4) if ".qkv." in k else v for k, v in state.items()}
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        reference = legacy(x, t)
        new.load_state_dict(state)
        unpermuted = new(x, t)
        new.load_state_dict(permuted)
        permuted_out = new(x, t)
    torch.testing.assert_close(permuted_out, reference, atol=1e-5, rtol=0)
    assert (unpermuted - reference).abs().max() > 1e-3


def test_activation_checkpointing_leaves_values_and_gradients_unchanged():
    plain, checkpointed = small_unet(), small_unet(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for network in (plain, checkpointed):
        x_in = x.clone().requires_grad_(True)
        network(x_in, torch.tensor([5.0, 50.0])).square().sum().backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().max() > 0


@pytest.mark.parametrize("builder", [build_improved_diffusion_unet, build_guided_diffusion_unet])
def test_learn_sigma_and_class_cond_switches(builder):
    with torch.device("meta"):
        base = builder({"image_size": 64, "num_channels": 64, "learn_sigma": False, "class_cond": False,
                        "diffusion_steps": 4000, "noise_schedule": "cosine"})
        learned_sigma = builder({"image_size": 64, "num_channels": 64, "learn_sigma": True})
        conditional = builder({"image_size": 64, "num_channels": 64, "class_cond": True})
    assert base.state_dict()["out.2.weight"].shape == (3, 64, 3, 3)
    assert learned_sigma.state_dict()["out.2.weight"].shape == (6, 64, 3, 3)
    assert "label_emb.weight" not in base.state_dict()
    assert conditional.state_dict()["label_emb.weight"].shape == (1000, 256)
    # Everything else is identical: the switches touch only the output conv and the label embedding.
    base_keys = state_dict_manifest(base)
    assert [row for row in state_dict_manifest(conditional) if row[0] != "label_emb.weight"] == base_keys
    assert [row for row in state_dict_manifest(learned_sigma) if not row[0].startswith("out.2")] == [
        row for row in base_keys if not row[0].startswith("out.2")
    ]
    # Default 64x64 channel_mult (1, 2, 3, 4) and attention at 16, 8 -> downsample rates 4, 8.
    assert base.channel_mult == (1, 2, 3, 4) and set(base.attention_resolutions) == {4, 8}


def test_guided_switches_resblock_updown_and_fp16_flag():
    flags = {"image_size": 64, "num_channels": 64, "channel_mult": "1,2", "attention_resolutions": "32"}
    with torch.device("meta"):
        convolutional = build_guided_diffusion_unet(flags)
        resblocks = build_guided_diffusion_unet({**flags, "resblock_updown": True, "use_fp16": True})
    assert "input_blocks.3.0.op.weight" in convolutional.state_dict()
    assert "input_blocks.3.0.in_layers.2.weight" in resblocks.state_dict()
    # Level 1 (attention at resolution 32) has 3 decoder blocks; the last ends with attention, then upsampling.
    assert "output_blocks.2.1.qkv.weight" in convolutional.state_dict()
    assert "output_blocks.2.2.conv.weight" in convolutional.state_dict()
    assert "output_blocks.2.2.emb_layers.1.weight" in resblocks.state_dict()
    assert resblocks.use_fp16 is True and next(resblocks.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    "builder, flags, bad_flag",
    [
        (build_guided_diffusion_unet, {"image_size": 64, "num_chanels": 64}, "num_chanels"),
        (build_improved_diffusion_unet, {"image_size": 32, "resblock_updown": True}, "resblock_updown"),
        (build_improved_diffusion_unet, {"image_size": 32, "channel_mult": "1,2"}, "channel_mult"),
        (build_guided_diffusion_unet, {"image_size": 48}, "image_size"),
        (build_improved_diffusion_unet, {"image_size": 128}, "image_size"),
        (build_guided_diffusion_unet, {"image_size": 64, "attention_resolutions": "12"}, "attention_resolutions"),
        (build_guided_diffusion_unet, {"image_size": 64, "attention_resolutions": "4"}, "attention_resolutions"),
        (build_guided_diffusion_unet, {"image_size": 64, "channel_mult": "1,x"}, "channel_mult"),
        (build_guided_diffusion_unet, {"image_size": 64, "num_head_channels": 48}, "num_head_channels"),
        (build_improved_diffusion_unet, {"image_size": 64, "num_heads": 3}, "num_heads"),
        (build_guided_diffusion_unet, {"image_size": 64, "learn_sigma": "yes"}, "learn_sigma"),
        (build_improved_diffusion_unet, {"image_size": 64, "num_res_blocks": 2.5}, "num_res_blocks"),
    ],
)
def test_a_bad_flag_gives_an_error_naming_it(builder, flags, bad_flag):
    with torch.device("meta"), pytest.raises(ValueError, match=bad_flag):
        builder(flags)


def test_labels_are_required_exactly_for_class_conditional_models():
    conditional, unconditional = small_unet(num_classes=10), small_unet()
    x, t = torch.zeros(1, 3, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional(x, t, torch.tensor([3]))
