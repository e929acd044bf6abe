"""Bad input and faults around a run: other data behind the same run id, a second trainer on one run directory, a
corrupt image. Each is one clear line (or a safe recovery), never a silent wrong result.

A run is its data, not its data's path: other images under the same run id never resume or pass for a finished
run (the data paths are not in the run id, so that moved data keeps its runs)."""

from __future__ import annotations

import shutil

from PIL import Image

from bench.config.schema import from_dict
from bench.data.identity import data_identity, same_data_place
from bench.pipeline.status import data_changed


def _image_root(base, colours):
    root = base / "train"
    for k, colour in enumerate(colours):
        for folder in ("n001", "n002"):
            path = root / folder / f"img{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(path)
    class_list = base / "classes.txt"
    class_list.write_text("first n001\nsecond n002\n")
    return root, class_list


def _imagefolder_run(root, class_list) -> list[str]:
    return ["--data.source=imagefolder", f"--data.root={root}", f"--data.class_list={class_list}",
            "--schedule.steps=2"]


def _config(root, class_list) -> dict:
    return {"model": {"in_channels": 3, "input_size": 16},
            "data": {"source": "imagefolder", "root": str(root), "class_list": str(class_list), "image_size": 16}}


def test_a_finished_run_is_not_reused_for_other_images(run_train, tmp_path):
    root_a, classes = _image_root(tmp_path / "a", [(200, 0, 0), (0, 200, 0)])
    root_b, _ = _image_root(tmp_path / "b", [(0, 0, 200), (9, 9, 9), (50, 50, 50)])  # other (and more) images
    first = run_train(*_imagefolder_run(root_a, classes))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(*_imagefolder_run(root_b, classes))
    assert again.returncode == 1, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert "Traceback" not in again.stderr and "holds a run of other data" in last, again.stderr[-3000:]
    assert "another run.name" in last


def test_moved_data_is_the_same_data(run_train, tmp_path):
    root_a, classes = _image_root(tmp_path / "a", [(200, 0, 0), (0, 200, 0)])
    assert run_train(*_imagefolder_run(root_a, classes)).returncode == 0
    moved = tmp_path / "moved"
    shutil.copytree(root_a, moved)
    again = run_train(*_imagefolder_run(moved, classes))
    assert again.returncode == 0, again.stderr[-3000:]


def test_the_pipeline_sees_other_data_behind_the_same_job(tmp_path):
    root_a, classes = _image_root(tmp_path / "a", [(200, 0, 0), (0, 200, 0)])
    root_b, _ = _image_root(tmp_path / "b", [(0, 0, 200), (9, 9, 9), (50, 50, 50)])
    moved = tmp_path / "moved"
    shutil.copytree(root_a, moved)
    identity = data_identity(from_dict(_config(root_a, classes)).data)
    record = {"train_info": {"data": identity}}
    assert same_data_place(identity, from_dict(_config(root_a, classes)).data)
    assert data_changed(_config(root_a, classes), record) == ""
    assert data_changed(_config(moved, classes), record) == ""  # same images elsewhere: still done
    assert "is not the data this run trained on" in data_changed(_config(root_b, classes), record)
    assert "cannot be read" in data_changed(_config(tmp_path / "nowhere", classes), record)


def test_a_second_trainer_of_the_same_run_refuses(run_train, tmp_path):
    from bench.run.rundir import RunDir

    first = run_train("--schedule.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    with RunDir(first.run_dir).exclusive("trainer", 0):  # as a trainer still running there holds it
        second = run_train("--schedule.steps=2")
    assert second.returncode == 1, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr and "is in use by another trainer" in last, second.stderr[-3000:]
    third = run_train("--schedule.steps=2")  # the lock goes with its holder
    assert third.returncode == 0, third.stderr[-3000:]


def test_run_dir_locks_are_per_role_and_released(tmp_path):
    import pytest

    from bench.run.rundir import RunDir, RunDirBusy

    run = RunDir(tmp_path / "run")
    with run.exclusive("sampler-a"):
        with pytest.raises(RunDirBusy, match="in use by another sampler-a"):
            with run.exclusive("sampler-a"):
                pass
        with run.exclusive("sampler-b"):  # another protocol's samples: no conflict
            pass
    with run.exclusive("sampler-a"):
        pass


def test_a_corrupt_image_is_one_line_naming_the_file(run_train, tmp_path):
    root, classes = _image_root(tmp_path / "a", [(200, 0, 0), (0, 200, 0)])
    broken = root / "n002" / "img1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated download
    result = run_train(*_imagefolder_run(root, classes))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and f"cannot read image {broken}" in last, result.stderr[-3000:]


def test_an_error_from_a_dataloader_worker_is_its_original_last_line():
    from bench.run.train import one_line_error

    wrapped = OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                      '  File "x.py", line 1, in f\nOSError: cannot read image /data/a.jpg: truncated\n')
    assert one_line_error(wrapped) == "OSError: cannot read image /data/a.jpg: truncated"
    assert one_line_error(OSError(28, "No space left on device", "/runs/x/engine.pt")) == (
        "[Errno 28] No space left on device: '/runs/x/engine.pt'")
