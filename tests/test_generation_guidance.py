"""Classifier-free guidance: scale 1 is the conditional model, the interval switches it off."""

import torch

from softvq.generation.guidance import Guidance, guided
from softvq.generation.models import GeneratorConfig, build_generator


def randomised_model():
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind="dit", width=32, depth=2, heads=4, num_tokens=8,
                                            latent_dim=4, num_classes=5)).eval()
    for p in model.parameters():  # leave the zero init so outputs depend on the class
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_scale_one_equals_conditional_model_and_skips_the_null_pass():
    model = randomised_model()
    calls = []
    fn = lambda x, t, y: (calls.append(len(x)), model(x, t, y))[1]
    x, t, y = torch.randn(3, 8, 4), torch.full((3,), 500), torch.tensor([0, 1, 2])
    out = guided(fn, x, t, y, Guidance(1.0), null_class=5, tau=t / 1000)
    assert torch.allclose(out, model(x, t, y)) and calls == [3]


def test_guidance_inside_interval_follows_the_formula_and_is_off_outside():
    model = randomised_model()
    g = Guidance(scale=2.5, low=0.0, high=0.7)
    x, y = torch.randn(4, 8, 4), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([100, 650, 750, 999])  # τ = t / 1000: inside, inside, outside, outside
    out = guided(model, x, t, y, g, null_class=5, tau=t / 1000)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
    expected = uncond + 2.5 * (cond - uncond)
    assert torch.allclose(out[:2], expected[:2], atol=1e-5)
    assert torch.allclose(out[2:], cond[2:], atol=1e-5)
    assert not torch.allclose(out[:2], cond[:2], atol=1e-3)


def test_only_the_eps_channels_are_guided_for_sigma_learned():
    model = randomised_model()
    x, y, t = torch.randn(2, 8, 4), torch.tensor([1, 3]), torch.tensor([300, 300])
    out = guided(model, x, t, y, Guidance(3.0), null_class=5, tau=t / 1000, guided_channels=(-1, 4))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
    assert torch.allclose(out[..., :4], uncond[..., :4] + 3 * (cond[..., :4] - uncond[..., :4]), atol=1e-5)
    assert torch.allclose(out[..., 4:], cond[..., 4:], atol=1e-5)


def test_the_guidance_interval_is_closed_at_both_ends():
    """CFG applies for low <= τ <= high (the release's interval): DiT's last step sits at τ = 0."""
    times = torch.tensor([0.0, 0.7, 0.70001, 1.0], dtype=torch.float64)
    assert Guidance(scale=2.0, low=0.0, high=0.7).active(times).tolist() == [True, True, False, False]
    assert bool(Guidance(2.0, 0.3, 0.7).active(torch.tensor([0.3], dtype=torch.float64)))
