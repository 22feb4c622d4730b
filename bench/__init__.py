"""Benchmarks of the MNIST Digit Classifier: ``python -m bench`` (or ``make bench``).

Measures inference, model loading, app cold start, PostgreSQL inserts, training, the browser's
stroke-to-prediction latency and the install footprint; prints one Markdown table and writes
``bench/results.json``. ``python -m bench --help`` lists the options.
"""
