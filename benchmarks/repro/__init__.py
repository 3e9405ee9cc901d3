"""The reproduction of the paper's experiments (issue 15), behind ``benchmarks/paper_repro.py``:
protocol -> training -> runner -> stats -> analysis -> plots."""
