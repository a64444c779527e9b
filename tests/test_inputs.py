"""Malformed input gets a clean answer (issue 20): one line naming the file or field, exit code 2,
no traceback, within seconds, nothing written; any other failure is one ``internal error`` line.

Through the real command line (a subprocess in an empty working folder, with a data cache and a
log folder that must stay absent) where it matters, in-process for the rest.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nem_study import capacity, cli, data, inputs
from nem_study.checkpoints import load_checkpoint, save_checkpoint
from nem_study.config import InputError, RunConfig
from nem_study.config_files import apply_overrides, load_data_config
from nem_study.data import mnist as mnist_mod

# An answer "within seconds" on a loaded 2-core machine: a bad YAML file (read before torch is
# imported) in FAST_S; a check that needs torch imported first (checkpoints, train's sizes) in TORCH_S.
FAST_S = 5.0
TORCH_S = 15.0


class Foreign:
    """A class a checkpoint must not smuggle in (weights_only refuses it)."""


def run_cli(tmp_path: Path, *args: str, limit: float = FAST_S) -> subprocess.CompletedProcess:
    """``nem-study ARGS`` in an empty folder; checks the clean-error contract and that nothing
    was written (working folder, data cache, crash-log folder)."""
    work, cache, logs = tmp_path / "work", tmp_path / "cache", tmp_path / "logs"
    work.mkdir(exist_ok=True)
    before = sorted(work.iterdir())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEM_DATA_DIR": str(cache), "NEM_STUDY_LOG_DIR": str(logs)}
    env.pop("NEM_STUDY_DEBUG", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nem_study.cli", *args], capture_output=True, text=True,
                       cwd=work, env=env, timeout=120)
    r.seconds = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nem-study: error: "), r.stderr
    assert r.seconds < limit, (r.seconds, r.stderr)
    assert sorted(work.iterdir()) == before, sorted(work.iterdir())
    assert not cache.exists() and not logs.exists()
    return r


def put(tmp_path: Path, name: str, content: bytes | str) -> str:
    """An input file outside the working folder."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def billion_laughs() -> str:
    text = 'name: lol\nbase:\n  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    previous = "a"
    for name in "bcdefghi":   # 9 levels of 9 aliases: 9^9 = 387 million values when expanded
        text += f"  {name}: &{name} [{', '.join(['*' + previous] * 9)}]\n"
        previous = name
    return text


# ----------------------------------------------------------------------------------------
# Study / run / data-spec YAML


@pytest.mark.parametrize("name,content,needle", [
    ("binary.yaml", bytes(range(128, 256)) * 8, "not UTF-8 text (byte 0x80 at offset 0, line 1)"),
    ("utf16.yaml", "name: s\n".encode("utf-16"), "UTF-16 text, not UTF-8; save it as UTF-8"),
    ("utf16-no-bom.yaml", "name: s\nseeds: 2\n".encode("utf-16-le"), "looks like UTF-16"),
    ("nul.yaml", b"name: s\nseeds: 1\x00\n", "contains NUL bytes (first at byte 16, line 2)"),
    ("empty.yaml", b"", "empty (0 bytes)"),
    ("comments.yaml", "# only a comment\n", "no YAML content"),
    ("big.yaml", "name: s\nx: '" + "a" * (2 << 20) + "'\n", "too large for a YAML file (2.0 MiB; at most 1.0 MiB)"),
    ("deep.yaml", "[" * 1000 + "]" * 1000 + "\n", "nested more than 20 levels deep at line 1, column 21"),
    ("deep-block.yaml", "".join(" " * i + "a:\n" for i in range(1000)), "nested more than 20 levels deep"),
    ("laughs.yaml", billion_laughs(), "more than 10,000 values once its aliases (*name) are expanded"),
    ("self.yaml", "name: s\nbase: &b\n  x: *b\n", "the alias *b at line 3, column 6 is inside its own anchor"),
    ("bigint.yaml", "name: s\nseeds: " + "9" * 5000 + "\n", "an integer of more than 4,300 digits"),
    ("syntax.yaml", "name: s\ngrid: [1, 2\n", "not valid YAML at line 3, column 1"),
])
def test_a_malformed_study_file_is_one_line_and_exit_2(tmp_path, name, content, needle):
    path = put(tmp_path, name, content)
    r = run_cli(tmp_path, "validate", path)
    assert r.stderr.startswith(f"nem-study: error: {path}: ") and needle in r.stderr, r.stderr


def test_a_grid_of_too_many_trials_is_refused_before_it_is_expanded(tmp_path):
    keys = ("model.k", "model.hidden", "train.batch_size", "train.max_epochs", "train.patience", "data.seed",
            "train.valid_samples")   # 10^7 cells
    path = put(tmp_path, "grid.yaml", "name: s\ngrid:\n" + "".join(f"  {k}: {list(range(1, 11))}\n" for k in keys))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nem_study.cli", "validate", path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and time.monotonic() - t0 < FAST_S
    assert "grid: 10,000,000 grid cell(s) x 1 seed(s) is more than 10,000 trials" in r.stderr
    with pytest.raises(InputError, match="seeds: 1 grid cell.* x 1,000,000,000 seed"):
        from nem_study.study_config import load_study_config

        load_study_config(put(tmp_path, "seeds.yaml", "name: s\nseeds: 1000000000\n"))


def test_a_directory_or_a_fifo_given_as_the_study_file(tmp_path):
    folder = tmp_path / "in" / "study.yaml"
    folder.mkdir(parents=True)
    assert "is a directory, not a YAML file" in run_cli(tmp_path, "validate", str(folder)).stderr
    fifo = tmp_path / "in" / "fifo.yaml"
    os.mkfifo(fifo)   # reading it would block for ever
    assert "not a regular file (a FIFO" in run_cli(tmp_path, "validate", str(fifo)).stderr


def test_a_utf8_byte_order_mark_is_fine():
    text = inputs.decode_text("\ufeffname: s\n".encode("utf-8"), "x.yaml")
    assert inputs.parse_yaml(text, "x.yaml") == {"name": "s"}


def test_benign_aliases_are_fine():
    text = "name: s\nbase:\n  model: &m {k: 3}\ngrid:\n  model.k: [3, 4]\nx: *m\n"
    assert inputs.parse_yaml(text, "x.yaml")["x"] == {"k": 3}


def test_the_run_config_and_data_spec_go_through_the_same_reader(tmp_path):
    run = put(tmp_path, "run.yaml", billion_laughs().replace("name: lol\nbase:\n", "data:\n"))
    r = run_cli(tmp_path, "train", run)   # read before torch is imported
    assert "once its aliases" in r.stderr and run in r.stderr
    spec = put(tmp_path, "spec.yaml", "name: static_shapes\n".encode("utf-16"))
    assert "UTF-16" in run_cli(tmp_path, "data", "generate", spec).stderr
    with pytest.raises(InputError, match="contains NUL bytes"):
        load_data_config(put(tmp_path, "spec2.yaml", b"name: static_shapes\x00"))


def test_a_set_value_is_parsed_with_the_same_limits():
    bomb = "[" + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "1"] * 9) + "]" for i in range(9)) + "]"
    with pytest.raises(InputError, match="--set 'x=.*once its aliases"):
        apply_overrides({}, [f"x={bomb}"])
    with pytest.raises(InputError, match="--set 'model.k=\\[1': not valid YAML"):
        apply_overrides({}, ["model.k=[1"])


# ----------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint(path: Path) -> Path:
    save_checkpoint(path, config=RunConfig().model_dump(mode="json"), model={"w": torch.zeros(3)}, epoch=1,
                    history=[])
    return path


def test_a_truncated_checkpoint_and_someone_elses_pickle(tmp_path):
    (tmp_path / "in").mkdir()
    good = _checkpoint(tmp_path / "in" / "good.pt")
    assert load_checkpoint(good)["epoch"] == 1
    raw = good.read_bytes()
    cut = put(tmp_path, "cut.pt", raw[: len(raw) // 2])
    r = run_cli(tmp_path, "evaluate", cut, limit=TORCH_S)
    assert f"{cut}: not a readable checkpoint, damaged or truncated" in r.stderr
    foreign = tmp_path / "in" / "foreign.pt"
    torch.save(Foreign(), foreign)   # a valid torch file holding a class
    r = run_cli(tmp_path, "evaluate", str(foreign), limit=TORCH_S)
    assert "holds Python objects other than tensors" in r.stderr and str(foreign) in r.stderr


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    (lambda p: p.write_bytes(pickle.dumps({"format": "nem-study-checkpoint/1"})), "not a zip archive"),
    (lambda p: torch.save(torch.zeros(2), p), "found a saved Tensor"),
    (lambda p: torch.save({"format": "nem-study-checkpoint/1", "model": {}}, p), "incomplete checkpoint (no config)"),
    (lambda p: p.mkdir(), "x.pt/last.pt: no such file"),   # a folder without last.pt
])
def test_other_bad_checkpoints(tmp_path, make, needle):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(InputError, match="x.pt") as e:
        load_checkpoint(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# MNIST


def _npz(path: Path, n: int = 3) -> Path:
    np.savez(path, **{k: np.zeros((n, 28, 28), np.uint8) for k in ("x_train", "x_valid", "x_test")})
    return path


def test_a_truncated_npz_as_mnist(tmp_path):
    (tmp_path / "in").mkdir()
    raw = _npz(tmp_path / "in" / "ok.npz").read_bytes()
    cut = put(tmp_path, "cut.npz", raw[: len(raw) // 2])
    r = run_cli(tmp_path, "data", "generate", "flying_mnist", "--mnist", cut)
    assert f"{cut}: not a readable MNIST .npz (not a complete zip archive" in r.stderr


def _patch_unpacked_size(path: Path, size: int) -> None:
    """Make the zip's central directory claim ``size`` bytes for its first member (a zip bomb's
    header, without compressing gigabytes)."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")
    raw[at + 24:at + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,needle", [
    ("text", "not a complete zip archive"),
    ("bomb", "would unpack to 4.3 GB, more than an MNIST .npz holds"),
    ("empty", "empty (0 bytes)"),
    ("wrong", "x_train must be uint8 (N, 28, 28)"),
])
def test_wrong_npz_as_mnist(tmp_path, damage, needle):
    path = tmp_path / "mnist.npz"
    if damage == "text":
        path.write_text("x_train, x_valid, x_test\n")
    elif damage == "bomb":
        _npz(path)
        _patch_unpacked_size(path, 0xFFFFFFF0)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path, x_train=np.zeros((3, 28, 28), np.float32), x_valid=np.zeros((3, 28, 28), np.uint8),
                 x_test=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(InputError, match="mnist.npz") as e:
        data.load_mnist(path)
    assert needle in str(e.value)


@pytest.mark.parametrize("damage,needle", [
    ("huge", "its header declares 1,000,000,000 images of 28x28 (784 GB)"),
    ("truncated", "truncated IDX file"),
    ("badgzip", "cannot read this IDX file"),
    ("magic", "bad magic number"),
])
def test_bad_idx_files(tmp_path, damage, needle):
    header = lambda n: struct.pack(">IIII", 2051, n, 28, 28)   # noqa: E731
    body = {"huge": header(10 ** 9), "truncated": header(60_000) + b"\0" * 100, "magic": b"\0" * 32}
    for stem in mnist_mod.IDX_FILES.values():
        path = tmp_path / f"{stem}.gz"
        if damage == "badgzip":
            path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 4)
        else:
            path.write_bytes(gzip.compress(body[damage]))
    with pytest.raises(InputError, match="train-images-idx3-ubyte") as e:
        data.load_mnist(tmp_path)
    assert needle in str(e.value)


# ----------------------------------------------------------------------------------------
# Sizes checked before work starts


def test_a_huge_data_set_is_refused_before_anything_is_made(tmp_path):
    run = put(tmp_path, "run.yaml", "data: {name: flying_shapes}\n")
    r = run_cli(tmp_path, "train", run, "--set", "data.train=1000000000000", limit=TORCH_S)
    assert "data.train = 1000000000000: the cache would need 32.9 PB" in r.stderr and " free" in r.stderr
    r = run_cli(tmp_path, "data", "generate", "flying_shapes", "--set", "train=1000000000000")
    assert "data.train = 1000000000000: the cache would need 32.9 PB" in r.stderr
    assert str(tmp_path / "cache") in r.stderr
    study = put(tmp_path, "study.yaml", "name: s\nbase:\n  data: {name: static_shapes, train: 1000000000000}\n")
    r = run_cli(tmp_path, "run", study)   # before Ray starts or MLflow's store is made
    assert "data.train = 1000000000000: the cache would need 1.6 PB" in r.stderr


def test_a_batch_that_cannot_fit_memory(tmp_path):
    run = put(tmp_path, "run.yaml", "data: {name: flying_shapes, train: 100000000}\n")
    r = run_cli(tmp_path, "train", run, "--set", "train.batch_size=100000000", "--set", "train.device=cpu",
                limit=TORCH_S)
    assert "train.batch_size = 100000000: one batch of 100,000,000 sequences" in r.stderr
    assert "of memory free" in r.stderr


def test_sizes_are_checked_against_memory_and_the_disk(monkeypatch, tmp_path):
    spec = load_data_config("static_shapes", ["train=1000", "valid=10", "test=10"])
    monkeypatch.setattr(capacity, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="data.train = 1000: generating it in memory needs 1.6 MB, 1.0 kB"):
        data.generate(spec, "train")
    monkeypatch.setattr(capacity, "free_disk", lambda p: (1000, Path(p)))
    with pytest.raises(InputError, match="the cache would need 1.6 MB"):
        data.ensure(spec, progress=False)
    assert not data.data_dir().exists()   # nothing written: no folder, no lock


def test_a_study_whose_data_sets_fit_alone_but_not_together(monkeypatch, tmp_path, capsys):
    """Two grid cells with 1.6 MB of data each, 2.5 MB free: refused before anything is made."""
    study = put(tmp_path, "study.yaml", "name: s\nbase:\n  data: {name: static_shapes, train: 1000, valid: 10, "
                "test: 10}\ngrid:\n  data.seed: [1, 2]\n")
    monkeypatch.setattr(capacity, "free_disk", lambda p: (2_500_000, Path(p)))
    monkeypatch.setenv("NEM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", study]) == 2
    assert "the study's 2 data sets not yet cached would need 3.2 MB together" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]   # no cache, storage or MLflow store


def test_a_damaged_manifest(tmp_path):
    spec = load_data_config("static_shapes", ["train=2", "valid=2", "test=2"])
    d = data.ensure(spec, progress=False)
    manifest = d / "manifest.json"
    good = manifest.read_text()
    for text, needle in [("[" * 100_000 + "]" * 100_000, "not JSON"), ("", "empty"),
                         (good.replace('"count": 2', '"count": 3', 1), "does not match the data spec")]:
        manifest.write_text(text)
        with pytest.raises(InputError, match="manifest.json") as e:
            data.load(spec, "train", progress=False)
        assert needle in str(e.value) and "--force" in str(e.value)


# ----------------------------------------------------------------------------------------
# The last-resort handler


def _study(tmp_path: Path) -> str:
    return put(tmp_path, "study.yaml", "name: s\n")


def test_an_internal_error_is_one_line_and_its_traceback_goes_to_a_file(tmp_path, monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("something broke\ninside")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    monkeypatch.setenv("NEM_STUDY_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("NEM_STUDY_DEBUG", raising=False)
    assert cli.main(["validate", _study(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nem-study: internal error: ZeroDivisionError: something broke inside (full traceback in ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    [log] = (tmp_path / "logs").iterdir()
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text and "validate" in text

    with pytest.raises(ZeroDivisionError):   # --debug: Python's own traceback, as before
        cli.main(["--debug", "validate", _study(tmp_path)])
    with pytest.raises(ZeroDivisionError):   # after the command too
        cli.main(["validate", _study(tmp_path), "--debug"])
    monkeypatch.setenv("NEM_STUDY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["validate", _study(tmp_path)])


def test_debug_prints_the_traceback_through_the_real_cli(tmp_path):
    """A subprocess whose validate command is replaced by a bug: one line without --debug, the
    traceback with it."""
    study = _study(tmp_path)
    code = ("import sys; from nem_study import cli; cli.cmd_validate = lambda args: 1 / 0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "NEM_STUDY_LOG_DIR": str(tmp_path / "logs")}
    env.pop("NEM_STUDY_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code, "validate", study], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "nem-study: internal error: ZeroDivisionError: division by zero (full traceback in " in r.stderr
    r = subprocess.run([sys.executable, "-c", code, "--debug", "validate", study], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "ZeroDivisionError" in r.stderr
    assert len(list((tmp_path / "logs").iterdir())) == 1   # the first run's log only


def test_ctrl_c_keeps_its_exit_code(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_validate", interrupted)
    assert cli.main(["validate", _study(tmp_path)]) == 130
    assert capsys.readouterr().err == "nem-study: interrupted\n"


def test_bad_input_is_not_an_internal_error(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("nem-study: error: ")


def test_zip_helper_names_the_archive(tmp_path):
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", b"\0" * 10)
    inputs.check_archive(path, "MNIST .npz", 100)
    with pytest.raises(InputError, match="a.npz: its arrays would unpack to 10 B"):
        inputs.check_archive(path, "MNIST .npz", 5)
