"""Benchmarks of the MNIST Digit Classifier: ``python -m lab.bench`` (or ``make bench``).

Measures inference, model loading, app cold start, PostgreSQL inserts, training, the browser's
stroke-to-prediction latency, the app's CPU per drawing cycle and memory over 1,000 cycles
and the install footprint; prints one Markdown table and writes
``lab/bench/results.json``. ``python -m lab.bench --help`` lists the options.
"""
