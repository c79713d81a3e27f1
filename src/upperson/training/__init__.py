"""Training: optimizer and schedule, the loop, resumable checkpoints."""
