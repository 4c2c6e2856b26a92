"""nanoebm's helpers for the two command-line programs and the benchmarks.

The model itself lives in the top-level `modeling_nanoebm.py`, `configuration_nanoebm.py` and `tokenization_char.py`,
the three files a saved model folder carries; nothing here is needed to load or run a saved model. This package
holds what `run_train.py` and `run_generate.py` share (the corpus, the validation blocks, the metric, the command
line) and the pictures, so that neither program imports the other. Importing it costs no torch or transformers.
"""
