"""softserve's benchmarks and studies, run as modules from the repository root
(``python -m bench.serve_bench``, ``python -m bench.studies.label_budget``); what they
share is in :mod:`bench.harness`."""
