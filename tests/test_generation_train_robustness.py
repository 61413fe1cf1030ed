"""train-generator and generate given what a user may give by mistake: an --out that is not a run of
theirs, settings that make the loss non-finite, a run whose config.json was lost, a run killed mid-write,
and sampling settings that are not numbers a sampler can use."""

import json
import math
import re
import shutil

import pytest
import torch

from softvq.cli.main import main
from softvq.generation.train import GeneratorTrainConfig, train_generator
from tests.tiny_generation import TINY, tiny_latent_set

FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--cpu", "--quiet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, run): a tiny tokenizer ``root/tok``, its latent set ``root/lat`` and a SiT run ``root/run``
    trained 4 steps. Tests that change a run copy it first."""
    root = tmp_path_factory.mktemp("robust")
    tiny_latent_set(root)
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(root / "run"), steps=4, **TINY),
                    progress=False)
    return root, root / "run"


def train_cli(root, out, *extra):
    return main(["train-generator", "--latents", str(root / "lat"), "--out", str(out), *FLAGS, *extra])


def test_out_that_is_not_a_run_of_its_own_is_refused_untouched(made, tmp_path, capsys):
    root, run = made
    shutil.copytree(root / "tok", tmp_path / "tok")
    shutil.copytree(run, tmp_path / "run")
    tokenizer_run = tmp_path / "tokrun"  # softvq train's: config.yaml and checkpoints of a tokenizer
    (tokenizer_run / "checkpoints").mkdir(parents=True)
    (tokenizer_run / "config.yaml").write_text("model: {}\n")
    torch.save({"format": "softvq-train", "model": {"w": torch.zeros(1)}, "ema": {}, "step": 2},
               tokenizer_run / "checkpoints" / "step-00000002.pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[]")
    cases = [
        (tmp_path / "tok", "is a tokenizer, not a train-generator run: training would overwrite its config.json"),
        (tmp_path / "run" / "generator", f"is an exported generator, not a train-generator run: training would "
                                         f"overwrite its config.json; pass a new or empty folder as --out, or its "
                                         f"run {tmp_path / 'run'} to continue that run"),
        (tokenizer_run, "is a tokenizer training run (softvq train's), not a train-generator run"),
        (root / "lat", "is a latent set (meta.json, written by pretokenize), not a train-generator run"),
        (tmp_path / "notes", "is a folder that is not a train-generator run (no config.json of one"),
        (tmp_path / "listed", "is not a train-generator run: its config.json holds a list, not a run's settings"),
    ]
    for out, named in cases:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert train_cli(root, out, "--steps", "1") == 2, out  # was 0 (overwritten) or a torch traceback
        err = capsys.readouterr().err
        assert f"softvq train-generator: error: --out {out} {named}" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    assert train_cli(root, tmp_path / "empty", "--steps", "1") == 0
    assert train_cli(root, tmp_path / "run", "--steps", "5") == 0  # its own run continues


@pytest.mark.parametrize("flags, named", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--lr", "1e38"], "--lr 1e+38 is too large for AdamW's float32 step"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--weight-decay", "1e38"], "--lr × --weight-decay must be below 1"),
    (["--adam-beta2", "1.5"], "--adam-beta2 (AdamW's β2) must be in [0, 1), got 1.5"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 or more, got -1.0"),
    (["--objective", "dit", "--vlb-weight", "nan"], "--vlb-weight must be a finite number, got nan"),
    (["--class-dropout", "1"], "--class-dropout (a probability) must be in [0, 1), got 1.0"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be 1 or more, got 0"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    (["--steps", "3", "--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--steps", "3", "--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, got nan"),
])
def test_settings_that_cannot_train_are_named_before_anything_is_written(made, tmp_path, flags, named, capsys):
    root, _ = made
    length = [] if "--epochs" in flags or "--steps" in flags else ["--steps", "2"]
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(tmp_path / "g"), *FLAGS, *length,
                 *flags]) == 2  # were NaN runs that exited 0, torch tracebacks, or a NaN norm taken as "no clipping"
    err = capsys.readouterr().err
    assert err.startswith(f"softvq train-generator: error: {named}") and err.count("\n") == 1, err
    assert not (tmp_path / "g").exists()


def rewrite_latent_set(root, folder, std=None, poison=False):
    """A copy of ``root/lat`` in ``folder`` with meta.json's latent_std replaced, or a NaN latent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(root / "lat", folder)
    meta = json.loads((folder / "meta.json").read_text())
    if std is not None:
        meta["latent_std"] = std
        (folder / "meta.json").write_text(json.dumps(meta))
    if poison:
        shard = folder / meta["shards"][0]
        with safe_open(str(shard), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors["latents"][0, 0, 0] = float("nan")
        save_file(tensors, str(shard), metadata=metadata)
    return folder


@pytest.mark.parametrize("std, poison, named", [
    (0, False, "gives latent_mean .* and latent_std 0; training normalises the latents as \\(z - mean\\) / std"),
    (float("nan"), False, "and latent_std nan; training normalises"),
    (None, True, "holds NaN or infinite latents"),
])
def test_a_latent_set_that_cannot_be_normalised_is_refused_at_load(made, tmp_path, std, poison, named, capsys):
    import re

    root, _ = made
    latents = rewrite_latent_set(root, tmp_path / "lat", std=std, poison=poison)
    assert main(["train-generator", "--latents", str(latents), "--out", str(tmp_path / "g"), *FLAGS,
                 "--steps", "2"]) == 2  # trained on NaN and exported an all-NaN generator
    assert re.search(named, capsys.readouterr().err)
    assert not (tmp_path / "g").exists()


def poisoned_objective(monkeypatch, calls, weights=False):
    """Make the loss of the objective's ``calls``-th calls (counted from 1) NaN, or with ``weights``
    put an infinite weight into the model first (as a finite-loss step with a huge lr would)."""
    from softvq.generation import train as train_module

    count = [0]

    class Poisoned(train_module.GenerationObjective):
        def __call__(self, model, x, y):
            count[0] += 1
            if weights and count[0] in calls:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            terms = super().__call__(model, x, y)
            if count[0] in calls:
                terms["loss"] = terms["loss"] * float("nan")
            return terms

    monkeypatch.setattr(train_module, "GenerationObjective", Poisoned)


def all_finite(state):
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def test_a_nonfinite_step_is_skipped_and_too_many_stop_the_run_at_its_last_good_checkpoint(made, tmp_path,
                                                                                           monkeypatch, capsys):
    from softvq.generation.checkpoint import load_generator
    from softvq.training.checkpointing import checkpoint_path, list_checkpoints

    root, _ = made
    cfg = GeneratorTrainConfig(latents=str(root / "lat"), out=str(tmp_path / "one"), steps=6, log_every=1, **TINY)
    poisoned_objective(monkeypatch, {3})  # one bad batch: skipped, counted and logged; the run goes on
    result = train_generator(cfg, progress=False)
    assert result["steps"] == 6 and not result["stopped"]
    assert "step 3: non-finite loss or gradient, step skipped (1/20)" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in log] == [0, 0, 1, 1, 1, 1]
    assert log[2]["nonfinite"] == 1.0 and "loss" not in log[2]  # the skipped step's NaN is no one's mean
    assert all(all_finite(torch.load(p, weights_only=True)) for p in list_checkpoints(tmp_path / "one"))
    assert all(torch.isfinite(p).all() for p in load_generator(tmp_path / "one")[0].parameters())

    # every step from 3 on is bad: at the third the run stops, writing nothing more (was: NaN checkpoints
    # rotating the good ones out, an all-NaN export and exit status 0)
    poisoned_objective(monkeypatch, set(range(3, 100)))
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(tmp_path / "two"), *FLAGS,
                 "--steps", "10", "--checkpoint-every", "2", "--max-nonfinite", "3"]) == 3
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("softvq train-generator: error: stopped at step 5: 3 steps had a non-finite loss or "
                          "gradient and were skipped (limit --max-nonfinite 3), and nothing was written; the last "
                          f"good weights are in {checkpoint_path(tmp_path / 'two', 4)}. Start a new run"), err
    assert list_checkpoints(tmp_path / "two") == [checkpoint_path(tmp_path / "two", s) for s in (2, 4)]
    assert all(all_finite(torch.load(p, weights_only=True)) for p in list_checkpoints(tmp_path / "two"))
    assert not (tmp_path / "two" / "generator").exists()


def test_nonfinite_weights_are_never_saved(made, tmp_path, monkeypatch, capsys):
    from softvq.training.checkpointing import checkpoint_path, list_checkpoints

    root, _ = made
    poisoned_objective(monkeypatch, {3}, weights=True)  # the weights are infinite from step 3 on
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(tmp_path / "g"), *FLAGS,
                 "--steps", "10", "--checkpoint-every", "2"]) == 3
    assert ("stopped at step 4: the weights became non-finite (a step with a finite loss moved them to infinity), "
            f"and nothing was written; the last good weights are in {checkpoint_path(tmp_path / 'g', 2)}") \
        in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "g") == [checkpoint_path(tmp_path / "g", 2)]


def test_a_run_that_lost_its_config_json_resumes_only_with_the_settings_its_checkpoint_records(made, tmp_path,
                                                                                               capsys):
    from softvq.training.checkpointing import checkpoint_path

    root, run = made
    shutil.copytree(run, tmp_path / "run")
    config = tmp_path / "run" / "config.json"
    original = json.loads(config.read_text())
    config.unlink()
    for flags, named in ((["--lr", "5e-4", "--seed", "3"], "was trained with other settings (lr 0.0001 -> 0.0005; "
                                                           "seed 0 -> 3); a rerun continues it with the same ones"),
                         (["--width", "64"], "was trained with other settings (another generator: width 32 -> 64)"),
                         # all differences in one message, not one per rerun
                         (["--width", "64", "--lr", "5e-4"], "was trained with other settings (another generator: "
                                                             "width 32 -> 64; lr 0.0001 -> 0.0005)")):
        # were a silent resume with the new settings, and torch's "size mismatch" traceback
        assert train_cli(root, tmp_path / "run", "--steps", "6", *flags) == 2
        assert f"softvq train-generator: error: {tmp_path / 'run'} {named}" in capsys.readouterr().err
    assert not config.exists()
    # a config.json of another run does not bring its model to the checkpoint either
    other = json.loads(json.dumps(original))
    other["model"]["width"] = other["train"]["width"] = 64
    config.write_text(json.dumps(other))
    assert train_cli(root, tmp_path / "run", "--steps", "6", "--width", "64") == 2
    assert "was trained with other settings (another generator: width 32 -> 64)" in capsys.readouterr().err
    config.write_text("[]")  # was AttributeError: 'list' object has no attribute 'get'
    assert train_cli(root, tmp_path / "run", "--steps", "6") == 2
    assert ("its config.json holds a list, not a run's settings; restore it, or delete it to continue from the "
            "settings the run's checkpoints record") in capsys.readouterr().err
    config.unlink()
    assert train_cli(root, tmp_path / "run", "--steps", "6") == 0  # the same settings continue it
    rebuilt = json.loads(config.read_text())
    assert rebuilt["model"] == original["model"] and rebuilt["latents_sha1"] == original["latents_sha1"]
    assert rebuilt["continued"] == [{"at_step": 4, "from_steps": 4, "to_steps": 6}]

    # a checkpoint from before they recorded the settings cannot be checked without config.json
    config.unlink()
    file = checkpoint_path(tmp_path / "run", 6)
    torch.save({k: v for k, v in torch.load(file, weights_only=True).items() if k not in ("train", "latents_sha1")},
               file)
    assert train_cli(root, tmp_path / "run", "--steps", "8") == 2
    assert (f"{tmp_path / 'run'} has no config.json, and its checkpoint step-00000006.pt is from before checkpoints "
            f"recorded the run's settings, so continuing it cannot be checked: restore {config}") \
        in capsys.readouterr().err


def test_a_killed_run_leaves_no_half_written_files_and_no_repeated_log_steps_once_resumed(made, tmp_path, capsys):
    from softvq.training.checkpointing import checkpoint_path

    root, run = made
    killed = tmp_path / "run"
    shutil.copytree(run, killed)
    # as SIGKILL after logging steps 3 and 4 leaves it: the last checkpoint at 2, a checkpoint, an
    # export and config.json half-written, and the log's last line cut off
    checkpoint_path(killed, 4).unlink()
    shutil.rmtree(killed / "generator")
    stale = [killed / "checkpoints" / ".step-00000004.pt.k1l2d3.tmp", killed / ".config.json.a1b2c3.tmp",
             killed / "generator" / ".model.safetensors.x9y8z7.tmp"]
    for file in stale:
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"half")
    log = killed / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert train_cli(root, killed, "--steps", "5", "--log-every", "1") == 0
    assert "removed 3 half-written files a killed process left in" in capsys.readouterr().err
    assert not [file for file in stale if file.exists()]  # were left behind for good
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]  # was 1..4, 3, 4, 5


@pytest.mark.parametrize("flags, named", [
    (["--cfg", "nan"], "argument --cfg: the guidance scale is a finite number of 0 or more (1 = off), got nan"),
    (["--cfg", "inf"], "argument --cfg: the guidance scale is a finite number of 0 or more (1 = off), got inf"),
    (["--cfg", "-1"], "argument --cfg: the guidance scale is a finite number of 0 or more (1 = off), got -1"),
    (["--cfg", "2", "--interval", "nan", "0.7"], "argument --interval: noise levels lie in [0, 1] (0 data .. 1 noise), "
                                                 "got nan"),
    (["--cfg", "2", "--interval", "0", "inf"], "argument --interval: noise levels lie in [0, 1]"),
    (["--temperature", "nan"], "argument --temperature: the temperature is a finite number of 0 or more"),
    (["--clip-x0", "inf"], "argument --clip-x0: the bound is a finite positive number"),
])
def test_generate_refuses_sampling_settings_that_are_not_usable_numbers(made, tmp_path, flags, named, capsys):
    _, run = made
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["generate", str(run), "--out", str(tmp_path / "s"), "--device", "cpu", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"softvq generate: error: {named}")
    assert not (tmp_path / "s").exists()  # was "latents contain NaN" after an empty images/ and samples.json


def test_guidance_from_a_generator_without_label_dropout_says_how_to_get_one(made, tmp_path, capsys):
    from softvq.generation.guidance import Guidance

    root, _ = made
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(tmp_path / "g"), steps=1,
                                         class_dropout=0.0, **TINY), progress=False)
    assert main(["generate", str(tmp_path / "g"), "--out", str(tmp_path / "s"), "--cfg", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # was "it cannot do CFG"
    assert "this one was trained with --class-dropout 0: sample it with --cfg 1, or retrain it with --class-dropout " \
           "above 0" in err
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="finite number of 0 or more"):
        Guidance(float("nan"))


def test_messages_shared_with_eval_name_no_generate_command(made, tmp_path, capsys):
    root, run = made
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "generator")
    for given, named in ((stopped, "rerun the same train-generator command to finish it (it continues from its last "
                                   f"checkpoint); or pass its last checkpoint {stopped}/checkpoints/step-00000004.pt "
                                   f"in its place"),
                         (root / "lat", f"train one on it with `softvq train-generator --latents {root / 'lat'} "
                                        f"--out RUN` and pass RUN in its place")):
        for command in (["eval", "--probe-generator", str(given), "--probe", str(root / "lat")],
                        ["generate", str(given), "--out", str(tmp_path / "s")]):
            assert main([*command, "--device", "cpu"]) == 2
            err = capsys.readouterr().err
            assert named in err and "generate " not in err.split(": error: ", 1)[1], err  # was "... generate RUN"
    from softvq.run_lock import RunLock

    with RunLock(stopped):  # still training: a rerun of train-generator would be refused by the lock
        assert main(["generate", str(stopped), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
    assert (f"{stopped} is a train-generator run still training (another process holds its lock), with no "
            f"generator/ yet; wait until it finishes; or pass its last checkpoint") in err


def test_a_generator_run_folder_is_locked_for_the_run_and_a_killed_runs_lock_file_is_no_content(made, tmp_path,
                                                                                                 capsys):
    from softvq.run_lock import LOCK_NAME, RunFolderInUse, RunLock

    root, run = made
    out = tmp_path / "gen"
    out.mkdir()  # a lock that made the folder would take it away again on release, as it stays empty
    with RunLock(out):  # another process training into it: refused before anything is written
        with pytest.raises(RunFolderInUse, match=f"this process already holds {out}"):
            train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(out), steps=2, **TINY),
                            progress=False)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
        assert train_cli(root, out, "--steps", "2") == 2
        assert f"this process already holds {out}" in capsys.readouterr().err
    (out / LOCK_NAME).write_text("12345 elsewhere\n")  # what a SIGKILL-ed run leaves: no lock is held on it
    result = train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(out), steps=2, **TINY),
                             progress=False)
    assert result["steps"] == 2 and not (out / LOCK_NAME).exists()  # let go when the run ended


def test_training_gives_the_callers_random_generators_back(made, tmp_path):
    """A run seeds the global generators to repeat exactly; a notebook's draws after it must not
    depend on whether it trained in between."""
    import random

    import numpy as np

    root, _ = made

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(2)

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = draws()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(tmp_path / "g"), steps=1, **TINY),
                    progress=False)
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_batch_that_does_not_split_over_the_processes_is_refused(made, tmp_path, monkeypatch, capsys):
    """Each process takes batch / n latents: with 15 over 2 processes one latent a step was dropped
    unsaid while config.json recorded 15 (train refuses the same batch)."""
    from types import SimpleNamespace

    import softvq.training.accelerator as accelerator_module

    monkeypatch.setattr(accelerator_module, "new_accelerator",
                        lambda **kwargs: SimpleNamespace(num_processes=2, is_main_process=True))
    monkeypatch.setattr(accelerator_module, "same_on_every_process", lambda *a, **k: None)  # no peer to ask
    root, _ = made
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(tmp_path / "g"),
                 "--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "15", "--cpu", "--quiet",
                 "--steps", "1"]) == 2
    assert "--batch-size 15 must split evenly into 2 processes; pass a multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("given", [
    dict(objective="sit"),
    dict(objective="dit", steps=50, warmup_steps=5),
    dict(objective="mar", epochs=2.5, warmup_epochs=0.5),  # the recipe's unit for MAR; steps recorded beside
    dict(objective="mar", steps=30),  # steps given: the recipe's warm-up stays in epochs
])
def test_a_run_recorded_in_config_json_is_rebuilt_from_it(given):
    from softvq.generation.train_config import GeneratorTrainConfig, config_from_record, recorded_train

    def record(cfg):
        return recorded_train(cfg.validate().resolved(count=40))

    saved = record(GeneratorTrainConfig(latents="/lat", out="/run", width=32, depth=1, heads=2, **given))
    assert record(config_from_record(saved)) == saved  # what `train-generator --out RUN` continues with
    longer = record(config_from_record(saved, epochs=9.0))  # a new length replaces the recorded pair
    assert longer["epochs"] == 9.0 and longer["steps"] == math.ceil(9.0 * 40 / saved["batch_size"])
    assert {k: v for k, v in longer.items() if k not in ("steps", "epochs")} == \
        {k: v for k, v in saved.items() if k not in ("steps", "epochs")}


def test_fp16_is_refused_on_a_cpu_where_it_would_train_in_float32(tmp_path):
    lat = tiny_latent_set(tmp_path)
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a GPU .* pass --mixed-precision bf16 or no"):
        train_generator(GeneratorTrainConfig(latents=str(lat), out=str(tmp_path / "g"), steps=1,
                                             mixed_precision="fp16", **TINY), progress=False)
    assert not (tmp_path / "g").exists()


def test_a_run_starts_by_saying_what_it_trains_and_where(tmp_path, capsys):
    lat = tiny_latent_set(tmp_path)
    train_generator(GeneratorTrainConfig(latents=str(lat), out=str(tmp_path / "g"), steps=1, **TINY), progress=False)
    err = capsys.readouterr().err
    assert re.search(rf"run {re.escape(str(tmp_path / 'g'))}: SIT, width 32, depth 1, 2 heads, 0\.\d\d M parameters; "
                     r"\d+ latents of 16x8, \d class\(es\)\n1 process\(es\) on cpu \(mixed precision no\), batch 4, "
                     r"lr 0\.0001, 1 steps from step 0", err), err
    assert "is a GPU recipe" not in err  # said for a recipe-sized model on a CPU only


def test_folders_may_be_given_as_paths_and_are_recorded_as_text(tmp_path):
    """pretokenize and from_pretrained take pathlib.Path; so does the generator's config, which
    writes them to config.json as text."""
    from pathlib import Path

    from softvq.generation import train, train_config

    assert train.config_from_record is train_config.config_from_record  # its home before the split
    cfg = GeneratorTrainConfig(latents=Path("runs/latents"), out=tmp_path / "run", tokenizer=Path("tok"))
    assert (cfg.latents, cfg.out, cfg.tokenizer) == ("runs/latents", str(tmp_path / "run"), "tok")
    cfg.validate()  # was: "latents must be a string, got PosixPath('runs/latents')"


def test_a_run_continued_from_python_without_latents_is_told_how(tmp_path):
    """The CLI continues a run from its config.json alone; from Python the error named that file as
    holding no run's settings. It now says how, and config_from_record takes the whole file."""
    import json

    from softvq.generation.train_config import config_from_record
    from tests.tiny_generation import TINY, tiny_latent_set

    tiny_latent_set(tmp_path)
    run = tmp_path / "run"
    train_generator(GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(run), steps=2, **TINY), progress=False)
    with pytest.raises(ValueError, match=r"records the run's settings: continue it with config_from_record\(.*"
                                         rf"out='{run}', steps=\.\.\.\)"):  # out: config.json may record it relative
        train_generator(GeneratorTrainConfig(out=str(run), steps=3), progress=False)
    record = json.loads((run / "config.json").read_text())
    assert config_from_record(record, steps=3) == config_from_record(record["train"], steps=3)
    assert train_generator(config_from_record(record, steps=3), progress=False)["steps"] == 3


def test_keep_checkpoints_0_keeps_them_all_as_the_tokenizer_trainer_does(tmp_path):
    from tests.tiny_generation import TINY, tiny_latent_set

    tiny_latent_set(tmp_path)
    cfg = GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "run"),
                               **{**TINY, "steps": 4, "checkpoint_every": 1, "keep_checkpoints": 0})
    train_generator(cfg, progress=False)  # was: "--keep-checkpoints must be 1 or more"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        f"step-{s:08d}.pt" for s in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match=r"--keep-checkpoints must be 0 \(keep all\) or more, got -1"):
        GeneratorTrainConfig(latents="lat", keep_checkpoints=-1).validate()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_training_inside_a_callers_no_grad_trains_all_the_same(made, tmp_path, mode):
    """A notebook cell under torch.no_grad() ended the run in "element 0 of tensors does not require
    grad" after its run folder was made."""
    root, _ = made
    with getattr(torch, mode)():
        result = train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(tmp_path / "run"), steps=2,
                                                      **TINY), progress=False)
    assert result["steps"] == 2 and result["last_loss"] is not None
