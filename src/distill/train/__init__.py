"""Training: the loop (one process or many, through Accelerate), its settings, and run tracking."""
