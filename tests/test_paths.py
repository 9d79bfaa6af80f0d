"""Output paths are checked before any work: a path that is a file, or lies under a file, gets one
line and exit code 2, and the file in the way is left as it was."""
import pytest
import torch

from trainers.cli import run_cli


def run_main(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    yield path
    assert path.read_text() == "keep me"   # nothing was written over it


def test_gan_out_dir_that_is_a_file(a_file, capsys):
    from trainers.gan import main
    err = run_main(main, ["--out-dir", a_file, "--max-steps", "1"], capsys)
    assert f"--out-dir {a_file} is a file" in err and "pass a folder" in err


def test_gan_out_dir_under_a_file(a_file, capsys):
    from trainers.gan import main
    err = run_main(main, ["--out-dir", a_file / "runs", "--max-steps", "1"], capsys)
    assert f"lies under {a_file}, which is a file" in err


def test_lstm_out_dir_that_is_a_file_and_run_name_that_is_a_file(a_file, capsys):
    from trainers.lstm import main
    err = run_main(main, ["--out-dir", a_file, "--steps", "1"], capsys)
    assert f"--out-dir {a_file} is a file" in err
    err = run_main(main, ["--out-dir", a_file.parent, "--run-name", a_file.name, "--steps", "1"], capsys)
    assert f"--run-name {a_file} is a file" in err


def test_sample_and_evaluate_outputs_under_a_file(a_file, tmp_path, capsys):
    from trainers.gan import main
    err = run_main(main, ["sample", "--checkpoint", tmp_path / "missing", "--out", a_file / "grid.png"], capsys)
    assert f"--out {a_file / 'grid.png'} lies under {a_file}, which is a file" in err
    images = tmp_path / "images.pt"
    torch.save(torch.zeros(2, 1, 28, 28), images)
    err = run_main(main, ["evaluate", "--images", images, "--out", a_file], capsys)
    assert f"--out {a_file} is a file" in err
