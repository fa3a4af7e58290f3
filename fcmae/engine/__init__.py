"""The training engine shared by pretraining and fine-tuning: config sections, distributed setup, optimizer and
schedule, atomic checkpoints, metrics, and the loop that a task (`fcmae.engine.loop.Task`) plugs into."""
