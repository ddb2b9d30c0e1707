"""Fine-tuning: data, loss, optimizer, LoRA, the jitted step, the loop and Orbax checkpoints.

Installed as `jaxmodels.train` (the repo keeps it in the top-level folder `train/`). The model library
(`jaxmodels` proper) never imports this package.
"""

from jaxmodels.train.config import TrainConfig, TrainError
from jaxmodels.train.loss import lm_loss

__all__ = ["TrainConfig", "TrainError", "lm_loss"]
