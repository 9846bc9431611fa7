"""What ``python -m lightning_dpgan`` runs, below its entry point (``lightning_dpgan.cli``).

``checks``: the configuration checked and its objects built once, before any worker starts; ``folders``: a run
folder's overrides, its resume line, and the directory check; ``verbs``: ``fit``, ``validate``, ``sample`` and
``topology``.
"""
