"""Neural-network layers (flax.linen). Nothing here knows about gin, seqio or the trainer."""
