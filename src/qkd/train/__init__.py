"""Training: planning stages, the trainer with its run folder, and the one-call :func:`fit`.

``stages`` plans, ``optim`` builds optimizers and schedules, ``batches`` replays the data per (seed, stage,
epoch), ``loop`` runs one epoch, ``trainer`` runs the stages with checkpoints; ``state`` is where a run
stands, ``resume`` reads it back, ``measure`` evaluates and summarises, ``quantize`` swaps and calibrates
the student; ``rundir`` knows the run folder's files, ``live`` shows the run (banner, progress bars,
TensorBoard events), ``fit`` is the short form.
"""

from qkd.train.batches import Batches
from qkd.train.fit import fit
from qkd.train.stages import METHODS, Stage, plan
from qkd.train.trainer import FitResult, Trainer

__all__ = ["METHODS", "Batches", "FitResult", "Stage", "Trainer", "fit", "plan"]
