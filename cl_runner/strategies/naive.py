"""Naive sequential fine-tuning: the lower bound. Every hook is the base class's no-op."""

from cl_runner.strategies.base import Strategy, no_options


class Naive(Strategy):
    name = "naive"
    Config = no_options("naive")
