"""Imported by every Python process started with this folder on ``PYTHONPATH`` (``site`` imports ``sitecustomize``).

In the worker whose ``LOCAL_RANK`` is ``DPGAN_TEST_KILL_RANK``: once the file ``DPGAN_TEST_KILL_FLAG`` exists and
holds a step, the first evaluation after that step kills the worker (SIGKILL) as it starts scoring, while the other
members enter the metrics' gathers. A test's way to put a death inside an evaluation of a real CLI run, with nothing
in the package for it. Every other process is left as it is.
"""

import os

if os.environ.get("DPGAN_TEST_KILL_FLAG") and os.environ.get("LOCAL_RANK") == os.environ.get("DPGAN_TEST_KILL_RANK"):
    import signal

    from lightning_dpgan.evaluation import GANEvaluation

    _evaluate, _score = GANEvaluation.evaluate, GANEvaluation._score
    _due = {"now": False}

    def _evaluate_noting_the_step(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        flag = os.environ["DPGAN_TEST_KILL_FLAG"]
        _due["now"] = os.path.exists(flag) and trainer.global_step > int(open(flag).read() or 0)
        return _evaluate(self, trainer, pl_module)

    def _score_or_die(self, samples):  # type: ignore[no-untyped-def]
        if _due["now"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _score(self, samples)

    GANEvaluation.evaluate, GANEvaluation._score = _evaluate_noting_the_step, _score_or_die
