"""Evaluation: the paper's metrics computed correctly, linear probing, and pictures.

Modules (each importable on its own; none is imported by ``import softvq``):

* :mod:`~softvq.evaluation.inception` — the FID InceptionV3 on the real FID weights;
* :mod:`~softvq.evaluation.fid`       — FID (eigen-decomposition), cached reference statistics,
  Inception Score, precision / recall;
* :mod:`~softvq.evaluation.metrics`   — PSNR, SSIM, codebook usage / perplexity, latent moments;
* :mod:`~softvq.evaluation.sources`   — evaluation images from folders or tar shards, in order;
* :mod:`~softvq.evaluation.evaluate`  — the ``softvq eval`` protocol of a tokenizer;
* :mod:`~softvq.evaluation.generated` — gFID, IS, precision / recall of generated samples;
* :mod:`~softvq.evaluation.saved_state` — what an interrupted evaluation keeps to continue;
* :mod:`~softvq.evaluation.report`    — ``eval.json`` and the ``eval.md`` table;
* :mod:`~softvq.evaluation.probe`     — linear probing of frozen latents (paper C.3);
* :mod:`~softvq.evaluation.generator_probe` — the same probe on a DiT / SiT's block features (Fig. 3(b));
* :mod:`~softvq.evaluation.plots` / :mod:`~softvq.evaluation.runs` — the ``softvq plot`` pictures.
"""
