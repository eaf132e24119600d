"""The ``persona-guard`` command line, installed as ``guard.cli``."""
