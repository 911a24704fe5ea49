"""The model-family seam (`family.py`), the tasks (`tasks.py`), timm as its first family, and building models from checkpoints."""

from lowrank_cli.models.build import ArchitectureHint, Built, NoArchitecture, build_model, create_model, load, load_state_dict_strict
from lowrank_cli.models.family import Candidate, ImageConfig, Inputs, ModelFamily, get_family, linear_candidates
from lowrank_cli.models.tasks import TASKS, Task, get_task

__all__ = ["ArchitectureHint", "Built", "NoArchitecture", "Candidate", "ImageConfig", "Inputs", "ModelFamily", "build_model", "create_model", "get_family", "linear_candidates", "load", "load_state_dict_strict", "TASKS", "Task", "get_task"]
