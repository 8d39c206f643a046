"""Trainers: ``base.DataParallelTrainer`` and one module per framework (xgboost, torch,
tensorflow, transformers), each imported only when used (``fabric.ml.XGBoostTrainer``...)."""
