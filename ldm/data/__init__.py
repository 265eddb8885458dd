"""Datasets: captioned image folders and WebDataset shards for training, and the procedural shapes set."""
