"""The project installs with `pip install -e .` (pyproject.toml) and its models then import from any folder."""
import site
import subprocess
import sys

from tinyrun import REPO


def test_editable_install_imports_the_models_from_anywhere(tmp_path):
    # a fresh environment that borrows this one's packages (torch, timm) through a .pth file, so nothing is
    # downloaded; the editable install itself runs pip as a user would, minus build isolation
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    venv_site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / venv_site).joinpath('borrowed.pth').write_text(site.getsitepackages()[0] + '\n')
    install = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps',
                              '--no-build-isolation', '--disable-pip-version-check', '-q', '-e', str(REPO)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    check = ('import importlib.metadata as md, models_vit5, timm; '
             'print(models_vit5.__file__); print(sum(p.numel() for p in timm.create_model("vit5_small").parameters())); '
             'print(sorted(r.split(">")[0].split("=")[0] for r in md.requires("vit5")))')
    run = subprocess.run([str(python), '-c', check], cwd=elsewhere, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    path, params, requires = run.stdout.splitlines()
    assert path == str(REPO / 'models_vit5.py')  # editable: the repository's file, not a copy
    assert int(params) == 22_039_144
    listed = [line.split('>')[0].split('=')[0].strip() for line in (REPO / 'requirements.txt').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    assert requires == str(sorted(listed))  # dependencies come from requirements.txt
