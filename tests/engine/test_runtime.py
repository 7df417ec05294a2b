"""engine/runtime.py's parts that need no process group or device: the versions a run records."""

import importlib.metadata

from cl_runner.engine.runtime import package_versions


def test_a_missing_optional_package_is_recorded_as_none_instead_of_failing_the_run(monkeypatch):
    """A GPU machine's image may lack datasets (only tasks with source=datasets import it): the run goes on."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "datasets":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    versions = package_versions()
    assert versions["datasets"] is None
    assert versions["torch"] == real("torch") and versions["hydra"] == real("hydra-core")
