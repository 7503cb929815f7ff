"""Training: data, the jitted train step over optax, orbax checkpoints, the loop and CLI.

    python -m jaxlm.train                       # tiny model on the stdlib's own source
    python -m jaxlm.train --preset small --steps 2000 --model.dtype bfloat16
    python -m jaxlm.train --task sft --init RUN --data chats.jsonl      # or stdlib-sft
    python -m jaxlm.train --task dpo --init RUN --data pairs.jsonl --loss dpo --beta 0.1
"""
from .config import TrainConfig
from .loop import TrainingDiverged, train
from .step import TrainState, make_optimizer, make_train_step

__all__ = ["TrainConfig", "TrainState", "TrainingDiverged", "make_optimizer",
           "make_train_step", "train"]
