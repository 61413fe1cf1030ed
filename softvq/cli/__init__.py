"""The ``softvq`` command line: :mod:`~softvq.cli.main` dispatches to one module per sub-command,
with what they share in :mod:`~softvq.cli.common`."""
