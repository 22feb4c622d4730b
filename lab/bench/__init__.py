"""Benchmarks of the MNIST Digit Classifier: ``python -m lab.bench`` (or ``make bench``).

Measures inference, model loading, app cold start, PostgreSQL inserts, training, the browser's
stroke-to-prediction latency and the install footprint; prints one Markdown table and writes
``lab/bench/results.json``. ``python -m lab.bench --help`` lists the options.
"""
