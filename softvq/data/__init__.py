"""Images in, batches out: where a run's training and held-out images come from.

* :mod:`~softvq.data.bundled` — the embedded default: crops of the photos inside installed packages;
* :mod:`~softvq.data.folder` / :mod:`~softvq.data.shards` — a folder of image files, or WebDataset tar shards;
* :mod:`~softvq.data.images` — reading one file into a tensor, corrupt files skipped and counted;
* :mod:`~softvq.data.transforms` — random crop and flip from an explicit RNG (resumable);
* :mod:`~softvq.data.sampler` — deterministic, resumable batches, the same on any number of processes;
* :mod:`~softvq.data.loader` — the stream and held-out set a :class:`~softvq.training.TrainConfig` asks for;
* :mod:`~softvq.data.workers` — what the DataLoader's worker processes do.
"""
