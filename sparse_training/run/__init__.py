"""The parts of a run being trained, composed around the one loop (`trainer.train_cycle`) by
`session.RunSession`: `mask_control` (the mask, the masked step, FLOP counting, mask changes),
`evaluation` (metrics.csv and the latest metrics) and `checkpointing` (checkpoints and the
resume state)."""
