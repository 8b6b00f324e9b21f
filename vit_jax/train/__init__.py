"""Training: the loop (`loop.train_and_evaluate`) and what it is made of.

  loop         train_and_evaluate: mesh -> input -> model -> resume -> steps -> loop
  state        the train state and the model a config names
  optim        lr schedules, AdamW/SGD, fine-tuning lr multipliers, gradient accumulation
  steps        the jitted, sharded train and eval steps
  metrics      loss, top-k, exact masked evaluation sums
  checkpoints  orbax: the latest K and the best, data state, fallback past damaged ones
  pretrained   fine-tuning: parameters from config.init_from
  preemption   SIGTERM/SIGINT: checkpoint, then exit 143/130
  workdir      config.json / run.json, --start_over, loading what a workdir trained
  report       metrics.jsonl, TensorBoard, the console line, training curves
"""
from vit_jax.train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
