"""The training helpers' smaller promises, one at a time: the EMA's saved state, the lr schedule's
ends and a resume's optimiser settings, AdamW's eps, Ctrl-C relays, finiteness checks, the held-out
metrics (EMA weights, clipped reconstructions, means), the log's non-finite values and line ends,
grid captions, checkpoint names, set-aside lines and the run folder's checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from softvq.training.ema import EMA
from softvq.training.schedule import lr_factor


# --- ema ---------------------------------------------------------------------------------------

def test_ema_state_dict_is_a_snapshot_that_load_state_dict_restores():
    """A state taken with state_dict() and loaded back after more updates restores the average as
    it was when the state was taken (a checkpoint of step k resumes at step k's average)."""
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    saved = ema.state_dict()
    at_save = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model)
    ema.update(model)
    ema.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, at_save))
    assert ema.num_updates == 1


def test_ema_load_state_dict_with_missing_parameters_refuses_and_changes_nothing():
    """A state lacking some tracked parameter is refused with KeyError before any shadow weight is
    overwritten (no half-loaded average)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = EMA(model, decay=0.5, warmup=False)
    before = [s.clone() for s in ema.shadow]
    state = ema.state_dict()
    names = list(state["shadow"])
    partial = {names[0]: torch.full_like(state["shadow"][names[0]], 7.0)}  # the first name only
    with pytest.raises(KeyError):
        ema.load_state_dict({"shadow": partial, "num_updates": 3})
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before))
    assert ema.num_updates == 0


# --- schedule ----------------------------------------------------------------------------------

def test_an_unknown_schedule_kind_is_refused_after_the_warm_up():
    """lr_factor knows 'cosine' and 'constant' only; any other kind is a ValueError (not a silent cosine)."""
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(5, total_steps=10, warmup_steps=2, kind="linear")


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_the_cosine_stays_at_its_floor_past_the_last_step(min_ratio):
    """Past total_steps (a run resumed with more steps than its schedule, an extra scheduler step) the
    cosine stays at min_ratio instead of rising back along cos(pi t) for t > 1."""
    for step in (100, 120, 150, 199):
        assert lr_factor(step, total_steps=100, warmup_steps=10, min_ratio=min_ratio) == pytest.approx(min_ratio)


def test_a_resume_keeps_the_current_configs_betas_weight_decay_and_eps():
    """load_training_state restores the moments and the schedule's position but keeps the *current*
    optimizer's betas, weight decay and eps (a resume with changed optim settings uses them)."""
    from softvq.training.optim import build_optimizer
    from softvq.training.schedule import build_scheduler, load_training_state

    torch.manual_seed(0)
    old_model = nn.Linear(3, 3)
    old = build_optimizer(old_model.named_parameters(), name="adamw", lr=1e-3, betas=[0.9, 0.95],
                          weight_decay=1e-4, eps=1e-8)
    old_sched = build_scheduler(old, total_steps=10, warmup_steps=2)
    old_model(torch.randn(4, 3)).square().sum().backward()
    old.step()
    old_sched.step()
    new_model = nn.Linear(3, 3)
    new = build_optimizer(new_model.named_parameters(), name="adamw", lr=1e-3, betas=[0.5, 0.9],
                          weight_decay=0.05, eps=1e-6)
    new_sched = build_scheduler(new, total_steps=10, warmup_steps=2)
    load_training_state(new, new_sched, old.state_dict(), old_sched.state_dict())
    decayed = [g for g in new.param_groups if g["name"] == "decay"][0]
    assert decayed["weight_decay"] == 0.05
    for group in new.param_groups:
        assert tuple(group["betas"]) == (0.5, 0.9) and group["eps"] == 1e-6
    assert new_sched.last_epoch == 1  # the schedule's position did come from the checkpoint


# --- optim -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_build_optimizer_uses_the_given_eps(name):
    """optim.eps reaches the optimizer (AdamW and Adam alike)."""
    from softvq.training.optim import build_optimizer

    opt = build_optimizer(nn.Linear(3, 3).named_parameters(), name=name, lr=1e-3, betas=[0.9, 0.95],
                          weight_decay=1e-4, eps=1e-5)
    assert [g["eps"] for g in opt.param_groups] == [1e-5] * len(opt.param_groups)


# --- stopping ----------------------------------------------------------------------------------

def test_a_ctrl_c_relayed_right_after_the_first_signal_only_requests_a_stop():
    """With a real-looking clock (monotonic time far from 0) a SIGINT arriving at the same moment as
    the first signal is the same request relayed: no KeyboardInterrupt, only the flag; a Ctrl-C
    REPEAT_AFTER_SECONDS later stops at once."""
    import os
    import signal

    from softvq.training.stopping import REPEAT_AFTER_SECONDS, StopRequests

    now = [5000.0]
    with StopRequests(clock=lambda: now[0]) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        now[0] += 0.1
        try:
            os.kill(os.getpid(), signal.SIGINT)  # relayed: must not raise
            stop.count += 0  # a bytecode for the handler to run at
        except KeyboardInterrupt:
            pytest.fail("a SIGINT 0.1 s after the first signal stopped at once")
        assert stop.requested and stop.count == 2
        now[0] += REPEAT_AFTER_SECONDS
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            stop.count += 0  # a bytecode for the handler to run at


def test_all_finite_is_false_when_any_single_value_is_not_finite():
    """all_finite looks at every value: one NaN or inf inside an otherwise finite tensor makes it False."""
    from softvq.training.stopping import all_finite

    good = torch.ones(3)
    assert all_finite([good, torch.zeros(2, 2)])
    assert not all_finite([good, torch.tensor([1.0, float("nan"), 2.0])])
    assert not all_finite([torch.tensor([[0.0, float("inf")]]), good])
    assert not all_finite([torch.tensor([float("nan")])])


# --- heldout -----------------------------------------------------------------------------------

def test_an_exact_reconstruction_logs_a_finite_100_db():
    """heldout_psnr floors the MSE at 1e-10 on the [0, 1] scale: an exact reconstruction gives 100 dB,
    a finite number JSON can hold, not inf."""
    from softvq.training.heldout import heldout_psnr, reconstruction_metrics

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert heldout_psnr(x, x).tolist() == pytest.approx([100.0, 100.0])
    assert reconstruction_metrics(x, x)["psnr"] == pytest.approx(100.0)


def test_the_held_out_psnr_is_the_mean_over_all_images():
    """reconstruction_metrics' psnr is the mean of each image's PSNR (10 log10(1 / MSE) on the [0, 1]
    scale), over every image, not one image's."""
    from softvq.training.heldout import reconstruction_metrics

    x = torch.zeros(3, 3, 4, 4)
    offsets = [0.1, 0.2, 0.4]  # on the [-1, 1] scale: MSE (d / 2)^2 on the [0, 1] scale
    y = torch.stack([torch.full((3, 4, 4), d) for d in offsets])
    expected = sum(10 * math.log10(1 / (d / 2) ** 2) for d in offsets) / 3
    assert reconstruction_metrics(x, y)["psnr"] == pytest.approx(expected, rel=1e-5)


class _MeanAbsLPIPS(nn.Module):
    """A stand-in perceptual metric: the mean |a - b| per image (with a buffer, as LPIPS has)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, a, b):
        return (a - b).abs().flatten(1).mean(1) * self.scale


def test_lpips_sees_reconstructions_clipped_to_the_image_range_and_is_the_mean_over_images():
    """The LPIPS of the held-out metrics is measured on reconstructions clipped to [-1, 1] (the image a
    grid shows and the PSNR measures), averaged over every image across batches."""
    from softvq.training.heldout import reconstruction_metrics

    x = torch.zeros(3, 1, 2, 2)
    y = torch.stack([torch.full((1, 2, 2), v) for v in (3.0, -0.5, 0.25)])  # the first overshoots the range
    out = reconstruction_metrics(x, y, _MeanAbsLPIPS(), batch_size=2)
    assert out["lpips"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)


class _Scaler(nn.Module):
    """A stand-in tokenizer whose reconstruction is its input times one learned number."""

    def __init__(self, value):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))

    def forward(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(reconstruction=x * self.w)


def _monitor(tmp_path, images, grid_images):
    from softvq.data.loader import HeldOut
    from softvq.training.heldout import HeldOutMonitor

    return HeldOutMonitor(HeldOut(images=images, names=[str(i) for i in range(len(images))]), tmp_path,
                          grid_images=grid_images, eval_lpips=False, batch_size=2, autocast=None,
                          device=torch.device("cpu"), is_main=True)


def test_the_held_out_metrics_measure_the_ema_weights_and_the_training_weights_come_back(tmp_path):
    """HeldOutMonitor.grid measures the EMA weights (not the training ones) on the held-out images,
    and leaves the training weights as they were."""
    from softvq.training.heldout import heldout_psnr

    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    model = _Scaler(0.5)
    ema = EMA(model, decay=0.9, warmup=False)  # the average holds 0.5
    with torch.no_grad():
        model.w.fill_(1.0)  # the training weights reconstruct exactly
    metrics = _monitor(tmp_path, images, 2).grid(model, ema, model, step=3)
    expected = float(heldout_psnr(images, images * 0.5).mean())
    assert metrics["psnr"] == pytest.approx(expected) and metrics["psnr"] < 99
    assert model.w.item() == 1.0
    assert (tmp_path / "grids" / "step-00000003.png").is_file()


def test_the_grid_shows_grid_images_columns_while_all_images_are_measured(tmp_path):
    """The grid PNG has ``grid_images`` columns (the first held-out images); the metrics still cover all."""
    from PIL import Image

    from softvq.training.grid import reconstruction_grid
    from softvq.training.heldout import heldout_psnr

    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    model = _Scaler(0.5)
    ema = EMA(model, decay=0.9, warmup=False)
    metrics = _monitor(tmp_path, images, 2).grid(model, ema, model, step=1)
    with Image.open(tmp_path / "grids" / "step-00000001.png") as png:
        width = png.width
    assert width == reconstruction_grid(images[:2], images[:2] * 0.5).width
    assert width < reconstruction_grid(images, images * 0.5).width
    assert metrics["psnr"] == pytest.approx(float(heldout_psnr(images, images * 0.5).mean()))


# --- logging -----------------------------------------------------------------------------------

def test_non_finite_scalars_are_logged_as_strings_in_strict_json(tmp_path):
    """log.jsonl stays standard JSON: a NaN or inf value is written as a string ("nan", "inf"), finite
    ones as numbers."""
    import json

    from softvq.training.logging import RunLogger, read_log

    logger = RunLogger(tmp_path, tensorboard=False)
    logger.scalars(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5}, echo=False)
    logger.close()
    line = (tmp_path / "log.jsonl").read_text().splitlines()[0]

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    record = json.loads(line, parse_constant=refuse)
    assert (record["loss"], record["grad_norm"], record["lr"]) == ("nan", "inf", 0.5)
    assert read_log(tmp_path)[0]["step"] == 1


def test_dropping_no_records_still_ends_a_whole_last_line(tmp_path):
    """drop_records_after ends a whole last record that lacks its newline, so the resumed run's next
    record starts on its own line (every record stays readable), even when nothing is dropped."""
    import json

    from softvq.training.logging import drop_records_after, read_log

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}')  # killed before the newline
    assert drop_records_after(path, 5) == []
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.125}) + "\n")  # what RunLogger appends next
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


# --- grid --------------------------------------------------------------------------------------

def test_captions_take_a_shorter_form_when_any_column_refuses_the_long_one():
    """One form for every column: when ``fits`` refuses "100.0 dB" for one column, all columns get the
    shorter "{:.1f}" form, even those whose long form would fit."""
    from softvq.training.grid import column_captions
    from softvq.training.heldout import heldout_psnr

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    y = x.clone()
    y[1:] = (x[1:] + 0.1 * torch.randn(x[1:].shape, generator=g)).clamp(-1, 1)  # column 0 is exact: 100 dB
    values = heldout_psnr(x, y).tolist()
    captions = column_captions(x, y, fits=lambda text: len(text) <= 7)  # "100.0 dB" is 8 characters
    assert captions == [f"{v:.1f}" for v in values] and captions[0] == "100.0"


def test_the_error_row_measures_the_reconstruction_clipped_to_the_image_range():
    """The grid's error row is |x - x̂| of the images as shown and saved, i.e. with x̂ clipped to [-1, 1]:
    an overshoot past white counts only up to white."""
    import numpy as np

    from softvq.training.grid import reconstruction_grid

    x = torch.full((1, 3, 16, 16), 0.8)
    y = torch.full((1, 3, 16, 16), 1.2)  # clipped: 1.0, an error of 0.2 on [-1, 1] = 0.1 on [0, 1]
    grid = reconstruction_grid(x, y, pad=2)
    tiles = np.asarray(grid).astype(int)
    margin = grid.width - (16 + 2) - 2
    error_tile = tiles[2 * (16 + 2) + 2:3 * (16 + 2), margin + 2:margin + 2 + 16]
    assert np.abs(error_tile - 0.1 * 4 * 255).max() <= 1  # gain 4: 0.4 grey, not the 0.8 of the unclipped 0.4


# --- checkpointing -----------------------------------------------------------------------------

def test_only_exact_checkpoint_names_are_listed(tmp_path):
    """A checkpoint is a file named exactly step-NNNNNNNN.pt: a backup or renamed copy beside it
    (step-…pt.bak, step-…pt.old) is neither listed nor taken as the newest."""
    from softvq.training.checkpointing import checkpoint_path, checkpoint_step, latest_checkpoint, list_checkpoints

    real = checkpoint_path(tmp_path, 4)
    real.parent.mkdir(parents=True)
    real.write_bytes(b"x")
    for name in ("step-00000009.pt.bak", "step-00000007.pt.old", "step-00000008.ptx"):
        (real.parent / name).write_bytes(b"x")
    assert list_checkpoints(tmp_path) == [real] and latest_checkpoint(tmp_path) == real
    assert checkpoint_step("step-00000009.pt.bak") is None and checkpoint_step(real) == 4


def _touch_checkpoint(run, step):
    from softvq.training.checkpointing import checkpoint_path

    path = checkpoint_path(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_an_export_made_at_the_resumed_step_stays_and_a_later_one_is_set_aside(tmp_path):
    """Continuing from the checkpoint of step N, the export/ and metrics.json made *at* step N belong to
    the line continued and stay; made later than N, they are the abandoned line's and move aside."""
    import json

    from softvq.training.checkpointing import set_aside_newer

    run = tmp_path / "same"
    keep = _touch_checkpoint(run, 6)
    (run / "metrics.json").write_text(json.dumps({"step": 6}))
    (run / "export").mkdir()
    assert set_aside_newer(run, 6, keep) is None
    assert (run / "metrics.json").is_file() and (run / "export").is_dir()

    run = tmp_path / "later"
    keep = _touch_checkpoint(run, 6)
    (run / "metrics.json").write_text(json.dumps({"step": 9}))
    (run / "export").mkdir()
    aside = set_aside_newer(run, 6, keep)
    assert aside is not None and (aside / "metrics.json").is_file() and (aside / "export").is_dir()
    assert not (run / "metrics.json").exists() and keep.is_file()


def test_lines_set_aside_again_and_again_at_one_step_each_get_their_own_folder(tmp_path):
    """Every set-aside at the same step gets a new folder (abandoned-after-N, -2, -3, ...): earlier
    lines are kept as they are."""
    from softvq.training.checkpointing import set_aside_newer

    run = tmp_path / "run"
    keep = _touch_checkpoint(run, 2)
    folders = []
    for _ in range(3):
        newer = _touch_checkpoint(run, 5)
        aside = set_aside_newer(run, 2, keep)
        assert aside is not None and (aside / newer.name).is_file() and not newer.exists()
        folders.append(aside.name)
    assert folders == ["abandoned-after-00000002", "abandoned-after-00000002-2", "abandoned-after-00000002-3"]
    assert keep.is_file()


def test_a_missing_checkpoint_is_reported_missing_not_corrupt(tmp_path):
    """load_checkpoint of a path with no file says the checkpoint does not exist (a CheckpointError),
    rather than calling it corrupt and advising to delete it."""
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.training.checkpointing import checkpoint_path, load_checkpoint

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(checkpoint_path(tmp_path, 3))
    assert "does not exist" in str(error.value) and "corrupt" not in str(error.value)


def test_a_corrupt_checkpoint_points_at_the_checkpoint_just_before_it(tmp_path):
    """A damaged checkpoint's error names the newest *earlier* checkpoint to continue from (the fewest
    steps lost), not an older one, nor a newer one."""
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.training.checkpointing import load_checkpoint, save_checkpoint

    for step in (3, 6, 9, 12):
        save_checkpoint({"step": step}, tmp_path, step, keep=0)
    damaged = tmp_path / "checkpoints" / "step-00000009.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(damaged)
    message = str(error.value)
    assert "step-00000006.pt" in message
    assert "step-00000003.pt" not in message and "step-00000012.pt" not in message


# --- run_folder --------------------------------------------------------------------------------

def test_a_folder_holding_only_a_runs_export_is_refused_for_a_new_run(tmp_path):
    """A run's export/ is a trace of a run that trained there (its output), even with the log and
    checkpoints gone: a new run there is refused, a resume is not."""
    from softvq.checkpoint.pretrained import EXPORT_NAME
    from softvq.training.run_folder import check_run_folder, run_traces

    run = tmp_path / "run"
    (run / EXPORT_NAME).mkdir(parents=True)
    (run / EXPORT_NAME / "config.json").write_text("{}")
    assert run_traces(run) == [EXPORT_NAME]
    with pytest.raises(FileExistsError):
        check_run_folder(run, new_run=True)
    check_run_folder(run, new_run=False)


@pytest.mark.parametrize("name", ["config.yaml", "log.jsonl", "metrics.json"])
def test_a_folder_where_the_run_writes_a_file_is_refused_up_front(tmp_path, name):
    """A folder standing where the run writes one of its files is refused before training, as an
    IsADirectoryError (for a resume too), not found when the file is first due."""
    from softvq.training.run_folder import check_run_folder

    run = tmp_path / "run"
    (run / name).mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=name):
        check_run_folder(run, new_run=False)


def test_a_resumed_runs_folder_with_earlier_settings_is_recognised_as_a_run(tmp_path):
    """config-until-step-N.yaml is a file a run writes (a resume with changed settings): its folder
    is another run's, to resume (the error says resume=True), not a folder of foreign files."""
    from softvq.training.run_folder import check_run_folder, is_run_file

    assert is_run_file("config-until-step-00000003.yaml") and not is_run_file("notes.yaml")
    run = tmp_path / "run"
    _touch_checkpoint(run, 6)
    (run / "config.yaml").write_text("{}")
    (run / "config-until-step-00000003.yaml").write_text("{}")
    with pytest.raises(FileExistsError, match="resume=True"):
        check_run_folder(run, new_run=True)
