"""Dobbin's benchmark suite: Dobbin, ZODB/ZEO and Durus side by side.

    python -m bench                 W1-W5 and W7, 3 runs, writes docs/benchmarks.md
    python -m bench --quick         one run of small sizes: a smoke check
    python -m bench --scale         1M objects in a B-tree: open time, RSS vs cache_size
    python -m bench --help          every option

One job per module:

- `spec`: what every system runs (object shape, sizes, clocks, RSS).
- `workloads_dobbin`, `workloads_zodb`, `workloads_durus`: the same
  workload functions written for each system, to be read side by side.
- `machine`: the machine's limits (4 KiB append+fsync rate, a big
  write+fdatasync) and a description of the machine.
- `servers`: ZEO and Durus storage servers as subprocesses on free ports.
- `child`: runs one workload function in a fresh process.
- `plan`: which measurements make up each workload, at which durability.
- `contention`: W5, several writer processes on one database.
- `targets`: issue 4's targets, and how a measurement is judged.
- `report`: the console summary, docs/benchmarks.md and its chart.
- `runner`: the command line; runs everything, alternating systems.
- `scale`: the --scale mode.
- `bench_broker` (another engineer's): the broker against ZEO; the runner
  calls its `main(argv)` as one more section when the module exists.

Every measurement runs in a fresh process, so systems never share an
interpreter, a cache or a heap.
"""
