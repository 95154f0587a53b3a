"""The DeepSpeed learner: engine setup, schedules, parameter gathering, saving."""

from posttrain.learner.engine import Learner, build_learner
from posttrain.learner.gather import iter_full_parameters

__all__ = ["Learner", "build_learner", "iter_full_parameters"]
