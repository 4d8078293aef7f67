"""The numerical core: layers (`nn`), the functional kernels, convolution algorithms (lowering, pointwise,
Winograd), the execution plan that runs a model (`plan.Runner`), optimizers, schedules, weight averaging, cnnctl's
own threads (`parallel`), the memory check, atomic file writes and what the machine is (`environment`). It knows
nothing of configs, data, runs or the command line: it imports only NumPy, the standard library and cnnctl's base
modules (`errors`, `registry`, `strict`, `version`).
"""
