"""Training and evaluation around the pvt_detr model library: engine, optimiser, checkpoints, logs, launch."""
