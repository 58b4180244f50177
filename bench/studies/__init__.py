"""The research studies: training runs through a real server, their results files in
``bench/results/`` and the reports made from them (``python -m bench.studies.loss_study``,
``python -m bench.studies.label_budget``); :mod:`bench.studies.study` is what they share."""
