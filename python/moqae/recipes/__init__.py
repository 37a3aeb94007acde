"""Recipes that made the reference models in models/ (each model's TRAINING.json records its run)."""
