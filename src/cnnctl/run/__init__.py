"""Training runs: a run's start (`start`: seeds, data, init_from, whitening, optimizer, runner), the session before
`fit` (`session`: config or resume, MPI sharing, the run directory), the trainer (`trainer`) and its epoch (`loop`),
the training step (`step`), evaluation (`evaluation`), the frozen-prefix cache (`frozen`), numeric warnings
(`numerics`), checkpoints, run directories and their files, loggers, callbacks and the terminal display, loading a
checkpoint into a model, and MPI (`distributed`). It imports `core`, `config` and `data`.
"""
