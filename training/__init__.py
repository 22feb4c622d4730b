"""train.py's pieces; train.py puts them together (the command line, the run, the exit codes).

- config: TrainConfig, every setting of a run, and its presets, SCRATCH and FINE_TUNE
- flags: the command line's flags, each a TrainConfig field
- checkpoints: one file per place in training, the newest that loads resumed
- loops: an epoch of the image CNN, an epoch of the model of the strokes, stopping on a signal
- build: the device, the network and its optimizers (new, from --init, or resumed)
- metrics: accuracy and calibration as the app reads digits, after each epoch and at the end
- model_file: the weights and model.json written
- promote: --promote, the candidate handed to registry.promotion

Each imports only modules above it in this list (and the product's modules below train.py).
"""
