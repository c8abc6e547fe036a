"""The fastvar command with the official architectures replaced by tiny ones, for tests and smoke runs that
launch it in other processes (torchrun, benchmarks/gpu.sh): ``python tests/tiny_cli.py sample var ...``."""

import sys

import conftest

import fastvar.pipelines.hart
import fastvar.pipelines.infinity
import fastvar.pipelines.var
from fastvar import cli

fastvar.pipelines.var.build = conftest.tiny_var_pair
fastvar.pipelines.infinity.build = conftest.tiny_infinity_build
fastvar.pipelines.hart.build = conftest.tiny_hart_build
cli.main(sys.argv[1:])
