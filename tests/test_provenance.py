"""torchrl_bdpo.provenance: the versions and CPU that every summary records."""

from importlib import metadata

import torch

from torchrl_bdpo.provenance import PACKAGES, cpu_model, software_versions


def test_software_versions_name_the_installed_packages():
    v = software_versions()
    assert set(PACKAGES) <= set(v)
    assert v["torch"] == metadata.version("torch") and v["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert v["mujoco"] == metadata.version("mujoco")  # the physics' version decides a dataset's last bits
    assert v["cpu"] == cpu_model() and v["cpu"]
    assert v["python"].count(".") == 2


def test_a_missing_package_is_none(monkeypatch):
    import torchrl_bdpo.provenance as prov

    monkeypatch.setattr(prov, "PACKAGES", ("torch", "no-such-package-here"))
    v = prov.software_versions()
    assert v["no-such-package-here"] is None and v["torch"] is not None


def test_report_records_the_settings_and_the_machine(tmp_path):
    import argparse
    import json

    from torchrl_bdpo.provenance import machine, run_record

    args = argparse.Namespace(runs=[tmp_path], out=tmp_path / "x.json", seed=3, cache=tmp_path / "c")
    record = run_record(args, rows=[1, 2])
    assert record["settings"] == {"seed": 3, "cache": str(tmp_path / "c")}  # inputs and outputs left out, paths as text
    assert record["machine"] == {**software_versions(), "threads": torch.get_num_threads()} == machine()
    assert record["rows"] == [1, 2]
    assert json.loads(json.dumps(record)) == record
