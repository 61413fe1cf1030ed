"""MAR on latent tokens: masking, what the encoder and the diffusion loss see, the sampling
schedule, the paper's Tab. 1 GFLOPs, the MAR training recipe, and that a tiny MAR learns."""

import math

import pytest
import torch
from scipy import stats

from softvq.generation.diffloss import DiffusionLoss
from softvq.generation.flops import PAPER_TABLE1_MAR, analytic_mar_macs, count_mar_macs
from softvq.generation.mar import (MARConfig, MaskedAutoregressive, draw_mask_ratio, mar_config, masking_schedule,
                                   random_orders)
from softvq.generation.models import build_generator
from softvq.generation.sampling import SamplerSpec
from softvq.generation.guidance import Guidance
from softvq.generation.train import GeneratorTrainConfig, learning_rate, parameter_groups


def tiny(**overrides) -> MaskedAutoregressive:
    fields = dict(num_tokens=12, latent_dim=4, width=32, depth=1, heads=2, num_classes=3, buffer_size=2,
                  head_width=32, head_depth=1, attn_dropout=0.0, proj_dropout=0.0, class_dropout=0.0)
    fields.update(overrides)
    torch.manual_seed(0)
    return MaskedAutoregressive(MARConfig(**fields))


def test_mask_ratio_follows_the_truncated_normal_of_mar():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_mask_ratio(0.7, g) for _ in range(4000)], dtype=torch.float64)
    reference = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)  # MAR's own definition
    assert float(draws.min()) >= 0.7 and float(draws.max()) <= 1.0
    assert abs(float(draws.mean()) - reference.mean()) < 0.004
    assert abs(float(draws.std()) - reference.std()) < 0.004
    for q in (0.1, 0.5, 0.9):
        assert abs(float(draws.quantile(q)) - reference.ppf(q)) < 0.01
    assert draw_mask_ratio(1.0, g) == 1.0  # a degenerate range masks everything


def test_masking_schedule_is_maskgits_cosine_with_a_token_per_step():
    # hand-computed: floor(16 cos(pi/2 * k/4)) for k = 1..4 -> 14, 11, 6, 0 (kept at >= 1)
    assert masking_schedule(16, 4) == [14, 11, 6, 1]
    for length, steps in [(64, 64), (32, 10), (256, 64), (5, 1)]:
        counts = masking_schedule(length, steps)
        left = counts[:-1] + [0]  # the last step reveals whatever is left
        assert len(counts) == steps and all(a - b >= 1 for a, b in zip([length] + left, left))
    assert masking_schedule(64, 64) == list(range(63, 0, -1)) + [1]
    with pytest.raises(ValueError, match="1..8 steps"):
        masking_schedule(8, 9)


def test_the_encoder_never_sees_masked_tokens():
    model = tiny().eval()
    x = torch.randn(3, 12, 4)
    labels = torch.tensor([0, 1, 2])
    orders = random_orders(3, 12, torch.Generator().manual_seed(1))
    masked = 7
    changed = x.clone()
    for i in range(3):
        changed[i, orders[i, :masked]] = torch.randn(masked, 4)  # new values only where masked
    with torch.no_grad():
        z = model.condition(model.encode(x, orders, masked, labels), orders, masked)
        z_changed = model.condition(model.encode(changed, orders, masked, labels), orders, masked)
        changed[0, orders[0, masked]] += 1.0  # a visible token: now it must matter
        z_visible = model.condition(model.encode(changed, orders, masked, labels), orders, masked)
    assert torch.equal(z, z_changed)
    assert not torch.allclose(z_visible[0], z[0])
    assert torch.equal(z_visible[1:], z[1:])  # and only for its own image


def test_the_diffusion_loss_is_taken_on_the_masked_tokens_with_their_conditions():
    model = tiny(diffusion_batch_mul=3)
    seen = {}

    def record(target, cond):
        seen["target"], seen["cond"] = target, cond
        return {"loss": target.sum() * 0}

    model.head.forward = record
    x = torch.randn(2, 12, 4)
    labels = torch.tensor([1, 2])
    model(x, labels)
    target, cond = seen["target"], seen["cond"]
    per_copy = target.shape[0] // 3
    assert torch.equal(target, target[:per_copy].repeat(3, 1)) and torch.equal(cond, cond[:per_copy].repeat(3, 1))
    masked = per_copy // 2
    assert math.ceil(0.7 * 12) <= masked <= 12
    # recover each image's masked set from the targets (x has distinct rows)
    positions = [[int((x[i] == row).all(dim=1).nonzero()) for row in target[i * masked:(i + 1) * masked]]
                 for i in range(2)]
    assert all(len(set(p)) == masked for p in positions)
    orders = torch.stack([torch.tensor(p + [j for j in range(12) if j not in p]) for p in positions])
    model.eval()
    with torch.no_grad():
        z = model.condition(model.encode(x, orders, masked, labels), orders, masked)
    expected = torch.cat([z[i, positions[i]] for i in range(2)])
    assert torch.allclose(cond[:per_copy], expected, atol=1e-6)


def test_sampling_reveals_every_token_once_on_schedule_with_the_linear_guidance_ramp():
    model = tiny()
    calls = []

    def fake_sample(cond, steps, temperature, uncond=None, cfg=1.0, generator=None, clip_x0=None):
        calls.append((cond.shape[0], cfg, steps, temperature, uncond is not None))
        return torch.full((cond.shape[0], 4), float(len(calls)))

    model.head.sample = fake_sample
    model.train()  # sampling must switch to eval and back
    tokens = model.sample(torch.tensor([0, 2]), ar_steps=5, diffusion_steps=7, cfg=3.0, temperature=0.9,
                          generator=torch.Generator().manual_seed(0))
    assert model.training
    counts = masking_schedule(12, 5)
    revealed = [12 - counts[0]] + [a - b for a, b in zip(counts, counts[1:-1])] + [counts[-2]]
    assert [c[0] for c in calls] == [2 * r for r in revealed]  # two images per step
    for k, (_, cfg, steps, temperature, guided) in enumerate(calls):
        assert cfg == pytest.approx(1 + 2.0 * (12 - counts[k]) / 12) and steps == 7 and temperature == 0.9 and guided
    for i in range(2):  # each token written once, by the step that revealed it
        step_of = tokens[i, :, 0]
        assert torch.all(tokens[i] == step_of[:, None])
        assert sorted(torch.bincount(step_of.long(), minlength=6)[1:].tolist()) == sorted(revealed)


def test_unguided_sampling_is_reproducible_and_shaped():
    model = tiny(num_tokens=6)
    a = model.sample(torch.tensor([0, 1, 2]), ar_steps=3, diffusion_steps=5, generator=torch.Generator().manual_seed(4))
    b = model.sample(torch.tensor([0, 1, 2]), ar_steps=3, diffusion_steps=5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 6, 4) and torch.equal(a, b) and torch.isfinite(a).all()


def test_sampling_borrows_eval_mode_and_gives_the_training_mode_back():
    model = tiny(num_tokens=6, attn_dropout=0.5, proj_dropout=0.5)
    with torch.no_grad():  # the head's zero-initialised output layer would hide the condition
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    draw = lambda: model.sample(torch.tensor([0, 1]), ar_steps=2, diffusion_steps=3,
                                generator=torch.Generator().manual_seed(1))
    in_training = draw()  # dropout must be off while sampling even though the model is training
    assert model.training
    model.eval()
    assert torch.equal(in_training, draw())
    model.train()
    with pytest.raises(ValueError):
        model.sample(torch.tensor([0]), cfg=-1.0)
    assert model.training


def test_guided_head_sampling_mixes_eps_and_keeps_the_conditional_variance(monkeypatch):
    torch.manual_seed(0)
    head = DiffusionLoss(token_dim=3, cond_dim=5, width=16, depth=1, diffusion_steps=20)
    for p in head.parameters():  # replace the zero initialisation so the output depends on everything
        torch.nn.init.normal_(p, std=0.3)
    cond, uncond = torch.randn(4, 5), torch.randn(4, 5)
    captured = {}

    class Capture:  # stands in for the respaced diffusion: keeps the guided model function
        def p_sample_loop(self, model, noise, generator=None, temperature=1.0, clip_x0=None):
            captured.update(model=model, noise=noise, temperature=temperature)
            return noise

    monkeypatch.setattr(head.diffusion, "respaced", lambda steps: Capture())
    head.sample(cond, steps=4, uncond=uncond, cfg=2.5, temperature=0.8, generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(4, 3), torch.tensor([3, 2, 1, 0])
    with torch.no_grad():
        out = captured["model"](x, t)
        c, u = head.net(x, t, cond), head.net(x, t, uncond)
    assert torch.allclose(out[:, :3], u[:, :3] + 2.5 * (c[:, :3] - u[:, :3]), atol=1e-6)  # ε_u + s(ε_c − ε_u)
    assert torch.allclose(out[:, 3:], c[:, 3:], atol=1e-6)  # the conditional variance
    assert captured["temperature"] == 0.8 and captured["noise"].shape == (4, 3)
    head.sample(cond, steps=4, uncond=uncond, cfg=1.0)  # scale 1: the conditional model alone
    with torch.no_grad():
        assert torch.equal(captured["model"](x, t), c)


def test_mar_h_matches_the_paper_in_parameters_and_tab2_gflops():
    cfg = mar_config("H", num_tokens=256, latent_dim=16)
    assert abs(build_generator(cfg, device="meta").num_parameters() / 1e6 - 943) < 2  # MAR paper: MAR-H 943M
    for tokens, dim in PAPER_TABLE1_MAR:  # the counter and the shapes agree on every row
        cfg = mar_config("H", num_tokens=tokens, latent_dim=dim)
        counted, analytic = count_mar_macs(cfg), analytic_mar_macs(cfg)
        assert counted.linear == analytic.linear and counted.attention == analytic.attention
    # SoftVQ paper Tab. 1, MAR-H GFLOPs and images/s as printed there (the KL row's GFLOPs are not
    # reproduced: see the benchmark)
    paper = {(64, 32): ("SoftVQ-BL", 86.55, 0.89), (32, 64): ("SoftVQ-L", 67.93, 2.08)}
    assert PAPER_TABLE1_MAR[(256, 16)] == ("KL-16 (MAR's VAE)", 145.08, 0.12)
    for (tokens, dim), (name, gflops, _) in paper.items():
        assert PAPER_TABLE1_MAR[(tokens, dim)] == paper[(tokens, dim)]  # what the benchmark prints beside ours
        counted = count_mar_macs(mar_config("H", num_tokens=tokens, latent_dim=dim))
        assert abs(counted.total / 1e9 / gflops - 1) < 0.01, name


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(KeyError, match="choose one of B, L, H"):
        mar_config("XL")
    with pytest.raises(ValueError, match="buffer_size"):
        MARConfig(buffer_size=0).validate()
    with pytest.raises(ValueError, match=r"\(B, 12, 4\)"):
        tiny()(torch.randn(2, 10, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not a guidance interval"):
        SamplerSpec(guidance=Guidance(2.0, 0.0, 0.7)).resolved("mar")
    with pytest.raises(ValueError, match="samples with 'mar'"):
        SamplerSpec(method="sde").resolved("mar")
    with pytest.raises(ValueError, match="ar_steps only applies to MAR; a SiT generator"):  # were silently ignored
        SamplerSpec(ar_steps=4).resolved("sit")
    with pytest.raises(ValueError, match="clip_x0 must be positive"):
        SamplerSpec(clip_x0=-1.0).resolved("mar")
    with pytest.raises(ValueError, match=r"ar_steps must be 1 or more \(None: one per token\), got 0"):
        SamplerSpec(ar_steps=0).resolved("mar")
    with pytest.raises(ValueError, match=r"--head-width, --buffer-size apply only to MAR \(--objective mar\); DiT "
                                         r"and SiT have none: drop them"):
        GeneratorTrainConfig(latents="x", objective="sit", head_width=8, buffer_size=4).validate()
    # Values that used to fail deep inside training (a division by zero after the first step, a
    # random_ range error, an init error) are named before it starts.
    for field, value, message in [("log_every", 0, "--log-every must be 1 or more"),
                                  ("checkpoint_every", 0, "--checkpoint-every must be 1 or more"),
                                  ("heads", 0, "--heads must be 1 or more"),
                                  ("diffusion_steps", -5, "--diffusion-steps must be 1 or more"),
                                  ("ema_decay", 5.0, r"--ema-decay must be in \[0, 1\)"),
                                  ("lr", -1.0, "--lr must be positive"),
                                  # types and choices of a config built in Python (argparse checks the CLI's)
                                  ("size", "XXL", "size='XXL' is not one of 'S', 'B', 'L', 'XL', 'H'"),
                                  ("steps", 3.5, "steps must be an integer, got 3.5")]:
        with pytest.raises(ValueError, match=message):
            GeneratorTrainConfig(latents="x", **{field: value}).validate()


def test_recipe_lengths_follow_sec_4_1_and_supp_c2_in_steps_or_epochs():
    # MAR-H: 500 epochs with a 100-epoch warm-up; 10,000 latents at batch 2048 = 4.88 steps an epoch
    mar = GeneratorTrainConfig(latents="x", objective="mar").validate().resolved(count=10_000)
    assert (mar.steps, mar.warmup_steps) == (math.ceil(500 * 10_000 / 2048), math.ceil(100 * 10_000 / 2048))
    # a length given in one unit keeps the recipe's other unit out; the warm-up keeps its recipe
    short = GeneratorTrainConfig(latents="x", objective="mar", steps=40, batch_size=100).resolved(count=1000)
    assert (short.steps, short.epochs, short.warmup_steps) == (40, None, 1000)
    # DiT / SiT XL: 3M steps, no warm-up; epochs work for them too
    sit = GeneratorTrainConfig(latents="x").resolved(count=512)
    assert (sit.size, sit.steps, sit.warmup_steps) == ("XL", 3_000_000, 0)
    assert GeneratorTrainConfig(latents="x", epochs=3, batch_size=100).resolved(count=1000).steps == 30
    with pytest.raises(ValueError, match="give --steps or --epochs, not both"):
        GeneratorTrainConfig(latents="x", steps=5, epochs=2).validate()
    with pytest.raises(ValueError, match="give --warmup-steps or --warmup-epochs, not both"):
        GeneratorTrainConfig(latents="x", warmup_steps=5, warmup_epochs=2).validate()
    with pytest.raises(ValueError, match="--epochs must be positive, got 0"):
        GeneratorTrainConfig(latents="x", epochs=0).validate()


def test_mar_recipe_warmup_and_no_decay_on_biases_and_norms():
    cfg = GeneratorTrainConfig(latents="x", objective="mar", warmup_steps=4).validate().resolved()
    assert (cfg.size, cfg.lr, cfg.weight_decay, cfg.adam_beta2, cfg.max_grad_norm, cfg.batch_size) == \
        ("H", 2e-4, 0.02, 0.95, 3.0, 2048)
    assert [learning_rate(cfg, s) for s in range(6)] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4])
    sit = GeneratorTrainConfig(latents="x", lr=3e-4).resolved()
    assert (sit.size, sit.lr, sit.weight_decay, sit.adam_beta2) == ("XL", 3e-4, 0.0, 0.999)
    model = tiny()
    decayed, plain = parameter_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 for p in decayed["params"]) and decayed["weight_decay"] == 0.02
    assert {names[id(p)] for p in plain["params"]} >= {"token_norm.weight", "token_proj.bias"}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_a_tiny_mar_learns_class_conditional_tokens():
    """Two classes whose tokens sit at +1 / −1 per channel: after a short CPU run (~10 s) the
    tokens it samples for each class land on that class's side (5 seeds: 94-100%, 84-94% within 0.5)."""
    model = tiny(num_tokens=8, latent_dim=2, num_classes=2, width=48, head_width=64, head_depth=2,
                 class_dropout=0.1, diffusion_steps=100)
    torch.manual_seed(0)
    labels = torch.arange(256) % 2
    data = (1 - 2 * labels.float())[:, None, None] + 0.1 * torch.randn(256, 8, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(500):
        idx = torch.randint(0, 256, (64,))
        loss = model(data[idx], labels[idx])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = model.sample(torch.tensor([0] * 8 + [1] * 8), ar_steps=4, diffusion_steps=50,
                           generator=torch.Generator().manual_seed(0))
    side = torch.cat([torch.ones(8), -torch.ones(8)])[:, None, None]
    assert float((samples[:8] > 0).float().mean()) > 0.85 and float((samples[8:] < 0).float().mean()) > 0.85
    assert float(((samples - side).abs() < 0.5).float().mean()) > 0.75


def test_clipping_the_predicted_token_keeps_an_untrained_head_bounded():
    """The release's unclipped sampler multiplies the head's ε error by ~300 in its first step
    (ᾱ_999 ≈ 2.4e-9 under the cosine schedule): an untrained head diverges, a clipped one cannot."""
    model = tiny(num_tokens=4, diffusion_steps=1000)
    labels = torch.tensor([0, 1])
    free = model.sample(labels, ar_steps=2, diffusion_steps=20, generator=torch.Generator().manual_seed(0))
    clipped = model.sample(labels, ar_steps=2, diffusion_steps=20, clip_x0=2.0,
                           generator=torch.Generator().manual_seed(0))
    assert float(free.abs().max()) > 100
    # the last step returns the posterior mean at t = 0, a convex mix of a clipped x̂_0 and a near-x̂_0 x_1
    assert float(clipped.abs().max()) < 2.5


def test_gradient_checkpointing_recomputes_the_same_dropout_and_gradients():
    grads = []
    for recompute in (False, True):
        model = tiny(attn_dropout=0.2, proj_dropout=0.2, class_dropout=0.3, grad_checkpointing=recompute)
        torch.manual_seed(1)
        for p in model.head.parameters():  # the head starts at zero output, which would zero every gradient
            torch.nn.init.normal_(p, std=0.1)
        torch.manual_seed(5)
        loss = model(torch.randn(3, 12, 4), torch.tensor([0, 1, 2]))["loss"]
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[0][0] == grads[1][0]
    assert float(grads[0][1]["encoder_blocks.0.mlp.fc1.weight"].norm()) > 0
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], atol=1e-6), name


def test_mar_takes_labels_as_dit_does_and_names_bad_ones_and_settings():
    """Lists and one int failed on .device / .to, a 0-dim tensor on an index, floats deep in
    F.embedding; ar_steps=0 silently ran the default, a NaN temperature gave NaN tokens."""
    model = tiny().eval()
    x = torch.randn(2, model.config.num_tokens, model.config.latent_dim)
    torch.manual_seed(0)
    from_list = model(x, [0, 1])["loss"]
    torch.manual_seed(0)
    assert torch.equal(from_list, model(x, torch.tensor([0, 1]))["loss"])
    with pytest.raises(TypeError, match="x is torch.float64 but the MAR's weights are torch.float32"):
        model(x.double(), [0, 1])
    settings = dict(ar_steps=2, diffusion_steps=2, generator=torch.Generator().manual_seed(0))
    unconditional = model.sample([model.config.num_classes], ar_steps=2, diffusion_steps=2)  # the null class
    assert unconditional.shape == (1, model.config.num_tokens, model.config.latent_dim)
    assert torch.equal(model.sample([1], **settings),
                       model.sample(torch.tensor(1), **{**settings, "generator": torch.Generator().manual_seed(0)}))
    for labels, error, said in ((torch.tensor([0.7]), TypeError, "labels must be integer class indices"),
                                ([model.config.num_classes + 1], ValueError, r"labels must be class indices in \[0, "
                                                                               r"4\) \(3: unconditional\)"),
                                ([], ValueError, "no labels to sample"),
                                (torch.zeros(2, 2, dtype=torch.long), ValueError, r"labels has shape \(2, 2\)")):
        with pytest.raises(error, match=said):
            model.sample(labels, ar_steps=2, diffusion_steps=2)
    for bad, said in (({"ar_steps": 0}, "ar_steps must be a whole number of 1 or more, got 0"),
                      ({"diffusion_steps": 2.5}, "diffusion_steps must be a whole number"),
                      ({"temperature": float("nan")}, "cfg and temperature must be finite"),
                      ({"cfg": float("nan")}, "cfg and temperature must be finite")):
        with pytest.raises(ValueError, match=said):
            model.sample([0], **{"ar_steps": 2, "diffusion_steps": 2, **bad})


@pytest.mark.parametrize("build, said", [
    (lambda: MARConfig(heads=0).validate(), "heads must be a whole number of 1 or more, got 0"),  # ZeroDivisionError
    (lambda: MARConfig(width="32").validate(), "width must be an integer, got '32'"),  # a % format error
    (lambda: MARConfig(mlp_ratio=0).validate(), "mlp_ratio must be positive"),
    (lambda: MARConfig(diffusion_steps=0).validate(), "diffusion_steps must be a whole number of 1 or more"),
    (lambda: MARConfig(mlp_ratio=float("nan")).validate(), "mlp_ratio must be a finite number"),
    (lambda: mar_config("B", num_token=3), "unknown MAR config key num_token; valid keys: "),
    (lambda: mar_config("B", num_tokens="3"), "num_tokens must be an integer, got '3'"),
])
def test_mar_configs_name_bad_fields(build, said):
    with pytest.raises(ValueError, match=said):  # ConfigTypeError is a ValueError too, for the command line
        build()


def test_a_numpy_input_is_named():
    import numpy as np

    model = tiny()
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray"):  # was "has no attribute 'dim'"
        model.check_input(np.zeros((1, *model.input_shape), np.float32))


def test_the_diffusion_head_trains_on_every_step_including_the_first():
    """t ~ U{0, ..., T−1} (MAR's DiffLoss, from DiT's training loop): step 0 holds the hybrid loss's
    decoder NLL term."""
    torch.manual_seed(0)
    head = DiffusionLoss(4, 8, 16, 1, "cosine", 10)
    seen, losses = [], head.diffusion.training_losses
    head.diffusion.training_losses = lambda f, x, t: (seen.append(t), losses(f, x, t))[1]
    head(torch.randn(500, 4), torch.randn(500, 8))
    assert set(seen[0].tolist()) == set(range(10))
