"""Tokenizers on disk: our own format (:mod:`~softvq.checkpoint.pretrained`), the released SoftVQ-VAE
checkpoints (:mod:`~softvq.checkpoint.official`), and the SPEC strings that name either, a preset or a
training run (:mod:`~softvq.checkpoint.specs`)."""
