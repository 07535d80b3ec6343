"""Training: planning stages, the trainer with its run folder, and the one-call :func:`fit`.

``stages`` plans, ``optim`` builds optimizers and schedules, ``loop`` runs one epoch, ``trainer``
runs the stages with checkpoints, ``rundir`` knows the run folder's files, ``live`` shows the run (banner,
progress bars, TensorBoard events), ``fit`` is the short form.
"""

from qkd.train.fit import fit
from qkd.train.stages import METHODS, Stage, plan
from qkd.train.trainer import Batches, FitResult, Trainer

__all__ = ["METHODS", "Batches", "FitResult", "Stage", "Trainer", "fit", "plan"]
