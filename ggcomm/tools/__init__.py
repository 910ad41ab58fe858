"""The tools wing: what the ``ggcomm`` command runs, built on the library.

- :mod:`.cli`: the ``ggcomm`` command (``demo``, ``bench``, ``analyze``).
- :mod:`.demo`: plain DDP against ggcomm on local ranks.
- :mod:`.bench` (runner) and :mod:`.report` (tables, verdicts, plots): DDP hooks side by
  side over shaped links.
- :mod:`.analyze`: GG fits and bits per element of a model's tensors.
- :mod:`.workload`: the built-in models and data (byte-level GPT, wide MLP, corpus).
- :mod:`.train`: the one training loop the tools and the paper sweeps use.
- :mod:`.train_ddp`, :mod:`.train_pipe`: torchrun entry points (``launch/`` holds thin
  scripts that call them).
- :mod:`.testhosts`: network namespaces and shaped links for the benchmarks (root only).

Nothing in the library imports from here. ``ggcomm.cli``, ``ggcomm.demo``, ``ggcomm.bench``,
``ggcomm.analyze`` and ``ggcomm.workload`` are the same modules under their former names.
"""
