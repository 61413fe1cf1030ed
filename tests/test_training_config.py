"""Training configuration (YAML, inheritance, overrides, strict keys), the bundled experiment
configs, and the small pieces of the recipe: lr schedule, weight-decay groups, EMA."""

from __future__ import annotations

import dataclasses
import math

import re
from typing import Literal

import pytest
import torch
from torch import nn

from softvq.bottlenecks.factory import build_bottleneck
from softvq.cli.main import main
from softvq.tokenizer import Tokenizer
from softvq.typed_config import ConfigTypeError, typed_value
from softvq.training.config import (
    CONFIG_DIR, anchor_paths, load_config, parse_override, read_yaml_tree, save_config,
)
from softvq.training.ema import EMA
from softvq.training.optim import build_optimizer, param_groups
from softvq.training.schedule import lr_factor, scaled_lr

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_default_config_is_the_cpu_demo():
    cfg = load_config()
    assert cfg.data.source == "bundled" and cfg.model_preset == "softvq-tiny"
    assert cfg.schedule.precision == "auto" and cfg.run.max_minutes is not None


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_bundled_config_loads_and_its_bottleneck_builds(name):
    cfg = load_config(name)
    if cfg.model.bottleneck.codebook_size <= 16384:
        bottleneck = build_bottleneck(cfg.model.bottleneck)
        assert bottleneck.latent_dim == cfg.model.bottleneck.latent_dim


def test_paper_recipe_defaults():
    cfg = load_config("softvq-s-64")
    s, o, obj = cfg.schedule, cfg.optim, cfg.objective
    assert (s.steps, s.batch_size, s.warmup_steps, s.ema_decay) == (250_000, 256, 5_000, 0.9999)
    assert (o.name, o.lr, o.betas, o.weight_decay, o.grad_clip) == ("adamw", 1e-4, [0.9, 0.95], 1e-4, 1.0)
    assert (obj.perceptual_weight, obj.adversarial_weight, obj.alignment_weight, obj.bottleneck_weight) == (
        1.0, 0.2, 0.1, 0.01)
    assert cfg.model == load_config("paper", ["model.preset=softvq-s-64"]).model


def test_ablation_configs_change_only_their_field():
    base = load_config("ablation-base")
    # The K, L/D and tau sweeps start from "+ PQ (G=4)": their K=8192, 64/32, tau=0.07 entries repeat
    # its rFID 1.03 in supp. Tab. 6, not the base's 1.33.
    plain = base.model.bottleneck
    pq4 = dataclasses.replace(plain, groups=4)
    expected = {"ablation-pq4": (plain, {"groups": 4}), "ablation-rpq4": (plain, {"groups": 4, "residual_levels": 2}),
                "ablation-gmmvq": (plain, {"kind": "gmmvq"}),
                "ablation-k512": (pq4, {"codebook_size": 512}), "ablation-k8192": (pq4, {}),
                "ablation-tau-learnable": (pq4, {"learnable_temperature": True}), "ablation-tau-0.07": (pq4, {}),
                # supp. Tab. 5: the same SoftVQ-S-64 plus one of VQ's losses, weighted by the same objective
                "supp-tab5-codebook": (plain, {"codebook_loss": True}), "supp-tab5-commit": (plain, {"commit_loss": True})}
    for name, (parent, change) in expected.items():
        cfg = load_config(name)
        assert cfg.model.bottleneck == dataclasses.replace(parent, **change), name
        # VQ's losses as the released code reduces them (over tokens and channels), as in tab3-vq
        reduction = "element_mean" if name.startswith("supp-tab5") else "token_sum"
        assert cfg.objective == dataclasses.replace(base.objective, vq_loss_reduction=reduction), name
        assert cfg.schedule == base.schedule
    ld = load_config("ablation-ld-32x128")
    assert (ld.model.num_tokens, ld.model.bottleneck.latent_dim, ld.model.bottleneck.groups) == (32, 128, 4)
    vq = load_config("tab3-vq-s-32")
    assert (vq.model.bottleneck.kind, vq.model.num_tokens, vq.model.bottleneck.latent_dim) == ("vq", 32, 64)
    assert vq.objective.vq_loss_reduction == "element_mean"  # the same weight against the reconstruction at every D
    # KL-S: the released code's 1e-6 on a token-summed KL; ours averages over the L tokens
    for tokens in (32, 256):
        kl = load_config(f"tab3-kl-s-{tokens}")
        assert kl.model.bottleneck.kind == "kl"
        assert kl.objective.bottleneck_loss_weights == {"kl": pytest.approx(1e-6 * tokens)}


def test_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {preset: softvq-tiny}\noptim: {lr: 1e-4, weight_decay: 0.5}\n")
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\noptim: {lr: 2e-4}\nschedule: {steps: 7}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=3e-4", "model.bottleneck.kind=ae", "data.holdout=[coffee]"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.5 and cfg.schedule.steps == 7
    assert cfg.model.bottleneck.kind == "ae" and cfg.model.encoder.width == 96 and cfg.data.holdout == ["coffee"]
    assert parse_override("optim.lr=2e-4") == (["optim", "lr"], 2e-4)  # YAML 1.1 would read a string
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    # a section given whole merges, as a child config's does (it used to put the library's
    # defaults, batch 256 and a 5000-step warm-up, under every key it left out)
    merged = load_config(tmp_path / "child.yaml", ["optim={lr: 5e-4}", "schedule={warmup_steps: 3}"])
    assert merged.optim.lr == 5e-4 and merged.optim.weight_decay == 0.5
    assert merged.schedule.steps == 7 and merged.schedule.warmup_steps == 3
    (tmp_path / "empty-model.yaml").write_text("inherit: parent.yaml\nmodel:\n")
    with pytest.raises(ValueError, match="config section model is empty"):
        load_config(tmp_path / "empty-model.yaml")  # was: the library's default model, silently
    # over a saved config.yaml (every model field spelled out) another preset only renamed the model
    with pytest.raises(ValueError, match="model.preset=softvq-s-64: this config spells out every model field"):
        load_config(tmp_path / "resolved.yaml", ["model.preset=softvq-s-64"])
    assert load_config(tmp_path / "resolved.yaml", ["model.preset=softvq-tiny"]) == cfg  # the same one: fine
    assert load_config(tmp_path / "child.yaml", ["model.preset=softvq-s-64"]).model.encoder.width == 384


def test_anchor_paths_makes_only_local_relative_paths_absolute(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "dinov2").mkdir()  # a clone of the DINOv2 repository, say: the keyword stays a keyword
    cfg = load_config(None, ["data.source=folder", "data.path=imgs", "data.eval_path=missing",
                             "run.init_from=someone/softvq-s-64"])
    anchored = anchor_paths(cfg, tmp_path)
    assert anchored.data.path == str(tmp_path / "imgs")
    # absent paths and hub names stay as given; the input config is not changed
    assert (anchored.data.eval_path, anchored.run.init_from) == ("missing", "someone/softvq-s-64")
    assert anchor_paths(load_config(None, ["run.init_encoder=dinov2"]), tmp_path).run.init_encoder == "dinov2"
    assert cfg.data.path == "imgs"
    shards = load_config(None, ["data.source=shards", "data.path=shards/train-{000..009}.tar"])
    assert anchor_paths(shards, tmp_path).data.path == str(tmp_path / "shards" / "train-{000..009}.tar")
    url = load_config(None, ["data.source=shards", "data.path=https://host/train-{0..9}.tar"])
    assert anchor_paths(url, tmp_path).data.path == "https://host/train-{0..9}.tar"
    (tmp_path / "release").mkdir()  # run.init_from=official:FOLDER: the folder after the prefix is anchored
    release = load_config(None, ["run.init_from=official:release"])
    assert anchor_paths(release, tmp_path).run.init_from == f"official:{tmp_path / 'release'}"
    hub = load_config(None, ["run.init_from=official:SoftVQVAE/softvq-b-64"])
    assert anchor_paths(hub, tmp_path).run.init_from == "official:SoftVQVAE/softvq-b-64"
    listed = load_config(None, ["data.source=shards", "data.path='shards/a-{0,1}.tar, https://host/b.tar,shards/c.tar'"])
    assert anchor_paths(listed, tmp_path).data.path == ",".join([  # each part, as expand_shards reads them
        str(tmp_path / "shards" / "a-{0,1}.tar"), "https://host/b.tar", str(tmp_path / "shards" / "c.tar")])
    assert anchor_paths(anchored, tmp_path / "shards") == anchored  # already absolute


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "optim.lrr"),
    (["model.bottleneck.knd=vq"], "model.bottleneck.knd"),
    (["traning.steps=3"], "traning"),
    (["schedule.steps=many"], "schedule.steps must be an integer"),
    (["schedule.steps=.inf"], "schedule.steps must be an integer"),  # not an OverflowError
    (["schedule.steps=true"], "schedule.steps must be an integer"),
    (["run.progress=1"], "run.progress must be true or false"),
    (["model.bottleneck.kind=pq"], "model.bottleneck.kind='pq' is not one of"),
    (["objective.reconstruction=l3"], "objective.reconstruction"),
    (["optim.lr"], "must look like section.key=value"),
    (["model_preset=softvq-s-32"], "model.preset=softvq-tiny and model_preset=softvq-s-32 disagree"),
    (["model.patch_size=0"], "patch_size must be positive, got 0"),  # was a ZeroDivisionError
    (["model.encoder.heads=0"], "model.encoder.width and model.encoder.heads must be positive"),
    # the model's keys are named in full, its fix too (was "set bottleneck.codebook_loss=false")
    (["model.bottleneck.kind=vq", "model.bottleneck.codebook_loss=true"],
     "always returns it; set model.bottleneck.codebook_loss=false"),
    (["optim.lr=-1"], "optim.lr must be positive, got -1"),
    (["data.workers=-1"], "data.workers must be 0 or more"),
    # accepted once, and then: gradient ascent (torch flips the sign for a negative clip), every
    # step skipped while the run reported "finished", a typo'd loss weight ignored, a torch error
    (["optim.grad_clip=-1"], "optim.grad_clip must be positive, or 0 / null for no clipping"),
    (["model.bottleneck.kind=lfq", "model.bottleneck.entropy_temperature=0"], "entropy_temperature must be a positive"),
    (["model.bottleneck.chunk_size=-1"], "bottleneck.chunk_size must be None (auto)"),
    (["objective.bottleneck_loss_weights={kll: 5.0}"], "bottleneck_loss_weights has no loss 'kll'; bottlenecks return kl,"),
    (["objective.bottleneck_loss_weights={kl: abc}"], "objective.bottleneck_loss_weights.kl must be a finite number, got 'abc'"),
    # inf and nan passed every range check: a run of skipped steps, or "finished" with Adam's updates at zero
    (["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["optim.eps=.inf"], "optim.eps must be a finite number, got inf"),
    (["objective.bottleneck_weight=.nan"], "objective.bottleneck_weight must be a finite number, got nan"),
    (["model.encoder.layerscale_init=.nan"], "model.encoder.layerscale_init must be a finite number, got nan"),
    # an empty model section meant the library's defaults (256 px, width 384), silently
    (["model="], "config section model is empty; give it settings"),
    # a weight for a loss the chosen bottleneck never returns: accepted, saved in config.yaml, no effect
    (["objective.bottleneck_loss_weights={codebook: 1.0}"],
     "objective.bottleneck_loss_weights.codebook weights the 'codebook' loss, which model.bottleneck (kind 'softvq') "
     "never returns, so it would do nothing; this bottleneck returns kl: set model.bottleneck.codebook_loss=true"),
    (["model.bottleneck.kind=vq", "objective.bottleneck_loss_weights={kl: 1.0}"],
     "this bottleneck returns codebook, commit: remove objective.bottleneck_loss_weights.kl, or choose"),
    (["objective.commit_weight=0.5"], "objective.commit_weight weights the 'commit' loss, which model.bottleneck"),
    (["model.bottleneck.kind=ae", "objective.codebook_weight=2"], "this bottleneck returns no losses: remove"),
    (["model=softvq-s-64"], "did you mean model.preset=softvq-s-64?"),
    (["data.num_eval_images=0"], "data.num_eval_images must be 1 or more, got 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay must be 0 or more, got -1"),
    (["schedule.warmup_steps=-5"], "schedule.warmup_steps must be 0 or more"),
    (["optim.betas=[1.5, 0.9]"], "optim.betas needs two numbers in [0, 1), got [1.5, 0.9]"),
    (["run.log_every=-1"], "run.log_every must be 0 or more"),
    (["data.min_crop_fraction=0"], "data.min_crop_fraction must be in (0, 1]"),
    # NumPy's "expected non-negative integer" at the first step, after config.yaml, grids/, log.jsonl
    (["schedule.seed=-1"], "schedule.seed must be 0 or more and below 2**63, got -1"),
    (["schedule.seed=18446744073709551616"], "schedule.seed must be 0 or more and below 2**63"),
    # the model's own checks name the whole key too
    (["model.bottleneck.codebook_size=0"], "model.bottleneck.codebook_size must be at least 1, got 0"),
    (["model.image_size=60"], "model.image_size 60 is not a multiple of model.patch_size 8"),
    (["run.name=''"], "run.name must be a folder name under runs/ (not empty, no '/'; -o chooses any folder), got ''"),
    (["run.name=a/b"], "run.name must be a folder name under runs/"),
    # at the first discriminator step (the paper's step 20,000) it failed after the run folder was made
    (["model.image_size=16", "objective.adversarial_weight=0.1", "objective.discriminator=patchgan"],
     "objective.discriminator patchgan needs images of at least 24 px, but they are 16 px"),
    # Eq. 5's repetition needs L | N: it failed at the first step, after the run folder was made;
    # 96 px is the next size whose 12 x 12 patches 48 tokens divide
    (["model.num_tokens=48", "objective.alignment_weight=0.1"],
     "the 64 patches of a 64 px image (Eq. 5), which needs a multiple of 48: use model.image_size=96,"),
    # λ4 and β changed for a bottleneck without the loss they weigh: saved, and silently nothing
    (["model.bottleneck.kind=vq", "objective.bottleneck_weight=0.5"],
     "objective.bottleneck_weight weights the 'kl' or 'entropy' losses, which model.bottleneck (kind 'vq') never"),
    (["model.bottleneck.kind=kl", "model.bottleneck.commitment_weight=0.5"],
     "model.bottleneck.commitment_weight weights the 'commit' loss, which model.bottleneck (kind 'kl') never"),
])
def test_bad_keys_and_values_fail_naming_them(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("demo", overrides)


@pytest.mark.parametrize("overrides", [
    ["model.bottleneck.codebook_loss=true", "objective.bottleneck_loss_weights={codebook: 2.0}"],
    ["model.bottleneck.commit_loss=true", "objective.commit_weight=0.5"],
    ["model.bottleneck.kind=vq", "objective.codebook_weight=0.5", "objective.commit_weight=0.1"],
    ["model.bottleneck.kind=lfq", "objective.bottleneck_loss_weights={entropy: 0.1, commit: 0.2}"],
    ["objective.codebook_weight=1.0", "objective.bottleneck_loss_weights={kl: 0.5}"],  # Eq. 2's default: unchanged
    ["model.bottleneck.kind=lfq", "objective.bottleneck_weight=0.5", "model.bottleneck.commitment_weight=0.5"],
    ["model.bottleneck.kind=ae", "objective.bottleneck_weight=0"],  # λ4 = 0: the usual "off", not a weight
])
def test_weights_of_losses_the_bottleneck_returns_are_accepted(overrides, tmp_path):
    cfg = load_config("demo", overrides)
    save_config(cfg, tmp_path / "resolved.yaml")  # and read back, as --resume does
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("content, message", [
    (b"", "is empty; a config names at least its model"),  # not silently the 256 px defaults
    (b"model: {preset: softvq-tiny\nschedule: [", r"is not valid YAML \(line \d+: "),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not a text file"),
])
def test_unreadable_config_files_fail_in_one_line(tmp_path, content, message):
    (tmp_path / "x.yaml").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_config(tmp_path / "x.yaml")
    assert "\n" not in str(error.value)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # plain YAML keeps the second lr silently: the user who edited the first would train with the other
    (tmp_path / "x.yaml").write_text("model: {preset: softvq-tiny}\noptim:\n  lr: 1e-4\n  lr: 2e-4\n")
    with pytest.raises(ValueError, match=r"line 4: key 'lr' appears twice in one mapping \(first on line 3\)"):
        load_config(tmp_path / "x.yaml")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "x.yaml").write_text("model: {preset: softvq-tiny}\nbase: &b {lr: 1e-4, warmup_steps: 3}\n"
                                     "optim:\n  <<: *b\n  lr: 2e-4\n")
    tree = read_yaml_tree(tmp_path / "x.yaml")
    assert tree["optim"] == {"lr": 2e-4, "warmup_steps": 3}
    # a merged mapping used again by its alias: its merged key beside its own override is no duplicate
    (tmp_path / "y.yaml").write_text("b: &b {x: 1}\nm: {<<: &d {<<: *b, x: 5}, y: 1}\no: *d\n")
    assert read_yaml_tree(tmp_path / "y.yaml")["o"] == {"x": 5}


def test_an_override_that_is_not_yaml_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"override 'model.bottleneck=\{kind: kl, kind: vq\}': its value is not "
                                         r"valid YAML \(key 'kind' appears twice"):
        load_config("demo", ["model.bottleneck={kind: kl, kind: vq}"])


def test_a_missing_parent_config_names_the_file_that_inherits_it(tmp_path):
    (tmp_path / "x.yaml").write_text("inherit: nothere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"x.yaml inherits 'nothere.yaml', which is not next to it: config"):
        load_config(tmp_path / "x.yaml")


def test_python_callers_get_type_errors_that_say_what_to_pass(tmp_path):
    from softvq.training.trainer import Trainer

    with pytest.raises(TypeError, match=r"overrides is a list of 'key=value' strings; pass \['schedule.steps=5'\]"):
        load_config("demo", "schedule.steps=5")  # was read letter by letter: "override 's' must look like"
    with pytest.raises(TypeError, match="config must be a TrainConfig, got dict; make one with"):
        Trainer({"model": {"preset": "softvq-tiny"}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_yaml_key_fails_with_its_dotted_name(tmp_path):
    (tmp_path / "x.yaml").write_text("data:\n  source: bundled\n  worker: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key data\.worker; valid keys under data: .*workers"):
        load_config(tmp_path / "x.yaml")


def test_cli_reports_unknown_key_in_one_line(capsys):
    assert main(["train", "optim.betaz=[0.9,0.9]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softvq train: error: unknown config key optim.betaz") and "\n" not in err
    assert main(["train", "--list"]) == 0
    assert "softvq-bl-64" in capsys.readouterr().out


def test_cli_takes_overrides_after_an_option(tmp_path, capsys):
    """``train CONFIG -o DIR key=value``: argparse alone would stop the list at ``-o``."""
    # A bad key after the option reaches the config loader, which names it.
    assert main(["train", "demo", "-o", str(tmp_path / "run"), "optim.betaz=[0.9,0.9]"]) == 2
    assert "unknown config key optim.betaz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # an unknown option is still argparse's error
        main(["train", "demo", "-o", str(tmp_path / "run"), "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["info", "softvq-tiny", "extra"]) == 2  # and other commands take no stray words
    assert "unexpected argument 'extra'" in capsys.readouterr().err


def test_lr_schedule_warmup_cosine_and_batch_scaling():
    f = lambda s: lr_factor(s, total_steps=110, warmup_steps=10)  # noqa: E731
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(50, total_steps=100, warmup_steps=0, kind="constant") == 1.0
    assert lr_factor(100, total_steps=100, warmup_steps=0, min_ratio=0.1) == pytest.approx(0.1)
    assert scaled_lr(1e-4, 512) == pytest.approx(2e-4) and scaled_lr(1e-4, 512, scale=False) == 1e-4


def test_weight_decay_only_on_weight_matrices():
    tok = Tokenizer.from_preset("softvq-tiny")
    groups = {g["name"]: g for g in param_groups(tok.named_parameters(), 1e-4)}
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    named = dict(tok.named_parameters())
    no_decay = [n for n, p in named.items() if id(p) in ids(groups["no_decay"])]
    decay = [n for n, p in named.items() if id(p) in ids(groups["decay"])]
    assert "bottleneck.codebook" in no_decay and "encoder.pos_embed" in no_decay
    assert "encoder.latent_tokens" in no_decay and "decoder.mask_token" in no_decay
    assert "encoder.norm.weight" in no_decay and "encoder.blocks.0.attn.qkv.bias" in no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoder.to_pixel.weight" in decay
    assert len(no_decay) + len(decay) == len(named) and groups["no_decay"]["weight_decay"] == 0.0
    # AdamW decays weights only; the release's Adam adds the decay to every gradient.
    adam = build_optimizer(tok.named_parameters(), name="adam", lr=1.0, betas=[0.9, 0.95], weight_decay=0.1)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 0.1


def test_ema_matches_the_formula_and_swaps_back():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    expected = start.clone()
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * value
    trained = model.weight.detach().clone()
    with ema.swapped_into(model):
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, trained)
    warm = EMA(model, decay=0.9999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    warm.num_updates = 10**6
    assert warm.current_decay() == 0.9999


def test_wetok_configs_are_gq_then_a_generative_decoder_from_its_export():
    gq = load_config("wetok-gq-s-64")
    b = gq.model.bottleneck
    assert (b.kind, b.latent_dim, b.lfq_groups, b.latent_dim // b.lfq_groups) == ("lfq", 32, 4, 8)  # WeTok Tab. 9
    assert gq.objective.vq_loss_reduction == "element_mean"  # LFQ's commit loss as its implementations average it
    gd = load_config("wetok-gd-s-64")
    assert gd.model.decoder_noise_dim == 8 and gd.model.bottleneck == b
    assert (gd.run.init_from, gd.run.init_encoder) == ("runs/wetok-gq-s-64/export", None)
    # stage 2 is a run from step 0: WeTok Tab. 10's constant lr without warm-up, and the GAN that gives the
    # noise its use (Eq. 11) on from the start instead of after the recipe's 20k steps
    assert (gd.schedule.lr_schedule, gd.schedule.warmup_steps) == ("constant", 0)
    assert (gd.objective.discriminator_start, gd.objective.perceptual_warmup_steps) == (0, 0)
    assert gq.objective.discriminator_start == 20_000
    assert gd.objective.adversarial_weight == gq.objective.adversarial_weight > 0
    assert gd.optim == gq.optim and gd.schedule == gq.schedule  # Tab. 10 repeats Tab. 9's recipe
    # WeTok's ablation recipe (Sec. 4 Settings, supp. Tabs. 6-8, 11-16), not SoftVQ's AdamW + warm-up + cosine
    o, sched = gq.optim, gq.schedule
    assert (o.name, tuple(o.betas), o.weight_decay, o.lr, o.scale_lr) == ("adam", (0.5, 0.9), 0.0, 1e-4, False)
    assert (o.disc_betas, o.disc_weight_decay, o.disc_lr) == (None, None, None)  # the discriminator's Adam too
    assert (sched.lr_schedule, sched.warmup_steps, sched.batch_size, sched.steps) == ("constant", 0, 128, 250_250)
    # Fig. 3: one compression (d = 16 bits), three ways to factorise the entropy; Fig. 4: g groups of d' = 8
    for name, groups, bits in (("fig3-lfq", 1, 16), ("fig3-bsq", 16, 1), ("fig3-gq", 2, 8), ("fig4-g1", 1, 8),
                               ("fig4-g8", 8, 8), ("fig4-g32", 32, 8)):  # supp. A.1 sweeps g up to 32
        cfg = load_config(f"wetok-{name}")
        b = cfg.model.bottleneck
        assert (b.kind, b.lfq_groups, b.latent_dim // b.lfq_groups, b.latent_dim) == ("lfq", groups, bits, groups * bits)
        assert cfg.objective == gq.objective and cfg.model.encoder == gq.model.encoder, name
        assert cfg.optim == gq.optim and cfg.schedule == gq.schedule, name


@pytest.mark.parametrize("overrides, unread", [
    (["model.bottleneck.kind=kl", "model.bottleneck.temperature=0.5"],
     ["model.bottleneck.distance", "model.bottleneck.temperature"]),  # demo.yaml chose the cosine distance
    (["model.preset=softvq-s-64", "model.bottleneck.kind=kl"], []),  # the preset's own values are not the user's
    (["model.bottleneck.kind=vq", "model.bottleneck.segment_entropy=per_segment", "model.bottleneck.lfq_groups=2"],
     ["model.bottleneck.lfq_groups", "model.bottleneck.segment_entropy"]),
    (["model.bottleneck.kind=lfq", "model.bottleneck.entropy_temperature=0.1"], ["model.bottleneck.distance"]),
    (["model.bottleneck.temperature=0.5", "model.bottleneck.chunk_size=64"], []),
    (["model.bottleneck.commit_loss=true", "model.bottleneck.commitment_weight=0.5"], []),  # SoftVQ's opt-in β
    (["model.bottleneck.kind=vq", "model.bottleneck.segments=2", "model.bottleneck.segment_entropy=per_segment"],
     ["model.bottleneck.segment_entropy"]),  # VQ has no entropy terms to pool
])
def test_bottleneck_settings_the_kind_never_reads_are_found(overrides, unread):
    assert load_config("demo", overrides).unread_model_keys() == unread


def test_a_short_run_is_told_which_ramps_it_ends_before():
    """Was: only the lr warm-up was named; a 2-step run of a 250k-step config logged perceptual_weight
    5e-05 and never started its GAN without a word."""
    from softvq.training.trainer import late_ramps

    shrunk = load_config("wetok-gq-s-64", ["schedule.steps=2"])
    notes = late_ramps(shrunk)
    assert len(notes) == 2 and "schedule.warmup_steps" not in " ".join(notes)  # WeTok's recipe has no lr warm-up
    assert notes[0].startswith("warning: objective.perceptual_warmup_steps 10000 is not shorter than schedule.steps 2: "
                               "LPIPS never reaches its weight 1")
    assert notes[1].startswith("warning: objective.discriminator_start 20000 is not before schedule.steps 2: the GAN "
                               "never starts")
    assert late_ramps(load_config("paper", ["schedule.steps=30000"])) == []
    assert len(late_ramps(load_config("paper", ["schedule.steps=3000"]))) == 3
    assert late_ramps(load_config("paper", ["schedule.steps=3000", "objective.adversarial_weight=0",
                                            "objective.perceptual_weight=0", "schedule.warmup_steps=10"])) == []


def test_the_cosine_floor_scales_the_whole_curve_not_only_its_end():
    """lr = min_ratio + (1 − min_ratio) · ½(1 + cos(π t)): the floor is reached at the end, and the
    start and the middle sit on the scaled curve (at t = 1 alone the two forms agree)."""
    factor = lambda step: lr_factor(step, total_steps=100, warmup_steps=0, min_ratio=0.1)
    assert factor(0) == pytest.approx(1.0) and factor(50) == pytest.approx(0.55) and factor(100) == pytest.approx(0.1)


def test_adamw_takes_the_betas_in_their_order():
    optimizer = build_optimizer(nn.Linear(3, 3).named_parameters(), name="adamw", lr=1e-4, betas=[0.9, 0.95],
                                weight_decay=1e-4)
    assert [group["betas"] for group in optimizer.param_groups] == [(0.9, 0.95), (0.9, 0.95)]


def test_a_union_without_none_refuses_null():
    """None is refused for a union without None, taken for an optional one."""
    with pytest.raises(ConfigTypeError, match="k must be an integer, got None"):
        typed_value(int | str, None, "k")
    assert typed_value(int | None, None, "k") is None


def test_a_bad_choice_in_an_optional_literal_is_a_config_type_error():
    """A bad choice for an optional Literal is a ConfigTypeError naming the choices."""
    with pytest.raises(ConfigTypeError, match=r"k='c' is not one of 'a', 'b'"):
        typed_value(Literal["a", "b"] | None, "c", "k")
    assert typed_value(Literal["a", "b"] | None, "b", "k") == "b"


def test_a_bad_list_item_is_named_by_its_zero_based_index():
    """A bad list item is named by its zero-based index, as in the YAML."""
    from softvq.training.config import load_config

    with pytest.raises(ValueError, match=re.escape("optim.betas[1] must be a finite number, got 'fast'")):
        load_config("demo", ["optim.betas=[0.9, fast]"])


def test_a_python_caller_may_give_a_tuple_for_a_list_field():
    """A Python caller may give a tuple for a list field."""
    from softvq.training.config import config_from_dict
    from tests.test_training_run import tiny_tree

    cfg = config_from_dict(tiny_tree(optim={"betas": (0.8, 0.9)}))
    assert cfg.optim.betas == [0.8, 0.9]
