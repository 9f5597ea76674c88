"""Training stages: each is a Task plugged into the one training loop (lmforge.train.trainer)."""
