"""The config: pydantic models of every key (`spec`), YAML reading with `extends:` and `--set` (`reading`), the
JSON Schema, user blocks, renames of old keys, validation messages, and building a model from its spec (`build`:
layers, their rows, shapes, memory and loss checks). It imports `core`, `data` (the `data:` section's models and
the dataset registry) and the base modules, never runs or tools.
"""
