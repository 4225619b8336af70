"""FID and KID in JAX with pytorch-fid's Inception: the network, its weights, features over a mesh, statistics,
references, and the evaluator `train_flax.py --fid_epochs` uses (docs/evaluation.md)."""
