"""Core math: schedules, parametrisations, sampler steps and the sampling loop. Imports torch only."""

from .parametrization import PREDICTION_TYPES, cfg, cond_cat, cond_index, convert, from_x0_eps, guided_prediction, to_x0_eps
from .sampling import Denoiser, Trajectory, generate, sample, seeded_noise, time_grid
from .schedules import FlowSchedule, Schedule, VPSchedule, schedule_from_dict, shift_time
from .steps import SAMPLERS, StepOutput, gaussian_log_prob, get_step

__all__ = [
    "PREDICTION_TYPES", "SAMPLERS", "Denoiser", "FlowSchedule", "Schedule", "StepOutput", "Trajectory",
    "VPSchedule", "cfg", "cond_cat", "cond_index", "convert", "from_x0_eps", "gaussian_log_prob", "get_step",
    "generate", "guided_prediction", "sample", "seeded_noise", "schedule_from_dict", "shift_time", "time_grid", "to_x0_eps",
]
