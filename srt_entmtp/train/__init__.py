"""Self-distillation data and draft-head training (`scripts/train_heads.py`, `srt_entmtp.train.cli.main`)."""
