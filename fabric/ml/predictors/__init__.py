"""Predictors: a model from a checkpoint, applied to batches (one module per framework), and
``BatchPredictor`` over a Dataset in warm instances. Each framework is imported only when used."""
