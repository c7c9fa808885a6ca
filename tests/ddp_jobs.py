"""Run under torchrun by tests/test_distributed_training.py: trains the runs a JSON file lists
through the library entry point (`procedures.train_run`), one after another in one process
group, so that the suite pays torchrun's start-up once for several runs.

Each job: {"out": DIR, "config": {...Config dict...}, "resume": bool, "stop_rank": int|null,
"stop_after": int|null}: a job with stop_rank asks that rank alone to stop after `stop_after`
of its stop checks, as a SIGTERM to that one process would. Each rank writes the stops it
met to JOBS.stops.rankN."""

from __future__ import annotations

import json
import sys

import torch


class StopOnOneRank:
    """A stop flag raised on one rank after n checks."""

    def __init__(self, rank: int | None, after: int | None):
        from sparse_training.torchrun import environment_rank

        self.armed = rank is not None and rank == environment_rank()
        self.after, self.checks, self.signal_name = after, 0, "SIGTERM"

    def __bool__(self) -> bool:
        self.checks += 1
        return self.armed and self.checks > self.after


def main(path: str) -> None:
    from sparse_training.config import Config
    from sparse_training.torchrun import environment_rank
    from sparse_training.procedures import UserInterrupted, train_run

    torch.set_num_threads(1)
    stops = []
    for job in json.loads(open(path).read()):
        stop = StopOnOneRank(job.get("stop_rank"), job.get("stop_after"))
        try:
            train_run(Config.from_dict(job["config"]), job["out"], resume=job.get("resume", False), stop=stop,
                      log=lambda message: None)
        except UserInterrupted as interrupted:
            stops.append(str(interrupted))
    with open(f"{path}.stops.rank{environment_rank()}", "w") as file:  # what each rank was told
        json.dump(stops, file)


if __name__ == "__main__":
    main(sys.argv[1])
