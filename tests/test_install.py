"""Installing and identifying dwave: `dwave --version` and the software recorded in what dwave
writes (stores, run dirs), the packaged SLURM scripts, and set-up's Python check."""

import json
import os
import platform
import subprocess
from importlib import metadata

import pytest

import dwave
from conftest import ROOT
from dwave.cli import main


def _expected() -> dict:
    """The versions as pip sees them, computed here without dwave.versions."""
    def installed(*names):
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return None
    return {"dwave": dwave.__version__, "python": platform.python_version(),
            "tensorflow": installed("tensorflow", "tensorflow-cpu"),
            "horovod": installed("horovod"), "zarr": installed("zarr"),
            "numpy": installed("numpy")}


def test_version_flag_names_dwave_and_every_engine(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    expected = _expected()
    assert "\n" not in line and line.startswith(f"dwave {dwave.__version__} (")
    for name in ("python", "tensorflow", "horovod", "zarr", "numpy"):
        assert f"{name} {expected[name]}" in line
    # The package's metadata and the import package agree (one home for the version).
    assert metadata.version("wavenet-dwave") == dwave.__version__


def test_a_store_records_the_software_that_created_it_and_wrote_each_part(tone_store, capsys):
    root = json.load(open(os.path.join(tone_store, "zarr.json")))["attributes"]
    assert root["written_by"] == _expected()
    parts = os.path.join(tone_store, "parts")
    for part in [p for p in os.listdir(parts) if os.path.isdir(os.path.join(parts, p))]:
        attrs = json.load(open(os.path.join(parts, part, "zarr.json")))["attributes"]
        assert attrs["written_by"] == _expected()
    assert main(["info", tone_store]) == 0
    assert f"created by dwave {dwave.__version__}, python" in capsys.readouterr().out


@pytest.mark.slow  # trained_run trains a model
def test_a_run_dir_records_the_software_that_wrote_it(trained_run):
    config = json.load(open(os.path.join(trained_run, "config.json")))
    assert config["written_by"] == _expected()


def test_slurm_scripts_are_copied_once_and_a_users_edited_copy_is_kept(tmp_path, capsys):
    from dwave.slurm_scripts import SCRIPTS, scripts_directory

    target = tmp_path / "scripts"
    assert main(["slurm-scripts", str(target)]) == 0
    for name in SCRIPTS:
        assert (target / name).read_bytes() == open(f"{scripts_directory()}/{name}", "rb").read()
    assert main(["slurm-scripts", str(target)]) == 0  # idempotent
    assert "already there" in capsys.readouterr().out
    (target / "train.sbatch").write_text("#!/bin/bash\n# my site's edits\n")
    assert main(["slurm-scripts", str(target)]) == 2
    assert "train.sbatch exists and differs from dwave's" in capsys.readouterr().err
    assert (target / "train.sbatch").read_text() == "#!/bin/bash\n# my site's edits\n"


@pytest.mark.parametrize("where", ["DWAVE_PYTHON", "an existing venv"])
def test_setup_stops_at_once_on_a_python_other_than_3_11(tmp_path, where):
    fake = tmp_path / "bin" / "python"  # answers like a Python 3.12 would
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Python 3.12.3'; exit 0; }\n"
                    "exit 1\n")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    if where == "an existing venv":
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(fake)
    env = {**os.environ, "DWAVE_PYTHON": str(fake), "DWAVE_VENV": str(venv), "DWAVE_APT": "0"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "Python 3.12.3" in line and "dwave needs Python 3.11" in line
    assert "DWAVE_PYTHON=python3.11" in line
    # Nothing was made: no venv where there was none.
    assert sorted(os.listdir(tmp_path)) == (["bin"] if where == "DWAVE_PYTHON" else ["bin", "venv"])
