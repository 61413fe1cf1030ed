"""DiT / SiT backbone: shapes, adaLN-Zero identity at init, label dropout, size and FLOPs vs paper Tab. 1."""

import pytest
import torch

from softvq.generation.embeddings import LabelEmbedder, sincos_grid, sincos_sequence
from softvq.generation.flops import analytic_macs, count_macs, repa_projector_macs
from softvq.generation.models import GeneratorConfig, build_generator, generator_config


def tiny(kind="sit", **kw):
    base = dict(kind=kind, width=32, depth=2, heads=4, num_tokens=8, latent_dim=6, num_classes=5)
    base.update(kw)
    return GeneratorConfig(**base)


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    model = build_generator(tiny())
    block = model.blocks[0]
    x, c = torch.randn(3, 8, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    # and it stops being the identity once the modulation is non-zero
    torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    assert not torch.allclose(block(x, c), x)


def test_zero_initialised_head_outputs_zero_and_shapes():
    torch.manual_seed(0)
    for kind, channels in (("sit", 6), ("dit", 12)):
        model = build_generator(tiny(kind))
        out = model(torch.randn(2, 8, 6), torch.rand(2), torch.tensor([0, 4]))
        assert out.shape == (2, 8, channels)
        assert torch.count_nonzero(out) == 0
    grid = build_generator(tiny("dit", layout="2d", grid=8, patch_size=2, latent_dim=4))
    assert grid(torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 2])).shape == (2, 8, 8, 8)


def test_bad_input_shape_names_the_expected_shape():
    model = build_generator(tiny())
    with pytest.raises(ValueError, match=r"\(B, 8, 6\)"):
        model(torch.randn(2, 8, 7), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class labels"):
        model(torch.randn(2, 8, 6), torch.rand(2), torch.tensor([0, 9]))


def test_forward_takes_a_number_for_t_a_list_or_int_for_y_and_names_a_dtype_mismatch():
    torch.manual_seed(0)
    model = build_generator(tiny()).eval()
    for block in model.blocks:  # out of adaLN-Zero's identity, so that t and y change the output
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    for layer in (model.final.linear, model.final.modulation[-1]):
        torch.nn.init.normal_(layer.weight, std=0.1)
    x = torch.randn(2, 8, 6)
    expected = model(x, torch.full((2,), 0.5), torch.tensor([3, 3]))
    assert torch.equal(model(x, 0.5, [3, 3]), expected)  # was AttributeError: 'float' ... 'numel'
    assert torch.equal(model(x, torch.tensor(0.5), 3), expected)
    assert not torch.equal(model(x, 0.25, 3), expected)
    with pytest.raises(TypeError, match=r"x is torch.float64 but the generator's weights are torch.float32: "
                                        r"pass x.to\(torch.float32\)"):
        model(x.double(), 0.5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision takes other dtypes
        assert model(x.bfloat16(), 0.5, 3).shape == x.shape


@pytest.mark.parametrize("field, value", [("depth", 0), ("heads", 0), ("latent_dim", -1), ("num_tokens", 0)])
def test_configs_without_layers_or_channels_are_refused(field, value):
    with pytest.raises(ValueError, match=f"sizes must be positive, got {field}={value}"):
        build_generator(tiny(**{field: value}))  # depth 0 used to build a model that ignored its input
    with pytest.raises(ValueError, match="class_dropout is a probability"):
        build_generator(tiny(class_dropout=1.0))


def test_sampling_takes_integer_labels_as_a_list_and_names_other_labels_and_objectives():
    from softvq.generation.checkpoint import GeneratorMeta
    from softvq.generation.sampling import SamplerSpec, sample_latents

    model = build_generator(tiny()).eval()
    meta, spec = GeneratorMeta(objective="sit"), SamplerSpec(method="euler", steps=2)
    from_list = sample_latents(model, meta, [0, 3], spec, generator=torch.Generator().manual_seed(0))
    from_tensor = sample_latents(model, meta, torch.tensor([0, 3]), spec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_list, from_tensor)
    one = sample_latents(model, meta, 3, spec, generator=torch.Generator().manual_seed(0))  # one label, not a list
    assert torch.equal(one, sample_latents(model, meta, [3], spec, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="integer class indices, got a torch.float32"):
        sample_latents(model, meta, torch.tensor([0.0, 3.0]), spec)
    with pytest.raises(ValueError, match="unknown generator objective 'flow'"):
        sample_latents(model, GeneratorMeta(objective="flow"), [0], spec)


def test_label_dropout_uses_null_class_only_in_training():
    emb = LabelEmbedder(num_classes=3, width=4, dropout=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    emb.train()
    out = emb(labels)
    dropped = (out == emb.table.weight[3]).all(dim=1).float().mean()
    assert 0.45 < dropped < 0.55
    emb.eval()
    assert torch.equal(emb(labels), emb.table.weight[0].expand(4000, 4))
    forced = emb(torch.tensor([1, 2]), force_drop=torch.tensor([True, False]))
    assert torch.equal(forced[0], emb.table.weight[3]) and torch.equal(forced[1], emb.table.weight[2])


def test_sincos_embeddings_match_closed_form():
    pe = sincos_sequence(8, 5).double()
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    assert torch.allclose(pe, torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)], 1), atol=1e-6)
    grid = sincos_grid(8, (2, 3))  # row-major: entry 4 is row 1, column 1
    assert torch.allclose(grid[4], torch.cat([sincos_sequence(4, 2)[1], sincos_sequence(4, 3)[1]]))


def test_xl_has_about_675m_parameters():
    for kind in ("dit", "sit"):
        with torch.device("meta"):
            model = build_generator(generator_config(kind, "XL", num_tokens=64, latent_dim=32))
        assert abs(model.num_parameters() / 1e6 - 675) < 2


@pytest.mark.parametrize("kind,tokens,dim,paper", [
    ("dit", 32, 64, 14.52), ("dit", 64, 32, 28.81), ("sit", 32, 64, 14.73), ("sit", 64, 32, 29.23)])
def test_xl_gflops_within_3_percent_of_paper_table1(kind, tokens, dim, paper):
    cfg = generator_config(kind, "XL", num_tokens=tokens, latent_dim=dim)
    counted = count_macs(cfg)  # meta device: free
    # FlopCounterMode and the shape formula are independent counts of the same thing
    analytic = analytic_macs(cfg)
    assert counted.linear == analytic.linear and counted.attention == analytic.attention
    for gmacs in (counted.total / 1e9, counted.linear / 1e9):
        assert abs(gmacs / paper - 1) < 0.03
    # the convention that matches Tab. 1 to 0.3%: linear layers (+ REPA projector for the released SiT)
    matched = (counted.linear + (repa_projector_macs(cfg) if kind == "sit" else 0)) / 1e9
    assert abs(matched / paper - 1) < 0.003


@pytest.mark.parametrize("grid, dit_paper", [(32, 118.6), (64, 524.6)])  # DiT paper Tab. 4, 256 / 512 px
def test_dit_xl_2_matches_dit_paper_count(grid, dit_paper):
    cfg = generator_config("dit", "XL", layout="2d", grid=grid, latent_dim=4)
    assert abs(count_macs(cfg).total / 1e9 - dit_paper) < 0.1


def test_named_sizes_name_unknown_fields_and_the_backbone_names_float_labels():
    with pytest.raises(ValueError, match="num_token"):
        generator_config("sit", "S", num_token=16)
    model = build_generator(generator_config("sit", "S", num_tokens=4, latent_dim=2, num_classes=3))
    with pytest.raises(TypeError, match="y must be integer class indices, got a torch.float32 tensor; pass y.long"):
        model(torch.zeros(1, 4, 2), torch.zeros(1), torch.zeros(1))


def test_clipping_x0_bounds_dit_samples_and_sit_refuses_it():
    """An untrained DiT predicts ε = 0, so its first step's x̂_0 = x_T / sqrt(ᾱ_T) is ~2e4 x the noise
    under the cosine schedule (ᾱ_999 ≈ 2.4e-9): unclipped samples blow up, clipped ones cannot."""
    from softvq.generation.checkpoint import GeneratorMeta
    from softvq.generation.sampling import SamplerSpec, sample_latents

    model = build_generator(tiny("dit")).eval()
    meta = GeneratorMeta(objective="dit")
    free = sample_latents(model, meta, [0, 3], SamplerSpec(steps=10), generator=torch.Generator().manual_seed(0))
    clipped = sample_latents(model, meta, [0, 3], SamplerSpec(steps=10, clip_x0=2.0),
                             generator=torch.Generator().manual_seed(0))
    assert float(free.abs().max()) > 100
    assert float(clipped.abs().max()) < 2.5  # the last step's mean mixes a clipped x̂_0 with a near-x̂_0 x_1
    with pytest.raises(ValueError, match="a SiT generator integrates a velocity"):
        SamplerSpec(clip_x0=5.0).resolved("sit")


def test_the_backbone_refuses_t_or_y_of_another_batch_size_instead_of_stretching_the_batch():
    """x of 1 sample with y = [0, 1] returned 2 outputs, t of 3 values 3 outputs."""
    model = build_generator(generator_config("sit", "S", num_tokens=4, latent_dim=2, num_classes=3)).eval()
    x = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match=r"y has shape \(2,\): pass one class index per sample, \(1,\)"):
        model(x, 0.5, [0, 1])
    with pytest.raises(ValueError, match=r"t has shape \(3,\) for a batch of 1: pass one value per sample"):
        model(x, torch.rand(3), 0)
    two = torch.randn(2, 4, 2)
    with torch.no_grad():  # one value for all, a list, and a (B,) tensor agree
        assert torch.equal(model(two, 0.5, 1), model(two, torch.tensor([0.5, 0.5]), [1, 1]))


def test_a_generator_config_built_in_python_has_its_types_checked():
    with pytest.raises(ValueError, match="width must be an integer, got '32'"):  # was a TypeError in a comparison
        GeneratorConfig(width="32").validate()
    with pytest.raises(ValueError, match="mlp_ratio must be a finite number, got nan"):  # was accepted
        GeneratorConfig(mlp_ratio=float("nan")).validate()


def test_a_number_for_t_is_checked_against_the_generators_convention():
    """DiT takes a step index, SiT a time in [0, 1]: the other's t ran without a word."""
    x = torch.zeros(1, 4, 2)
    dit = build_generator(generator_config("dit", "S", num_tokens=4, latent_dim=2, num_classes=3)).eval()
    sit = build_generator(generator_config("sit", "S", num_tokens=4, latent_dim=2, num_classes=3)).eval()
    with pytest.raises(ValueError, match="a DiT's t is a diffusion step index 0..T-1, got 0.5"):
        dit(x, 0.5, 0)
    with pytest.raises(ValueError, match=r"a SiT's t is a time in \[0, 1\] \(0 = data\), got 500"):
        sit(x, 500, 0)
    with torch.no_grad():
        assert dit(x, 500, 0).shape[0] == sit(x, 0.5, 0).shape[0] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_building_on_a_missing_cuda_is_named():
    with pytest.raises(ValueError, match=r"device 'cuda' \(device\) asked for but CUDA is not available; build on "
                                         r"the CPU"):  # was torch's bare "Torch not compiled with CUDA enabled"
        build_generator(GeneratorConfig(width=32, depth=1, heads=2, num_tokens=4, latent_dim=2), device="cuda")
    assert build_generator(GeneratorConfig(width=32, depth=1, heads=2, num_tokens=4, latent_dim=2),
                           device="meta").num_parameters() > 0


def test_an_objective_of_another_kind_than_its_model_is_named():
    """Were shape errors inside torch: a SiT objective on a DiT, and DiT's learned-σ objective on a
    DiT built without the variance head."""
    from softvq.generation.objective import GenerationObjective, GenerationObjectiveConfig

    small = dict(width=32, depth=1, heads=2, num_tokens=4, latent_dim=2, num_classes=3)
    dit = build_generator(GeneratorConfig(kind="dit", **small))
    x, y = torch.randn(2, 4, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"a 'sit' objective on a 'dit' generator"):
        GenerationObjective(GenerationObjectiveConfig("sit"))(dit, x, y)
    plain = build_generator(GeneratorConfig(kind="dit", learn_sigma=False, **small))
    with pytest.raises(ValueError, match=r"sigma_learned=True but the DiT's variance head is absent"):
        GenerationObjective(GenerationObjectiveConfig("dit"))(plain, x, y)
    loss = GenerationObjective(GenerationObjectiveConfig("dit"), sigma_learned=False)(plain, x, y)["loss"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_force_drop_replaces_exactly_the_chosen_labels_by_the_null_class(layout):
    """LatentTransformer.forward's force_drop (B,) bool: those samples see the null class."""
    from softvq.generation.models import GeneratorConfig, build_generator

    torch.manual_seed(0)
    extra = {"grid": 4, "patch_size": 2} if layout == "2d" else {"num_tokens": 8}
    model = build_generator(GeneratorConfig(kind="sit", layout=layout, width=32, depth=1, heads=2, latent_dim=4,
                                            num_classes=3, class_dropout=0.1, **extra)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, *model.input_shape)
    t = torch.tensor([0.3, 0.6])
    dropped = model(x, t, torch.tensor([1, 2]), force_drop=torch.tensor([True, False]))
    expected = model(x, t, torch.tensor([3, 2]))
    assert torch.allclose(dropped, expected, atol=1e-6)
    assert not torch.allclose(dropped, model(x, t, torch.tensor([1, 2])), atol=1e-4)
