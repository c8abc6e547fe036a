"""The fastvar command with the official architectures replaced by tiny ones, for tests that launch it in
other processes (torchrun): ``python tests/tiny_cli.py sample var ...``."""

import sys

import conftest

import fastvar.pipelines.var
from fastvar import cli

fastvar.pipelines.var.build = conftest.tiny_var_pair
cli.main(sys.argv[1:])
