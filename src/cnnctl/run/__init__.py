"""Training runs: the trainer (`engine`), a run's start (`start`: data, init_from, whitening, optimizer,
runner), checkpoints, run directories and their files, loggers, callbacks and the terminal display, loading a
checkpoint into a model, the training step and MPI (`distributed`). It imports `core`, `config` and `data`.
"""
