"""The evaluation classifier: the committed weights, their checksum, and the training script."""
import json
import re
import shutil

import pytest
import torch

from data.mnist import load_mnist, to_unit_range
from trainers.classifier import DEFAULT_WEIGHTS, RETRAIN, load_classifier, main, sha256_of, sidecar
from trainers.cli import UsageError


def test_committed_weights_reach_99_percent_on_every_test_image():
    model = load_classifier()
    images, labels = load_mnist("test")
    x = to_unit_range(images)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    assert (pred == labels).float().mean() >= 0.99
    for digit in range(10):  # every digit is labelled correctly, not only the common ones
        assert (pred[labels == digit] == digit).float().mean() >= 0.97, digit


def test_sidecar_records_the_sha256_of_the_committed_file():
    meta = json.loads(sidecar(DEFAULT_WEIGHTS).read_text())
    assert meta["sha256"] == sha256_of(DEFAULT_WEIGHTS)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "remove_weights", "remove_sidecar"])
def test_corrupt_or_missing_weights_name_the_file_and_the_retrain_command(tmp_path, damage):
    weights = tmp_path / "mnist_cnn.pt"
    shutil.copy(DEFAULT_WEIGHTS, weights)
    shutil.copy(sidecar(DEFAULT_WEIGHTS), sidecar(weights))
    blob = bytearray(weights.read_bytes())
    if damage == "flip_byte":
        blob[len(blob) // 2] ^= 0xFF
        weights.write_bytes(bytes(blob))
    elif damage == "truncate":
        weights.write_bytes(bytes(blob[:1000]))
    elif damage == "remove_weights":
        weights.unlink()
    else:
        sidecar(weights).unlink()
    with pytest.raises(UsageError) as err:
        load_classifier(weights)
    message = str(err.value)
    assert "\n" not in message and RETRAIN in message
    assert str(weights if damage != "remove_sidecar" else sidecar(weights)) in message


def test_training_script_writes_weights_that_load_with_their_checksum(tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    record = main(["--max-steps", "3", "--batch-size", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert record["steps"] == 3
    meta = json.loads(sidecar(out).read_text())
    assert meta["sha256"] == sha256_of(out)
    model = load_classifier(out)
    assert not model.training
    # the accuracy it reports is that of the saved weights on all 10,000 test images, counted here
    images, labels = load_mnist("test")
    with torch.no_grad():
        hits = sum(int((model(to_unit_range(images[i:i + 2500])).argmax(1) == labels[i:i + 2500]).sum())
                   for i in range(0, len(images), 2500))
    for claimed in (record["test_accuracy"], meta["test_accuracy"],
                    float(re.search(r"test accuracy (\d\.\d+)", printed).group(1))):
        assert abs(claimed - hits / len(images)) <= 5e-5 + 1e-9, (claimed, hits)
