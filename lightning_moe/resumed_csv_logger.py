"""The CSV logger of a resumed run: Lightning's ``CSVLogger`` deletes the ``metrics.csv`` it finds in its
version folder; a run that continues from a checkpoint keeps the rows it logged before the interruption."""

from __future__ import annotations

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["ResumedCSVLogger"]


class _KeptRowsWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv`` under its header (a new key rewrites the header, rows kept)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = file.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class ResumedCSVLogger(CSVLogger):
    """``CSVLogger`` for a run resumed into its previous version folder (``lightning_moe.train`` picks it);
    rows of steps replayed after the last checkpoint appear twice, with the same step."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeptRowsWriter(log_dir=self.log_dir)
        return self._experiment
