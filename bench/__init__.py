"""The benchmark of increment-service (python -m bench.run, from the repository root).

bench/ceiling.py and bench/naive.py are servers run as scripts, by path, in processes of
their own (they import their neighbour bench/minimal.py as a script does).
"""
