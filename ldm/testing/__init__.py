"""Helpers shared by the test suite and tools/, which compare ldm with diffusers and transformers."""
