"""``RunCSVLogger``: Lightning's ``CSVLogger`` for a run directory that a resumed run writes into again.

Lightning's CSV writer deletes an existing ``metrics.csv`` (with a warning) when its folder is not empty. A run
resumed into its own directory would lose every row logged before the interruption; this writer appends to the
file instead, under the header it already has (Lightning rewrites the header when new columns appear).
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


class _AppendingWriter(ExperimentWriter):
    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) whose ``metrics.csv`` is appended to, never deleted, when it is already there."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
