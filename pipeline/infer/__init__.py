"""Tiles through the model: the model wrapper, the bounded ordered stream of
read -> model -> post-process, and the torch-free code its worker processes run."""
