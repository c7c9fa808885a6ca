"""Sweeps: a grid of runs (methods x sparsities x seeds ...) and their analyses, run through
submitit (locally or on SLURM), idempotently: finished runs are skipped, interrupted ones
continued. `spec` parses and checks the TOML spec, `layout` owns the sweep directory and the
runs' states, `jobs` is what one job runs, `execute` schedules the jobs."""

from .execute import (Resources, check_resources, dry_run, prepare, run_sweep, sbatch_preview, sbatch_text,
                      slurm_executor, todo)
from .layout import STATES, SweepDir, check_out, run_state, status
from .spec import ANALYSES, PlannedRun, Spec, check_compatible, parse_spec, read_spec, run_name, validate_configs

__all__ = ["ANALYSES", "STATES", "PlannedRun", "Resources", "Spec", "SweepDir", "check_compatible", "check_out",
           "check_resources", "dry_run", "parse_spec", "prepare", "read_spec", "run_name", "run_state", "run_sweep",
           "sbatch_preview", "sbatch_text", "slurm_executor", "status", "todo", "validate_configs"]
