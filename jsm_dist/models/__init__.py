"""JSM networks: CPD saliency/depth networks, SSM, the TSM text network, in one JSMModel."""

from jsm_dist.models.config import ModelConfig
from jsm_dist.models.jsm_model import JSMModel, clip_grad_value, load_model, save_model

__all__ = ["JSMModel", "ModelConfig", "clip_grad_value", "load_model", "save_model"]
