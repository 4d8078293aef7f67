"""Other formats: ONNX export and import (`onnx_import/read.py` checks a file before the importer uses it). It imports
`core`, `config`, `data` and `run` (a checkpoint is what an import writes).
"""
