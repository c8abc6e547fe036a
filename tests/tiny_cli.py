"""The fastvar command with the official architectures replaced by tiny ones, for tests and smoke runs that
launch it in other processes (torchrun, benchmarks/gpu.sh): ``python tests/tiny_cli.py sample var ...``.
``TINY_CLI_WRITE_DELAY`` (seconds) slows every file ``fastvar sample`` writes, for tests that kill a run in
the middle of a batch."""

import os
import sys
import time

import conftest

import fastvar.pipelines.hart
import fastvar.pipelines.infinity
import fastvar.pipelines.infinitystar
import fastvar.pipelines.var
import fastvar.run_folder
from fastvar import cli

fastvar.pipelines.var.build = conftest.tiny_var_pair
fastvar.pipelines.infinity.build = conftest.tiny_infinity_build
fastvar.pipelines.hart.build = conftest.tiny_hart_build
fastvar.pipelines.infinitystar.build = conftest.tiny_infinitystar_build
fastvar.pipelines.infinitystar.OFFICIAL = conftest.TINY_INFINITYSTAR
delay = float(os.environ.get("TINY_CLI_WRITE_DELAY", 0))
if delay:
    write = fastvar.run_folder.write_atomic

    def slow_write(*args, **kwargs):
        record = write(*args, **kwargs)
        time.sleep(delay)
        return record

    fastvar.run_folder.write_atomic = slow_write
cli.main(sys.argv[1:])
