"""Pretraining stages before Spectron: models trained on one modality, loaded by Spectron."""
