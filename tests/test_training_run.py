"""End-to-end training runs on tiny models (32 px, width 32): exact resume after a crash and after
Ctrl-C, non-finite losses, a folder with bad files, the run folder's contents."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from softvq.checkpoint.pretrained import CheckpointError
from softvq.losses.objective import TokenizerObjective
from softvq.tokenizer import Tokenizer
from softvq.training.checkpointing import list_checkpoints
from softvq.training.config import config_from_dict, load_config
from softvq.training.logging import read_log
from softvq.training.schedule import lr_factor
from softvq.training.trainer import NonFiniteLossError, Trainer

torch.set_num_threads(1)


def tiny_tree(**sections):
    tree = {
        "model": {"image_size": 32, "patch_size": 8, "num_tokens": 8,
                  "encoder": {"width": 32, "depth": 1, "heads": 2},
                  "decoder": {"width": 32, "depth": 1, "heads": 2},
                  "bottleneck": {"kind": "softvq", "latent_dim": 4, "codebook_size": 32, "distance": "l2"}},
        "objective": {"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0},
        "data": {"source": "bundled", "workers": 0, "num_eval_images": 4, "bundled_crops_per_photo": 4},
        "schedule": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "ema_decay": 0.9},
        "optim": {"lr": 3e-3, "scale_lr": False},
        "run": {"log_every": 1, "checkpoint_every": 3, "grid_every": 0, "eval_lpips": False,
                "tensorboard": False, "progress": False},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def gan_tree(**sections):
    """GAN on from step 2 with a PatchGAN and DiffAugment: random draws and a second optimizer."""
    return tiny_tree(objective={"adversarial_weight": 0.2, "discriminator": "patchgan", "discriminator_start": 2,
                                "diffaug": True, "consistency_weight": 4.0, "lecam_weight": 0.001}, **sections)


class Sabotage(TokenizerObjective):
    """The real objective, plus a side effect at chosen steps (crash, Ctrl-C, NaN)."""

    def __init__(self, cfg, tokenizer, *, crash_at=None, sigint_at=None, nan_at=(), snapshots=None,
                 interrupt_at=None, blow_up_at=None):
        super().__init__(cfg, tokenizer)
        object.__setattr__(self, "tok", tokenizer)
        self.crash_at, self.sigint_at, self.nan_at, self.snapshots = crash_at, sigint_at, set(nan_at), snapshots
        self.interrupt_at, self.blow_up_at = interrupt_at, blow_up_at

    def generator_loss(self, images, out, step, **kwargs):
        if self.snapshots is not None:
            self.snapshots[step] = {k: v.detach().clone() for k, v in self.tok.state_dict().items()}
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        if step == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if step == self.interrupt_at:  # a second Ctrl-C ("stop at once") before the step's update
            raise KeyboardInterrupt
        if step == self.blow_up_at:  # what a finite-loss step with a huge lr does to the weights
            with torch.no_grad():
                next(self.tok.parameters()).fill_(float("inf"))
        loss, logs = super().generator_loss(images, out, step, **kwargs)
        if step in self.nan_at:
            loss = loss * float("nan")
        return loss, logs


def factory(**kwargs):
    return lambda cfg, tok: Sabotage(cfg.objective, tok, **kwargs)


def losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in read_log(run_dir) if key in r}


def exported(run_dir):
    return Tokenizer.from_pretrained(run_dir / "export").state_dict()


def test_straight_run_writes_everything_and_resume_after_crash_and_ctrl_c_is_exact(tmp_path):
    cfg = config_from_dict(gan_tree())
    straight = Trainer(cfg, tmp_path / "straight").fit()
    assert straight.status == "finished" and straight.step == 6
    run = tmp_path / "straight"
    for name in ("config.yaml", "log.jsonl", "metrics.json", "export/config.json", "export/model.safetensors"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg  # the saved config is the resolved one
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["psnr"]) and metrics["step"] == 6 and metrics["weights"] == "ema"
    assert read_log(run)[-1]["heldout/psnr"] == metrics["psnr"]  # the end's grid, in the last step's record
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003.pt", "step-00000006.pt"]
    reference = losses(run)
    reference_d = losses(run, "d/loss")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and sorted(reference_d) == [3, 4, 5, 6]
    temperature = losses(run, "bottleneck/temperature")  # the bottleneck's metrics reach the log too
    assert sorted(temperature) == sorted(reference) and all(0 < t < 1 for t in temperature.values())

    # A hard crash during step index 4: the periodic checkpoint at step 3 is what survives.
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, crashed, objective_factory=factory(crash_at=4)).fit()
    assert [p.name for p in list_checkpoints(crashed)] == ["step-00000003.pt"]
    Trainer(cfg, crashed, resume=True).fit()

    # Ctrl-C during step index 1: the step finishes, a checkpoint at step 2 is written.
    interrupted = tmp_path / "interrupted"
    result = Trainer(cfg, interrupted, objective_factory=factory(sigint_at=1)).fit()
    assert result.status == "interrupted" and result.step == 2
    assert [p.name for p in list_checkpoints(interrupted)] == ["step-00000002.pt"]
    assert not (interrupted / "export").exists()
    Trainer(cfg, interrupted, resume=True).fit()

    for run_dir in (crashed, interrupted):
        # the crashed run's step 4, logged after its checkpoint, is not there twice
        assert [r["step"] for r in read_log(run_dir)] == [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
        assert losses(run_dir) == reference, run_dir.name  # same losses, bit for bit
        assert losses(run_dir, "d/loss") == reference_d
        final, expected = exported(run_dir), exported(run)
        assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_the_export_and_the_checkpoint_hold_the_ema_of_the_steps_weights(tmp_path):
    """Recomputed in float64 from the weights before each step: on the CPU a state dict taken while
    the EMA was swapped in once turned back into the training weights (both files held those)."""
    from softvq.training.checkpointing import load_checkpoint

    snapshots = {}
    cfg = config_from_dict(tiny_tree(schedule={"steps": 4}))
    Trainer(cfg, tmp_path, objective_factory=factory(snapshots=snapshots)).fit()
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    names = [n for n, _ in Tokenizer(cfg.model).named_parameters()]
    weights = [snapshots[step] for step in range(4)] + [state["model"]]  # before each step, and the last
    ema = {n: weights[0][n].double() for n in names}  # it starts at the initial weights
    for updates, w in enumerate(weights[1:]):
        decay = min(cfg.schedule.ema_decay, (1 + updates) / (10 + updates))  # ema_warmup
        ema = {n: decay * ema[n] + (1 - decay) * w[n].double() for n in names}
    export = exported(tmp_path)
    assert max(float((export[n].double() - ema[n]).abs().max()) for n in names) < 1e-6
    assert all(torch.equal(state["ema"][n], export[n]) for n in names)
    assert max(float((state["model"][n] - export[n]).abs().max()) for n in names) > 1e-4  # not the raw weights


def test_a_checkpoint_loads_as_the_tokenizer_of_its_step_and_stands_in_for_a_missing_export(tmp_path, capsys):
    """``RUN/checkpoints/step-N.pt`` is a model SPEC: the EMA weights of step N (what an export at N
    holds), so a run can be evaluated and plotted while it trains."""
    import re

    from softvq.cli.common import load_tokenizer
    from softvq.evaluation.runs import plot_runs
    from softvq.training.checkpointing import checkpoint_path, load_checkpoint

    run = tmp_path / "run"
    Trainer(config_from_dict(tiny_tree(model={"preset": "softvq-tiny", "image_size": 32}, schedule={"steps": 6})),
            run).fit()  # checkpoints at 3 and 6; the model named by a preset
    export = Tokenizer.from_pretrained(run / "export")
    last, middle = Tokenizer.from_pretrained(checkpoint_path(run, 6)), load_tokenizer(str(checkpoint_path(run, 3)))
    assert not last.training and "training checkpoint" in last.source and "(step 6)" in last.source
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), export.state_dict().values()))
    saved = load_checkpoint(checkpoint_path(run, 3))["ema"]
    assert all(torch.equal(middle.state_dict()[name], value) for name, value in saved.items())
    assert not all(torch.equal(middle.state_dict()[n], v) for n, v in export.state_dict().items())

    model = {"preset": "softvq-tiny", "image_size": 32}  # a new run started from step 3's weights
    again = Trainer(config_from_dict(tiny_tree(model=model, run={"init_from": str(checkpoint_path(run, 3))})),
                    tmp_path / "again")
    assert all(torch.equal(again.tokenizer.state_dict()[name], value) for name, value in saved.items())

    shutil.rmtree(run / "export")  # as while it trains
    with pytest.raises(CheckpointError, match=f"or its newest checkpoint {re.escape(str(checkpoint_path(run, 6)))} "
                                              r"\(the EMA weights of that step\)"):
        load_tokenizer(str(run))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    from softvq.cli.main import main

    assert main(["eval", "--model", str(checkpoint_path(run, 3)), "--images", str(photos), "--num-images", "2",
                 "--no-fid", "--no-lpips", "--no-flops", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((run / "eval" / "step-00000003" / "eval.json").read_text())  # each step its own report
    assert report["num_images"] == 2 and "step-00000003.pt" in report["model"]
    assert main(["info", str(run)]) == 0  # described from its newest checkpoint meanwhile
    assert f"EMA weights of training checkpoint {checkpoint_path(run, 6)} (step 6) (the run has no " \
           f"export/ yet: its newest checkpoint)" in capsys.readouterr().out
    # a latent set records its tokenizer for later, when keep_checkpoints may have deleted the file
    assert main(["pretokenize", str(tmp_path / "lat"), "--images", str(photos), "--model",
                 str(checkpoint_path(run, 3))]) == 2
    assert f"--model {checkpoint_path(run, 3)} is a file; the tokenizer is recorded for generate to load later, and " \
           f"a run keeps only its last checkpoints: save it as a folder first (softvq info {checkpoint_path(run, 3)} " \
           f"--save DIR)" in capsys.readouterr().err
    assert not (tmp_path / "lat").exists()  # refused before its folder is made
    assert main(["info", str(checkpoint_path(run, 3)), "--save", str(tmp_path / "step3")]) == 0  # the fix it names
    saved_three = Tokenizer.from_pretrained(tmp_path / "step3")
    assert all(torch.equal(a, b) for a, b in zip(saved_three.state_dict().values(), middle.state_dict().values()))
    said = []
    written = plot_runs([run], tmp_path / "plots", per_class=2, num_reconstructions=2, projection="pca",
                        log=said.append)
    assert "reconstructions.png" in {p.name for p in written}
    assert any("no export/ yet: reconstructions and codebook plots show the EMA weights of its newest checkpoint, "
               "step 6" in line for line in said), said

    other = tmp_path / "generator.pt"  # what train-generator saves: refused by what it is
    torch.save({"model": {}, "ema": {"shadow": {}}, "step": 1}, other)
    with pytest.raises(CheckpointError, match="is a checkpoint of a generator \\(train-generator\\), not of a "
                                              "tokenizer"):
        Tokenizer.from_pretrained(other)
    torch.save({"anything": 1}, other)
    with pytest.raises(CheckpointError, match="generator.pt is not a softvq train checkpoint"):
        Tokenizer.from_pretrained(other)


def test_checkpoint_specs_are_recorded_absolute_and_missing_ones_are_named(tmp_path, monkeypatch, capsys):
    """A checkpoint file given relative to the working directory is recorded absolute (decode finds
    it from elsewhere); one that keep_checkpoints deleted is named with what its run still holds;
    eval reports beside the run also through a symlinked checkpoints/ folder."""
    import os

    from safetensors import safe_open

    from softvq.cli.common import load_tokenizer
    from softvq.cli.eval import resolve_model_spec
    from softvq.cli.main import main
    from softvq.training.checkpointing import checkpoint_path

    run = tmp_path / "run"
    Trainer(config_from_dict(tiny_tree(schedule={"steps": 6})), run).fit()  # checkpoints at 3 and 6
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    assert main(["encode", "photos", "--model", "run/checkpoints/step-00000003.pt", "--out", "z.safetensors"]) == 0
    assert "which its run deletes once it has newer ones; then decode needs --model" in capsys.readouterr().err
    with safe_open(tmp_path / "z.safetensors", "pt") as file:
        assert file.metadata()["model"] == str(checkpoint_path(run, 3).resolve())
    monkeypatch.chdir(run)
    assert main(["decode", str(tmp_path / "z.safetensors"), "--out", "decoded"]) == 0  # from another folder

    held = "checkpoints/step-00000003.pt, checkpoints/step-00000006.pt and export/"
    with pytest.raises(CheckpointError, match=f"no such checkpoint file .*step-00000001.pt: training keeps only the "
                                              f"last run.keep_checkpoints of them; its run .* holds {held}$"):
        Tokenizer.from_pretrained(checkpoint_path(run, 1))
    monkeypatch.chdir(run / "checkpoints")  # a bare name inside the folder, as the loader takes it
    with pytest.raises(CheckpointError, match=f"holds {held}$"):
        load_tokenizer("step-00000001.pt")
    monkeypatch.chdir(tmp_path)

    (tmp_path / "scratch").mkdir()  # checkpoints kept on another disk, linked into the run
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(run / "config.yaml", linked / "config.yaml")
    os.symlink(run / "checkpoints", linked / "checkpoints")
    assert resolve_model_spec(str(linked / "checkpoints" / "step-00000003.pt"))[1] == linked / "eval" / "step-00000003"


def test_resuming_a_finished_run_keeps_its_outputs_and_changed_settings_are_said(tmp_path, capsys):
    cfg = config_from_dict(tiny_tree(schedule={"steps": 3}))
    Trainer(cfg, tmp_path).fit()
    metrics = (tmp_path / "metrics.json").read_bytes()
    again = Trainer(cfg, tmp_path, resume=True).fit()
    assert again.status == "already finished" and again.step == 3 and again.metrics == json.loads(metrics)
    assert (tmp_path / "metrics.json").read_bytes() == metrics  # not rewritten with zero throughput
    assert "raise schedule.steps to train further" in capsys.readouterr().out
    # outputs older than the last checkpoint (a stop between the two) are made again, not kept
    (tmp_path / "metrics.json").write_text(json.dumps({**json.loads(metrics), "step": 2}))
    remade = Trainer(cfg, tmp_path, resume=True).fit()
    assert remade.status == "finished" and remade.metrics["step"] == 3
    assert remade.metrics["psnr"] == json.loads(metrics)["psnr"] and remade.metrics["images_per_second"] is None
    assert "are from step 2, not from the checkpoint's step 3: exporting and evaluating again" in capsys.readouterr().out
    import shutil

    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-same-lr")
    more = config_from_dict(tiny_tree(schedule={"steps": 4}, optim={"lr": 1e-3}))
    assert Trainer(more, tmp_path, resume=True).fit().step == 4
    assert ("resumed with settings other than the checkpoint's: optim.lr 0.003 -> 0.001; schedule.steps 3 -> 4 "
            "(the earlier ones: config-until-step-00000003.yaml)" in capsys.readouterr().out)
    # the run's history stays in its folder: config.yaml alone said 1e-3 for every step
    assert load_config(tmp_path / "config-until-step-00000003.yaml").optim.lr == 3e-3
    assert load_config(tmp_path / "config.yaml").optim.lr == 1e-3
    # ... and the lower lr is the one used (the checkpoint's optimizer state used to put 3e-3 back)
    assert losses(tmp_path, "lr")[4] == pytest.approx(1e-3 * lr_factor(3, total_steps=4, warmup_steps=2), rel=1e-12)
    same = tmp_path.parent / f"{tmp_path.name}-same-lr"
    Trainer(config_from_dict(tiny_tree(schedule={"steps": 4})), same, resume=True).fit()
    assert losses(same, "lr")[4] == pytest.approx(3e-3 * lr_factor(3, total_steps=4, warmup_steps=2), rel=1e-12)
    assert not torch.equal(exported(tmp_path)["decoder.to_pixel.weight"], exported(same)["decoder.to_pixel.weight"])
    other_model = config_from_dict(tiny_tree(schedule={"steps": 5}, model={"num_tokens": 4}))
    with pytest.raises(CheckpointError, match=r"other settings \(model.num_tokens 8 -> 4\); a run's model cannot change"):
        Trainer(other_model, tmp_path, resume=True)


def fixed_crops(folder, photos, size=32):
    """Whole photos centre-cropped to ``size`` px: with hflip off and min_crop_fraction 1 the
    training crop of each is the image itself."""
    from softvq.data.images import bundled_photos, center_crop_resize, load_rgb

    folder.mkdir(parents=True)
    for i, path in enumerate(bundled_photos()[photos]):
        center_crop_resize(load_rgb(path), size).save(folder / f"{i}.png")
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) / 127.5 - 1 for p in sorted(folder.glob("*.png"))])


def test_a_short_run_on_fixed_crops_learns_to_reconstruct_them(tmp_path):
    images = fixed_crops(tmp_path / "train", slice(0, 4))
    fixed_crops(tmp_path / "held", slice(4, 6))
    # LayerScale starts at 1 (not 1e-5), so the blocks shape the output within 40 steps
    vit = {"layerscale_init": 1.0}
    cfg = config_from_dict(tiny_tree(
        model={"encoder": {**tiny_tree()["model"]["encoder"], **vit}, "decoder": {**tiny_tree()["model"]["decoder"], **vit}},
        data={"source": "folder", "path": str(tmp_path / "train"), "eval_path": str(tmp_path / "held"),
              "hflip": False, "min_crop_fraction": 1.0},
        schedule={"steps": 40, "batch_size": 4, "warmup_steps": 2},
        optim={"lr": 5e-3}, run={"checkpoint_every": 1000, "grid_every": 20}))
    Trainer(cfg, tmp_path / "run").fit()
    rec = losses(tmp_path / "run", "rec")  # the pixel MSE of each step's batch (the 4 crops)
    assert sorted(rec) == list(range(1, 41))
    assert rec[40] < 0.5 * rec[1]
    # below the best reconstruction that ignores the latents (every crop decoded as their mean
    # image): the latents carry what tells the crops apart
    latent_blind = ((images - images.mean(0)) ** 2).mean()
    assert rec[40] < 0.85 * latent_blind
    # the held-out curve: the EMA weights measured at each grid, the last point being metrics.json's
    held = losses(tmp_path / "run", "heldout/psnr")
    assert sorted(held) == [0, 20, 40] and len(set(held.values())) == 3  # (4 crops overfit: it need not rise)
    # one record per step: a grid's metrics join its step's record, step 0's (before training) stands alone
    assert [r["step"] for r in read_log(tmp_path / "run")] == list(range(41))
    assert held[40] == json.loads((tmp_path / "run" / "metrics.json").read_text())["psnr"]
    assert sorted(p.name for p in (tmp_path / "run" / "grids").iterdir()) == [
        "step-00000000.png", "step-00000020.png", "step-00000040.png"]


def test_measuring_the_held_out_images_more_often_trains_the_same_weights(tmp_path):
    """LPIPS' construction and a generative decoder's noise draw from the global generators: the
    grids and held-out metrics must not move the run's data order, noise and losses."""
    model = {**tiny_tree()["model"], "decoder_noise_dim": 2}
    exports = []
    for name, every in (("never", 0), ("often", 2)):
        Trainer(config_from_dict(tiny_tree(model=model, run={"grid_every": every, "eval_lpips": True})),
                tmp_path / name).fit()
        exports.append(exported(tmp_path / name))
    assert sorted(losses(tmp_path / "often", "heldout/lpips")) == [0, 2, 4, 6]
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])


@pytest.mark.parametrize("log_every", [1, 4])  # the stop at step 3 on a log step, and between them
def test_a_run_stopped_by_its_time_limit_logs_the_held_out_metrics_of_where_it_stopped(tmp_path, monkeypatch,
                                                                                    log_every):
    monkeypatch.setattr(Trainer, "_should_stop", lambda self, started: "time limit" if self.step == 3 else None)
    result = Trainer(config_from_dict(tiny_tree(run={"log_every": log_every})), tmp_path).fit()
    assert result.status == "time limit" and result.step == 3
    measured = [r["heldout/psnr"] for r in read_log(tmp_path) if "heldout/psnr" in r]
    assert measured == [json.loads((tmp_path / "metrics.json").read_text())["psnr"]]
    assert read_log(tmp_path)[-1]["step"] == 3


def test_a_finished_run_making_its_export_again_does_not_log_its_end_twice(tmp_path):
    cfg = config_from_dict(tiny_tree(run={"log_every": 0}))
    Trainer(cfg, tmp_path).fit()
    before = read_log(tmp_path)
    assert [r["step"] for r in before] == [6] and "heldout/psnr" in before[0]
    shutil.rmtree(tmp_path / "export")  # lost: the resume makes it again, and measures again
    Trainer(cfg, tmp_path, resume=True).fit()
    assert (tmp_path / "export").is_dir() and read_log(tmp_path) == before


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_the_optimizer_sees_gradients_clipped_to_the_norm_and_the_log_the_raw_norm(tmp_path, clip):
    cfg = config_from_dict(tiny_tree(schedule={"steps": 3}, optim={"grad_clip": clip}, run={"checkpoint_every": 1000}))
    trainer = Trainer(cfg, tmp_path)

    def global_norm():
        grads = [p.grad.double() for group in trainer.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        assert grads
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    raw, seen = [], []
    average, step = trainer._average_unwrapped_grads, trainer.optimizer.step

    def before_clipping():  # the gradients are complete here, and clipping comes next
        average()
        raw.append(global_norm())

    def optimizer_step(*args, **kwargs):
        seen.append(global_norm())
        return step(*args, **kwargs)

    trainer._average_unwrapped_grads, trainer.optimizer.step = before_clipping, optimizer_step
    assert trainer.fit().status == "finished"
    assert len(raw) == len(seen) == 3 and min(raw) > 1e-2  # a norm the 1e-3 clip really cuts
    for r, s in zip(raw, seen):
        assert s == pytest.approx(min(r, clip), rel=1e-5)
    logged = losses(tmp_path, "grad_norm")
    assert [logged[i] for i in (1, 2, 3)] == pytest.approx(raw, rel=1e-5)  # the norm before clipping


def test_keeps_only_the_last_checkpoints(tmp_path):
    cfg = config_from_dict(tiny_tree(schedule={"steps": 5}, run={"checkpoint_every": 1, "keep_checkpoints": 2}))
    Trainer(cfg, tmp_path).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004.pt", "step-00000005.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".tmp"]


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    snapshots = {}
    cfg = config_from_dict(tiny_tree(schedule={"steps": 4}, run={"max_nonfinite": 3}))
    result = Trainer(cfg, tmp_path / "a", objective_factory=factory(nan_at={1, 2}, snapshots=snapshots)).fit()
    assert result.status == "finished" and result.metrics["nonfinite_steps"] == 2
    # The skipped steps changed nothing: weights entering steps 1, 2 and 3 are the same.
    for key in snapshots[1]:
        assert torch.equal(snapshots[1][key], snapshots[2][key]) and torch.equal(snapshots[1][key], snapshots[3][key])
    assert not all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    records = {r["step"]: r for r in read_log(tmp_path / "a")}
    assert records[2].get("nonfinite") == 1.0 and records[4]["nonfinite_steps"] == 2.0

    cfg = config_from_dict(tiny_tree(schedule={"steps": 6}, run={"max_nonfinite": 2}))
    with pytest.raises(NonFiniteLossError, match="2 steps had a non-finite loss") as info:
        Trainer(cfg, tmp_path / "b", objective_factory=factory(nan_at={1, 3})).fit()
    assert "optim.lr" in str(info.value)
    assert list_checkpoints(tmp_path / "b")[-1].name == "step-00000004.pt"


def test_folder_with_corrupt_and_non_image_files_trains_and_reports(tmp_path, capsys):
    data = tmp_path / "images"
    (data / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "nested" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (data / "nested" / "zero.png").write_bytes(b"")
    (data / "readme.txt").write_text("hello")
    cfg = config_from_dict(tiny_tree(data={"source": "folder", "path": str(data), "num_eval_images": 2},
                                     schedule={"steps": 4, "batch_size": 4}))
    result = Trainer(cfg, tmp_path / "run").fit()
    assert result.status == "finished"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_files"] == 2 and metrics["ignored_non_image_files"] == 1
    assert sorted(p.rsplit("/", 1)[-1] for p in metrics["skipped_examples"]) == ["truncated.jpg", "zero.png"]
    out = capsys.readouterr().out
    assert "skipped 2 unreadable image file(s)" in out
    # the example says why, as encode's list does (it used to be a bare path, a bomb read like a corrupt file)
    assert "nested/truncated.jpg: not a readable image (" in out or "nested/zero.png: not a readable image (" in out
    assert read_log(tmp_path / "run")[-1]["skipped_files"] == 2.0


def test_the_last_skipped_line_says_how_many_unreadable_files_were_held_out(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for name in ("train", "held"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
        (tmp_path / name / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = config_from_dict(tiny_tree(data={"source": "folder", "path": str(tmp_path / "train"),
                                           "eval_path": str(tmp_path / "held"), "num_eval_images": 5},
                                     schedule={"steps": 2, "batch_size": 4}))
    Trainer(cfg, tmp_path / "run").fit()
    assert "skipped 2 unreadable image file(s) (1 of them held-out), e.g." in capsys.readouterr().out


def test_resume_from_webdataset_shards_is_exact(tmp_path):
    """Shards with 2 data workers, a corrupt sample and a crash at step index 4: the resumed run
    continues each worker's stream where the checkpoint left it, and the GAN's augmentations draw
    the same numbers (the loader takes no draw from the global RNG), so the losses match bit for bit."""
    import io
    import tarfile

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    for s in range(4):
        with tarfile.open(tmp_path / f"s-{s}.tar", "w") as tar:
            members = [(f"s{s}i{i}.png", png(10 * s + i)) for i in range(6)] + ([("bad.png", b"x")] if s == 2 else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = config_from_dict(gan_tree(data={"source": "shards", "path": str(tmp_path / "s-{0..3}.tar"),
                                          "workers": 2, "prefetch_factor": 2}))
    Trainer(cfg, tmp_path / "straight").fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path / "crashed", objective_factory=factory(crash_at=4)).fit()
    Trainer(cfg, tmp_path / "crashed", resume=True).fit()
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    # shards do not say how many images an epoch holds: no epoch is logged (it said 0 throughout)
    assert losses(tmp_path / "straight", "epoch") == {} and losses(tmp_path / "straight", "images_per_s")


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    cfg = config_from_dict(tiny_tree())
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path, objective_factory=factory(crash_at=1)).fit()
    assert (tmp_path / "config.yaml").is_file() and list_checkpoints(tmp_path) == []
    result = Trainer(cfg, tmp_path, resume=True).fit()  # was: "no checkpoint; start without --resume"
    assert result.status == "finished" and result.step == 6
    assert "has no checkpoint yet (the run stopped before its first one): starting from step 0" in capsys.readouterr().out


def test_continuing_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    cfg = config_from_dict(tiny_tree())
    Trainer(cfg, tmp_path).fit()
    newer = (tmp_path / "checkpoints" / "step-00000006.pt").read_bytes()
    older = tmp_path / "checkpoints" / "step-00000003.pt"
    stopped = Trainer(cfg, tmp_path, resume=older, objective_factory=factory(sigint_at=3)).fit()
    assert stopped.status == "interrupted" and stopped.step == 4
    aside = tmp_path / "checkpoints" / "abandoned-after-00000003"
    assert (aside / "step-00000006.pt").read_bytes() == newer  # kept, not deleted
    # the old line's outputs go with it: a finished-looking export must not stand for the new line
    assert (aside / "export").is_dir() and json.loads((aside / "metrics.json").read_text())["step"] == 6
    assert not (tmp_path / "export").exists() and not (tmp_path / "metrics.json").exists()
    assert "the line it leaves is kept in" in capsys.readouterr().out
    # the log reads like one run's; the records of the line set aside go with it
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(aside)] == [4, 5, 6]
    # a plain --resume now continues the new line, not the abandoned step 6
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]
    stale = tmp_path / "checkpoints" / ".step-00000005.pt.x1y2.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half")
    assert Trainer(cfg, tmp_path, resume=True).step == 4
    assert not stale.exists()
    # going back to step 3 a second time keeps the first abandoned line as it is
    Trainer(cfg, tmp_path, resume=older)
    assert (aside / "step-00000006.pt").read_bytes() == newer
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "abandoned-after-00000003-2").iterdir()) == [
        "log.jsonl", "step-00000004.pt"]


def test_a_second_signal_inside_an_update_writes_no_half_updated_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = config_from_dict(tiny_tree())
    Trainer(cfg, tmp_path / "straight").fit()
    run = tmp_path / "cut"
    trainer = Trainer(cfg, run)
    real_step, calls = trainer.optimizer.step, []

    def step_then_stop(*args, **kwargs):  # "stop at once" right after the weights changed
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(trainer.optimizer, "step", step_then_stop)
    result = trainer.fit()
    assert result.status == "interrupted" and result.step == 3  # the last consistent checkpoint's step
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003.pt"]  # no step-4 mixing two steps
    assert "stopped inside the update of step 5: no checkpoint of an inconsistent state" in capsys.readouterr().out
    monkeypatch.undo()
    Trainer(cfg, run, resume=True).fit()
    straight, resumed = exported(tmp_path / "straight"), exported(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_resumed_restart_uses_the_initial_weights_and_config_comes_first(tmp_path):
    source = Tokenizer(config_from_dict(tiny_tree()).model)
    torch.nn.init.normal_(source.decoder.to_pixel.weight, std=0.3)
    source.save_pretrained(tmp_path / "init")
    cfg = config_from_dict(tiny_tree(run={"init_from": str(tmp_path / "init")}))
    Trainer(cfg, tmp_path / "fresh").fit()
    Trainer(cfg, tmp_path / "restart")  # stopped after setting up, before any checkpoint
    assert (tmp_path / "restart" / "config.yaml").is_file()  # written before the log: --resume can take it
    Trainer(cfg, tmp_path / "restart", resume=True).fit()
    fresh, restarted = exported(tmp_path / "fresh"), exported(tmp_path / "restart")
    assert all(torch.equal(fresh[k], restarted[k]) for k in fresh)  # run.init_from was applied on restart too


def test_a_trainer_in_a_notebook_gives_back_ctrl_c_and_refuses_what_would_mix_runs(tmp_path):
    cfg = config_from_dict(tiny_tree())
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path / "a", objective_factory=factory(crash_at=4)).fit()
    assert signal.getsignal(signal.SIGINT) is before  # an error other than Ctrl-C left the handler installed
    with pytest.raises(FileExistsError, match="already holds a run.s checkpoints: pass resume=True"):
        Trainer(cfg, tmp_path / "a")  # started over silently, mixing two runs' checkpoints
    trainer = Trainer(cfg, tmp_path / "a", resume=True)
    assert trainer.fit().status == "finished"
    with pytest.raises(RuntimeError, match=r"runs fit\(\) once; .*resume=True"):
        trainer.fit()  # crashed on the closed log
    assert signal.getsignal(signal.SIGINT) is before


def test_unreadable_held_out_files_are_skipped_and_others_drawn(tmp_path, capsys):
    """2 good and 3 corrupt files with 2 held out: was 'none of the 2 held-out files could be read'."""
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # the fixed held-out order draws 2, 4, 3, 0, 1: the corrupt ones first
        if i < 2:
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(data / f"{i}-good.png")
        else:
            (data / f"{i}-bad.png").write_bytes(b"\x89PNG garbage")
    cfg = config_from_dict(tiny_tree(data={"source": "folder", "path": str(data), "num_eval_images": 2},
                                     schedule={"steps": 2, "batch_size": 2}, run={"checkpoint_every": 0}))
    result = Trainer(cfg, tmp_path / "run").fit()
    assert result.status == "finished"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["heldout_images"] == 1  # the other good file is left to train on
    out = capsys.readouterr().out
    assert "held-out set: skipped" in out and "bad" in out.split("held-out set: skipped")[1].splitlines()[0]
    assert metrics["skipped_files"] == 3


def test_a_folder_without_two_readable_images_is_a_clear_error(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):
        (data / f"bad{i}.png").write_bytes(b"\x89PNG garbage")
    cfg = config_from_dict(tiny_tree(data={"source": "folder", "path": str(data), "num_eval_images": 1}))
    with pytest.raises(ValueError, match=r"none of the 3 image files in .*images could be read \(e\.g\. .*bad.*\); "
                                         r"replace the unreadable files"):
        Trainer(cfg, tmp_path / "run")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(data / "good.png")
    with pytest.raises(ValueError, match=r"only 1 of the 4 image files .* could be read \(.*good\.png\): a run needs "
                                         r"one to train on and one held out"):
        Trainer(cfg, tmp_path / "run")


def test_a_resume_drops_the_log_records_past_its_checkpoint_and_a_half_written_line(tmp_path, capsys):
    """A SIGKILL after step 5's record (checkpoint at 3) and during the next line's write."""
    cfg = config_from_dict(tiny_tree())
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path, objective_factory=factory(crash_at=5)).fit()
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 6, "loss": 0.')
    Trainer(cfg, tmp_path, resume=True).fit()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]  # was 1, 2, 3, 4, 5, 4, 5, 6
    assert "log.jsonl: dropped 3 record(s) logged past step 3" in capsys.readouterr().out


def test_a_run_started_on_a_relative_folder_resumes_from_another_folder(tmp_path, monkeypatch, capsys):
    """config.yaml names the images by their absolute path: `softvq train --resume -o RUN` from
    elsewhere used to look for the relative data.path under the new current folder."""
    from softvq.cli.main import main
    from softvq.training.config import save_config

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    save_config(config_from_dict(tiny_tree(schedule={"steps": 2}, run={"checkpoint_every": 1})), tmp_path / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny.yaml", "data.source=folder", "data.path=imgs", "-o", "run"]) == 0
    assert load_config(tmp_path / "run" / "config.yaml").data.path == str(tmp_path / "imgs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", "-o", str(tmp_path / "run"), "schedule.steps=3"]) == 0
    assert max(losses(tmp_path / "run")) == 3
    # a checkpoint of an older softvq recorded the path as given: resuming where it was given names no change
    newest = list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(newest, weights_only=False)
    state["config"]["data"]["path"] = "imgs"
    torch.save(state, newest)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", "-o", "run", "schedule.steps=4"]) == 0
    notes = capsys.readouterr().out
    assert "schedule.steps 3 -> 4" in notes and "data.path" not in notes


def test_training_gives_the_callers_random_generators_back(tmp_path):
    import random

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(2)

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = draws()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    Trainer(config_from_dict(tiny_tree(schedule={"steps": 1})), tmp_path / "run").fit()
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])  # the run seeded them from its own seed
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    Trainer(config_from_dict(tiny_tree(schedule={"steps": 1})), tmp_path / "unused").close()
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_bottleneck_setting_the_kind_never_reads_is_named_in_the_log(tmp_path, capsys):
    tree = tiny_tree(schedule={"steps": 1, "warmup_steps": 0})
    tree["model"]["bottleneck"] = {**tree["model"]["bottleneck"], "kind": "kl", "temperature": 0.5}
    Trainer(config_from_dict(tree), tmp_path).fit()
    warning = ("warning: model.bottleneck.codebook_size=32, model.bottleneck.temperature=0.5 have no effect: "
               "bottleneck kind 'kl' does not read them")
    assert warning in capsys.readouterr().out


def test_the_logged_means_average_each_value_over_the_steps_that_made_it(tmp_path):
    """A skipped step logs no loss: a window's mean is over the steps that have one, not halved."""
    runs = {}
    for every in (1, 2):
        cfg = config_from_dict(tiny_tree(schedule={"steps": 2}, run={"log_every": every, "checkpoint_every": 0}))
        Trainer(cfg, tmp_path / f"every-{every}", objective_factory=factory(nan_at={1})).fit()
        runs[every] = {r["step"]: r for r in read_log(tmp_path / f"every-{every}") if "lr" in r}
    assert "loss" not in runs[1][2]  # the skipped step has none of its own
    for key in ("loss", "rec", "grad_norm"):
        assert runs[2][2][key] == pytest.approx(runs[1][1][key], rel=1e-6)
    assert runs[2][2]["nonfinite"] == 0.5  # one of the window's two steps was skipped


def test_the_earlier_settings_file_keeps_what_the_checkpoint_ran_with(tmp_path):
    """A resume with other settings that crashes before its next checkpoint, resumed again, still
    has config-until-step-N.yaml holding the settings steps 1..N trained with."""
    run = tmp_path / "run"
    Trainer(config_from_dict(tiny_tree(schedule={"steps": 3})), run).fit()
    changed = config_from_dict(tiny_tree(schedule={"steps": 6}, optim={"lr": 1e-3, "scale_lr": False}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(changed, run, resume=True, objective_factory=factory(crash_at=4)).fit()
    Trainer(changed, run, resume=True).fit()
    assert load_config(run / "config-until-step-00000003.yaml").optim.lr == 3e-3
    assert load_config(run / "config.yaml").optim.lr == 1e-3


def test_a_new_run_from_python_refuses_a_folder_with_another_runs_files(tmp_path):
    """A run that crashed before its first checkpoint left config.yaml and log.jsonl: a fresh
    Trainer there would append a second history to that log (steps 1, 2, 1, 2, ...)."""
    cfg = config_from_dict(tiny_tree())
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path / "run", objective_factory=factory(crash_at=2)).fit()
    with pytest.raises(FileExistsError, match=r"holds another run's files \(log.jsonl\): pass resume=True to continue it"):
        Trainer(cfg, tmp_path / "run")
    assert Trainer(cfg, tmp_path / "run", resume=True).fit().status == "finished"
    assert [r["step"] for r in read_log(tmp_path / "run") if "lr" in r] == [1, 2, 3, 4, 5, 6]


def test_a_restart_from_step_0_logs_the_held_out_metrics_of_step_0_once(tmp_path):
    cfg = config_from_dict(tiny_tree(run={"grid_every": 3, "checkpoint_every": 0}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path, objective_factory=factory(crash_at=1)).fit()
    Trainer(cfg, tmp_path, resume=True).fit()
    steps = [r["step"] for r in read_log(tmp_path)]
    assert steps.count(0) == 1 and steps == sorted(steps)


def test_an_interrupt_at_once_before_the_update_checkpoints_the_step_start(tmp_path):
    """Stopped at once while step 5's batch is in hand (before its update): the checkpoint of step 4
    must not record the shard streams and random states past that batch, or the resumed run skips it."""
    import io
    import tarfile

    for s in range(3):
        with tarfile.open(tmp_path / f"s-{s}.tar", "w") as tar:
            for i in range(6):
                buf = io.BytesIO()
                pixels = np.random.default_rng(10 * s + i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, "PNG")
                info = tarfile.TarInfo(f"s{s}i{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    cfg = config_from_dict(gan_tree(data={"source": "shards", "path": str(tmp_path / "s-{0..2}.tar"), "workers": 1},
                                    run={"checkpoint_every": 0}))
    Trainer(cfg, tmp_path / "straight").fit()
    result = Trainer(cfg, tmp_path / "cut", objective_factory=factory(interrupt_at=4)).fit()
    assert result.status == "interrupted" and result.step == 4
    Trainer(cfg, tmp_path / "cut", resume=True).fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    straight, resumed = exported(tmp_path / "straight"), exported(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path):
    """A step with a finite loss moved the weights to infinity: the steps after it are skipped, and
    the stop names the last checkpoint with finite weights instead of writing the infinite ones."""
    cfg = config_from_dict(tiny_tree(schedule={"steps": 6}, run={"max_nonfinite": 2, "checkpoint_every": 2}))
    with pytest.raises(NonFiniteLossError, match="the weights became non-finite") as info:
        Trainer(cfg, tmp_path, objective_factory=factory(blow_up_at=3)).fit()
    assert "step-00000002.pt" in str(info.value) and "nothing was written" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt"]
    state = torch.load(list_checkpoints(tmp_path)[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_new_run_from_python_refuses_a_folder_of_other_files(tmp_path):
    """A photo folder or a tokenizer's export as run_dir: the run's config.yaml, log and
    checkpoints would land among the user's files (the CLI refuses any non-empty --output)."""
    cfg = config_from_dict(tiny_tree())
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"photos holds files that are not a training run's \(cat, notes.txt\)"):
        Trainer(cfg, tmp_path / "photos")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat", "notes.txt"]  # nothing written
    export = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tok")
    with pytest.raises(FileExistsError, match="config.json, model.safetensors"):
        Trainer(cfg, export)
    with pytest.raises(NotADirectoryError, match="is a file; a run is a folder"):
        Trainer(cfg, tmp_path / "photos" / "notes.txt")


def test_a_stop_between_log_lines_logs_the_steps_since_the_last_one(tmp_path):
    """Ctrl-C after step 5 with a log line every 3 steps: steps 4 and 5 were in no record (the resumed
    run logs from step 6 on); the stop now logs their mean before its checkpoint."""
    every_step = config_from_dict(tiny_tree(run={"log_every": 1}))
    Trainer(every_step, tmp_path / "each").fit()
    each = losses(tmp_path / "each")
    cfg = config_from_dict(tiny_tree(run={"log_every": 3}))
    result = Trainer(cfg, tmp_path / "cut", objective_factory=factory(sigint_at=4)).fit()
    assert result.status == "interrupted" and result.step == 5
    assert sorted(losses(tmp_path / "cut")) == [3, 5]
    assert losses(tmp_path / "cut")[5] == pytest.approx((each[4] + each[5]) / 2, rel=1e-6)
    Trainer(cfg, tmp_path / "cut", resume=True).fit()
    assert sorted(losses(tmp_path / "cut")) == [3, 5, 6] and losses(tmp_path / "cut")[6] == pytest.approx(each[6])


def test_a_log_line_holds_its_last_steps_lr_and_a_rate_without_grids(tmp_path, monkeypatch):
    """The lr of a record is its step's (was: the window's mean, 3e-5 where the step had 5e-5), and
    images/s counts the steps' own time (was: the held-out grid's too, 10x slower at grid steps)."""
    import time

    every_step = config_from_dict(tiny_tree(run={"log_every": 1}))
    Trainer(every_step, tmp_path / "each").fit()
    each = losses(tmp_path / "each", "lr")
    assert len(set(each.values())) > 2  # warm-up, then the cosine: the lr moves every step

    real_grid = Trainer.write_grid

    def slow_grid(self):
        time.sleep(1.0)  # a held-out grid of many images, say
        return real_grid(self)

    monkeypatch.setattr(Trainer, "write_grid", slow_grid)
    cfg = config_from_dict(tiny_tree(run={"log_every": 3, "grid_every": 3}))
    Trainer(cfg, tmp_path / "three").fit()
    assert losses(tmp_path / "three", "lr") == {3: each[3], 6: each[6]}
    # 3 steps of 4 images: with the grid's second in it, the rate could not pass 12 images/s; nor
    # could metrics.json's over the 6 steps with its two grids
    assert all(rate > 24 for rate in losses(tmp_path / "three", "images_per_s").values())
    metrics = json.loads((tmp_path / "three" / "metrics.json").read_text())
    assert metrics["steps_this_run"] == 6 and metrics["images_per_second"] > 24


def test_a_constant_logged_over_windows_of_any_length_stays_one_number():
    """Summed in float32, 0.07 came out 0.0700000028 over 3 steps and 0.0700000003 over 1-2, so that
    `softvq plot` drew a flat temperature as a curve with a dip at each resume."""
    from softvq.training.logging import LogWindow

    means = []
    for steps in (3, 1, 2, 7):
        window = LogWindow()
        for _ in range(steps):
            window.add({"bottleneck/temperature": torch.tensor(0.07)})  # float32, as the model logs it
        means.append(window.means()["bottleneck/temperature"])
    assert len(set(means)) == 1 and means[0] == float(torch.tensor(0.07))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_trainer_inside_a_callers_no_grad_trains_all_the_same(tmp_path, mode):
    from softvq.training.config import config_from_dict
    from softvq.training.trainer import Trainer
    from tests.test_tokenizer_generative_decoder import TREE

    with getattr(torch, mode)():  # was "element 0 of tensors does not require grad" at the first step
        trainer = Trainer(config_from_dict(TREE), tmp_path / "run")
        before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        result = trainer.fit()
    assert (result.step, result.status) == (3, "finished")
    assert any(not torch.equal(before[k], v) for k, v in trainer.unwrapped.state_dict().items())


def test_frozen_parts_keep_their_weights_and_the_rest_trains(tmp_path):
    """run.freeze=[encoder, bottleneck]: WeTok's released stage 2, the decoder trained alone from a
    stage-1 export, with the frozen parts in eval mode."""
    from softvq.training.checkpointing import load_checkpoint

    stage1 = tmp_path / "stage1"
    Tokenizer(config_from_dict(tiny_tree()).model).save_pretrained(stage1)
    snapshots, modes = {}, []
    run = tmp_path / "run"
    cfg = config_from_dict(tiny_tree(schedule={"steps": 3},
                                     run={"freeze": ["encoder", "bottleneck"], "init_from": str(stage1)}))
    trainer = Trainer(cfg, run, objective_factory=factory(snapshots=snapshots))
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in trainer.unwrapped.named_parameters()
                       if n.split(".")[0] in ("decoder", "from_latent")}
    trainer.unwrapped.encoder.register_forward_hook(lambda module, *_: modes.append(module.training))
    trainer.fit()
    assert modes and not any(modes)  # eval mode in every training step
    state = load_checkpoint(list_checkpoints(run)[-1])
    start, export = snapshots[0], exported(run)
    assert all(torch.equal(start[n], v) for n, v in Tokenizer.from_pretrained(stage1).state_dict().items())
    for name, value in state["model"].items():
        frozen = name.split(".")[0] in ("encoder", "to_latent", "bottleneck")
        assert torch.equal(value, start[name]) is frozen, name
        if frozen:  # the export (EMA weights) holds them unchanged too
            assert torch.equal(export[name], start[name]), name
    with pytest.raises(CheckpointError, match=r"frozen parts \['bottleneck', 'encoder'\], this run freezes "
                                              r"\['encoder'\]; a run's frozen parts cannot change"):
        Trainer(config_from_dict(tiny_tree(schedule={"steps": 4}, run={"freeze": ["encoder"],
                                                                       "init_from": str(stage1)})), run, resume=True)
    # the same parts in another order are the same run
    again = Trainer(config_from_dict(tiny_tree(schedule={"steps": 4}, run={"freeze": ["bottleneck", "encoder"],
                                                                           "init_from": str(stage1)})), run, resume=True)
    assert again.step == 3
    again.close()


def test_a_checkpoint_from_before_run_freeze_resumes(tmp_path):
    """Saved configs of earlier versions have no run.freeze: they froze nothing, as the default."""
    from softvq.training.checkpointing import load_checkpoint, save_checkpoint

    Trainer(config_from_dict(tiny_tree(schedule={"steps": 3})), tmp_path).fit()
    path = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(path)
    del state["config"]["run"]["freeze"]
    path.unlink()
    save_checkpoint(state, tmp_path, 3)
    assert Trainer(config_from_dict(tiny_tree(schedule={"steps": 4})), tmp_path, resume=True).fit().step == 4


@pytest.mark.parametrize("freeze, extra, error", [
    (["encoders"], {}, "run.freeze names 'encoders'; the parts are encoder, bottleneck, decoder"),
    (["encoder", "encoder"], {}, "names a part twice"),
    (["encoder", "bottleneck", "decoder"], {}, "leaves nothing of the tokenizer to train"),
    (["encoder", "decoder"], {"model": {"bottleneck": {"kind": "lfq", "latent_dim": 4, "lfq_groups": 1,
                                                       "codebook_size": 8192, "distance": "l2"}}},
     r"leaves nothing of the tokenizer to train \(a lfq bottleneck has no weights\)"),
    (["decoder"], {"objective": {"adaptive_weight": True}}, "adaptive_weight compares gradients at the decoder"),
    (["decoder"], {"run": {"distributed": "fsdp"}}, "run.freeze with run.distributed=fsdp is not supported"),
    (["encoder"], {"run": {"init_from": None}}, "keep the encoder at its random initialisation"),
    (["bottleneck"], {"run": {"init_from": None, "init_encoder": "dinov2"}}, "keep the codebook at its random"),
])
def test_freeze_settings_that_cannot_work_are_refused(freeze, extra, error):
    sections = {**extra, "run": {"init_from": "runs/stage1/export", "freeze": freeze, **extra.get("run", {})}}
    with pytest.raises(ValueError, match=error):
        config_from_dict(tiny_tree(**sections))


def test_grad_accumulation_logs_the_same_gradient_norm_as_one_micro_batch(tmp_path):
    """grad_accum splits the global batch; the gradient is the mean over micro-batches, so the
    first step's (same weights, same images) gradient norm equals the unsplit one (a loss not divided
    by grad_accum trains alike under Adam and clipping, but clips at another threshold)."""
    norms = {}
    for accum in (1, 2):
        tree = tiny_tree(schedule={"steps": 1, "grad_accum": accum, "batch_size": 4},
                          objective={"bottleneck_weight": 0.0},  # batch-level term: not split-invariant
                          run={"checkpoint_every": 0})
        Trainer(config_from_dict(tree), tmp_path / f"a{accum}").fit()
        norms[accum] = [r["grad_norm"] for r in read_log(tmp_path / f"a{accum}") if "grad_norm" in r]
    assert len(norms[1]) == 1 and len(norms[2]) == 1
    assert norms[2][0] == pytest.approx(norms[1][0], rel=1e-4)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
def test_the_discriminator_steps_every_step_from_its_start_with_clipped_gradients(tmp_path):
    """Every step from objective.discriminator_start updates the discriminator, and the gradient
    it applies has norm <= optim.grad_clip (as the generator's)."""
    clip = 1e-4  # far below the discriminator's gradient norm, so the clip is active
    cfg = config_from_dict(gan_tree(optim={"grad_clip": clip}, run={"checkpoint_every": 0}))
    trainer = Trainer(cfg, tmp_path / "gan")
    seen = []
    inner = trainer.disc_optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad.detach().reshape(-1) for p in trainer.disc_params if p.grad is not None]
        seen.append((trainer.step, float(torch.cat(grads).norm())))
        return inner(*args, **kwargs)

    trainer.disc_optimizer.step = step
    trainer.fit()
    start = cfg.objective.discriminator_start
    assert [s for s, _ in seen] == list(range(start, cfg.schedule.steps))
    assert all(norm <= clip * (1 + 1e-5) for _, norm in seen), seen


def test_set_aside_moves_another_lines_checkpoint_at_the_resumed_step_too(tmp_path):
    """Resuming an explicit checkpoint (here one kept outside checkpoints/) at step 4 sets aside
    every other checkpoint at or after step 4, the run's own step-4 one included: left in place it
    is the abandoned line's."""
    from softvq.training.checkpointing import checkpoint_path, set_aside_newer

    run = tmp_path / "run"
    for step in (2, 4, 6):
        path = checkpoint_path(run, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    keep = tmp_path / "elsewhere" / "step-00000004.pt"
    keep.parent.mkdir()
    keep.write_bytes(b"y")
    aside = set_aside_newer(run, 4, keep)
    assert aside is not None
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000004.pt", "step-00000006.pt"]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002.pt"]
