"""Where dit4dit meets the outside world: files, checkpoints, episode and dataset formats,
released weights. Each module owns one format; none of them is the method (that is dit4dit.py)."""
