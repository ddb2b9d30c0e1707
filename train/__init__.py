"""Fine-tuning: data, loss, optimizer, LoRA, the jitted step, the loop and Orbax checkpoints.

Installed as `jaxmodels.train` (the repo keeps it in the top-level folder `train/`). The model library
(`jaxmodels` proper) never imports this package.

    from jaxmodels.train import TrainConfig, train
    trainer = train(TrainConfig(model="ckpt", data="train.jsonl", out="runs/x", steps=1000))
"""

from jaxmodels.train.config import TrainConfig, TrainError
from jaxmodels.train.export import export_run
from jaxmodels.train.loop import Trainer, train
from jaxmodels.train.loss import lm_loss

__all__ = ["TrainConfig", "TrainError", "Trainer", "train", "export_run", "lm_loss"]
