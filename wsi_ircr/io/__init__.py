"""File input/output helpers shared by training, evaluation and the slide pipeline."""
