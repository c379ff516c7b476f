"""psframework: a parameter server for distributed PyTorch training."""
