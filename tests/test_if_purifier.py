"""The IF stage II purifier (pdm_pure_if) against the released PDM-Pure (xavihart/PDM-Pure pdm_pure.py through
deepfloyd_if): its guidance pair (T5 prompt vs IF's zero_t5) and its schedule (noise at 44, loop 99...0 by 11, the
low-res augmentation noise redrawn at every UNet call)."""

import numpy as np
import torch

from diffrobust.defenses.sdedit import IFStageIIPure, if_guided_prediction, load_if_stage2
from test_pixel_barrier import tiny_if_stage2


def tiny_if_folder(folder):
    """The tiny IF-II folder with distinct prompt and unconditional embeddings (77 x 12)."""
    tiny_if_stage2(folder)
    rng = np.random.default_rng(0)
    np.save(folder / "t5_xxl_a_picture.npy", rng.standard_normal((77, 12)).astype(np.float32))
    np.save(folder / "zero_t5-v1_1-xxl_vector.npy", rng.standard_normal((77, 12)).astype(np.float16))
    return load_if_stage2(folder)


def recording(pipeline):
    """Record every UNet call's (input, timestep, embeddings) and every scheduler step's (model output, timestep)."""
    calls, steps = [], []
    unet_forward, scheduler_step = pipeline.unet.forward, pipeline.scheduler.step

    def forward(sample, t, **kwargs):
        calls.append((sample.clone(), int(t), kwargs["encoder_hidden_states"].clone()))
        return unet_forward(sample, t, **kwargs)

    def step(model_output, t, sample, **kwargs):
        steps.append((model_output.clone(), int(t)))
        return scheduler_step(model_output, t, sample, **kwargs)

    pipeline.unet.forward, pipeline.scheduler.step = forward, step
    return calls, steps


def test_guidance_uses_the_prompt_against_zero_t5(tmp_path):
    pipeline, prompt_embeds, negative_prompt_embeds = tiny_if_folder(tmp_path)
    assert not torch.equal(prompt_embeds, negative_prompt_embeds)
    purifier = IFStageIIPure(pipeline, prompt_embeds, negative_prompt_embeds, low_res=8)
    calls, steps = recording(pipeline)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    purifier(x, torch.Generator().manual_seed(1))
    sample, t, embeds = calls[0]
    # the conditional rows carry the prompt's embedding, the last (unconditional) rows IF's zero_t5 vector
    assert torch.equal(embeds[:2], prompt_embeds.expand(2, -1, -1))
    assert torch.equal(embeds[-2:], negative_prompt_embeds.expand(2, -1, -1))
    # the step's prediction is uncond + 7 (cond - uncond), measured with the UNet's own outputs on the same inputs
    unet = pipeline.unet
    with torch.no_grad():
        levels = torch.full((len(sample),), 250)
        out = unet(sample, t, encoder_hidden_states=embeds, class_labels=levels, return_dict=False)[0][:, :3]
    conditional, unconditional = (out[0:2] + out[2:4]) / 2, out[4:6]
    guided = steps[0][0][:, :3]
    assert (conditional - unconditional).abs().max() > 1e-3  # the guidance pair differs
    torch.testing.assert_close(guided - conditional, 6.0 * (conditional - unconditional), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        direct = if_guided_prediction(unet, sample[:2, :3], t, sample[:, 3:], prompt_embeds.expand(2, -1, -1),
                                      negative_prompt_embeds.expand(2, -1, -1), 250, 7.0, conditional_rows=2)
    torch.testing.assert_close(direct, steps[0][0])


def test_released_schedule_noises_at_44_and_steps_99_by_11_redrawing_the_low_res_noise(tmp_path):
    pipeline, prompt_embeds, negative_prompt_embeds = tiny_if_folder(tmp_path)
    purifier = IFStageIIPure(pipeline, prompt_embeds, negative_prompt_embeds, low_res=8)
    calls, steps = recording(pipeline)
    added = []
    add_noise = pipeline.scheduler.add_noise

    def recorded_add_noise(original, noise, timesteps):
        added.append(timesteps.tolist())
        return add_noise(original, noise, timesteps)

    pipeline.scheduler.add_noise = recorded_add_noise
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    purifier(x, torch.Generator().manual_seed(1))
    assert added == [[44, 44]]  # the support image is noised at timestep 44
    assert [t for _, t in steps] == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    assert [t for _, t, _ in calls] == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    low_res = [sample[:, 3:] for sample, _, _ in calls]
    # a fresh augmentation draw at every call and in every row (IF's SuperResUNetModel q-samples inside forward)
    assert all(not torch.allclose(low_res[0], other) for other in low_res[1:])
    assert not torch.allclose(low_res[0][0:2], low_res[0][2:4])
    assert purifier.network_evaluations() == 30


def test_diffusers_schedule_is_kept_by_name(tmp_path):
    pipeline, prompt_embeds, negative_prompt_embeds = tiny_if_folder(tmp_path)
    purifier = IFStageIIPure(pipeline, prompt_embeds, negative_prompt_embeds, low_res=8, schedule="diffusers")
    calls, steps = recording(pipeline)
    purifier(torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert [t for _, t in steps] == list(range(90, -1, -10))
    low_res = [sample[:, 3:] for sample, _, _ in calls]
    assert all(torch.equal(low_res[0], other) for other in low_res[1:])  # one draw, as the diffusers pipeline
    assert purifier.network_evaluations() == 20


def test_our_loop_with_the_diffusers_schedule_reproduces_the_diffusers_pipeline(tmp_path):
    from diffrobust.defenses.sdedit import if_stage2_purify

    pipeline, prompt_embeds, negative_prompt_embeds = tiny_if_folder(tmp_path)
    low_res = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    original = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = if_stage2_purify(pipeline, low_res, original, prompt_embeds, negative_prompt_embeds, schedule="diffusers",
                            generator=torch.Generator().manual_seed(4))
    theirs = pipeline(image=low_res, original_image=original, strength=0.1, num_inference_steps=100,
                      guidance_scale=7.0, noise_level=250, prompt_embeds=prompt_embeds.expand(2, -1, -1),
                      negative_prompt_embeds=negative_prompt_embeds.expand(2, -1, -1),
                      generator=torch.Generator().manual_seed(4), output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
