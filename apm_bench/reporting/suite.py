"""The benchmark suite behind the leaderboard: methods × models × mapping kinds × active attributes
per user, each setting one recorded run over the same world seeds, plus one run per control
(no-history by default) so the leaderboard shows what every method scores without histories.

A setting's runs live in `<out>/<setting>/`; `apm leaderboard` takes each method's row from the
newest run of its setting that has it, so `apm suite run CONFIG --only METHOD` adds or refreshes one
method's rows without rerunning the others (the baseline it is compared with comes back from the
call cache unchanged).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apm_bench.errors import ConfigError, first_error
from apm_bench.inputs import read_yaml
from apm_bench.machine import usable_cpus
from apm_bench.run.config import Control, MappingKind, RunConfig

if TYPE_CHECKING:
    from apm_bench.methods.embedder import HistoryEmbedder


class SuiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["sim-large"], min_length=1)
    mappings: list[MappingKind] = Field(default_factory=lambda: ["permutation", "dense"], min_length=1)
    n_attr: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    worlds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    out: Path = Path("results/suite")
    #: controls run for every setting and method beside the real run (their Δ should be ≈ 0)
    controls: list[Control] = Field(default_factory=lambda: ["no-history"])
    #: any other run option, shared by every setting (users, history_len, method_options, ...)
    run: dict[str, Any] = Field(default_factory=dict)


def setting_name(model: str, mapping: str, n_attr: int) -> str:
    from apm_bench.reporting.results import safe_name

    return f"{safe_name(model)}__{mapping}__nattr{n_attr}"


def load_suite(path: Path) -> SuiteConfig:
    data = read_yaml(path, "suite config") or {}
    try:
        return SuiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid suite option {first_error(exc)}") from None


def plan_suite(suite: SuiteConfig, only: str | None = None) -> list[tuple[str, RunConfig]]:
    """(setting name, run config) for every setting; validated before anything runs."""
    methods = suite.methods
    if only is not None:
        from apm_bench.methods import METHODS

        METHODS.get(only)  # an unknown name fails here, with did-you-mean
        methods = [only]
    plans = []
    for model, mapping, n_attr in itertools.product(suite.models, suite.mappings, suite.n_attr):
        name = setting_name(model, mapping, n_attr)
        options = {**suite.run, "methods": methods, "model": model, "mapping": mapping, "n_attr": n_attr,
                   "worlds": suite.worlds, "out": suite.out / name, "keep_artifacts": False}
        for control in [None, *suite.controls]:
            label = name if control is None else f"{name} ({control})"
            try:
                plans.append((label, RunConfig.model_validate({**options, "control": control})))
            except ValidationError as exc:
                raise ConfigError(f"setting {label}: invalid run option {first_error(exc)}") from None
    return plans


def run_suite(
    suite: SuiteConfig,
    only: str | None = None,
    on_setting: Callable[[str, int, int], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    jobs: int = 1,
) -> list[Path]:
    """Run every setting and record each run; returns the run folders."""
    return run_plans(plan_suite(suite, only), on_setting, progress, jobs=jobs)


def default_jobs(configs: list[RunConfig]) -> int:
    """Runs at once when none is asked for: one per usable core where every role of every run is
    simulated, else one. A simulated run leaves much of a core idle (its Python between φ's and
    torch's threads), so two on two cores take about half as long; runs on real engines would
    each load their model, and they share the run's GPU."""
    from apm_bench.run.engines import fully_simulated

    return max(1, min(usable_cpus(), len(configs))) if all(fully_simulated(c) for c in configs) else 1


def check_plans(configs: list[RunConfig]) -> None:
    """Bad methods, options, catalogs or sizes in any planned run fail before the first run starts."""
    from apm_bench.run.setup import plan_methods, prepare

    for config in configs:
        plan_methods(config)
        prepare(config)


def run_plans(
    plans: list[tuple[str, RunConfig]],
    on_setting: Callable[[str, int, int], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    embedder: HistoryEmbedder | None = None,
    jobs: int = 1,
) -> list[Path]:
    """Check every (name, config), then run and record each in turn, or `jobs` at a time in worker
    processes; runs sharing a call cache compute what they have in common once (it is built for
    concurrent runs; an `embedder` shares its loaded model and memo too, in this process only).
    Returns the run folders, in plan order."""
    check_plans([config for _, config in plans])
    if jobs > 1 and len(plans) > 1:
        return _run_in_workers(plans, min(jobs, len(plans)), on_setting)
    folders = []
    for index, (name, config) in enumerate(plans):
        if on_setting is not None:
            on_setting(name, index, len(plans))
        folders.append(_run_and_write(config, progress, embedder))
    return folders


def _run_in_workers(plans: list[tuple[str, RunConfig]], jobs: int,
                    on_finished: Callable[[str, int, int], None] | None) -> list[Path]:
    """Each run in a fresh (spawned) process, whose torch gets its share of the cores; the first
    failure stops the rest and is raised here."""
    threads = max(1, usable_cpus() // jobs)
    context = multiprocessing.get_context("spawn")
    folders: dict[int, Path] = {}
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_and_write, config): index for index, (_, config) in enumerate(plans)}
        try:
            for future in as_completed(futures):
                folders[futures[future]] = future.result()
                if on_finished is not None:
                    on_finished(f"finished {plans[futures[future]][0]}", len(folders), len(plans))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [folders[index] for index in range(len(plans))]


def _worker_threads(threads: int) -> None:
    """Before torch is imported in the worker: its intra-op threads, one share of the cores."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _run_and_write(config: RunConfig, progress: Callable[[str, int, int], None] | None = None,
                   embedder: HistoryEmbedder | None = None) -> Path:
    from apm_bench.reporting.results import write_run
    from apm_bench.run.runner import run_benchmark

    started = time.perf_counter()
    result = run_benchmark(config, progress=progress, embedder=embedder)
    return write_run(result, time.perf_counter() - started)
