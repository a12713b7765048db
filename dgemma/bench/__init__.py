"""Benchmark harness: presets, FLOP accounting, measuring instruments, baselines, reports and plots."""

from dgemma.bench.harness import BenchSpec, RunResult, format_table, measure_dgemma, run_benchmark, write_report
from dgemma.bench.plot import plot_reports
from dgemma.bench.presets import PRESETS, preset_config

__all__ = ["BenchSpec", "RunResult", "run_benchmark", "measure_dgemma", "format_table", "write_report",
           "plot_reports", "PRESETS", "preset_config"]
