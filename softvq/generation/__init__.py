"""Generation on a tokenizer's latents (paper Sec. 4.1-4.2, Tab. 1-2): DiT, SiT and MAR.

The pipeline, one module per step (none is imported by ``import softvq``):

* :mod:`~softvq.generation.latent_sources` → :mod:`~softvq.generation.pretokenize` →
  :mod:`~softvq.generation.latents` — images to latent shards and back (``softvq pretokenize``);
* :mod:`~softvq.generation.train` — train a generator on them (``softvq train-generator``): its
  settings and recipes in :mod:`~softvq.generation.train_config`, the checks before a run in
  :mod:`~softvq.generation.run_inputs`, the run folder across reruns in
  :mod:`~softvq.generation.run_folder`, and :mod:`~softvq.generation.objective` choosing between
  :mod:`~softvq.generation.transport` (SiT), :mod:`~softvq.generation.diffusion` (DiT) and
  :mod:`~softvq.generation.diffloss` (MAR);
* :mod:`~softvq.generation.models` / :mod:`~softvq.generation.mar` with
  :mod:`~softvq.generation.embeddings` — the networks; :mod:`~softvq.generation.checkpoint` — on disk;
* :mod:`~softvq.generation.sampling` with :mod:`~softvq.generation.guidance` — labels to latents;
  :mod:`~softvq.generation.samples` — a resumable folder of images (``softvq generate``);
* :mod:`~softvq.generation.flops` / :mod:`~softvq.generation.benchmark` — Tab. 1's GFLOPs and throughput.
"""
