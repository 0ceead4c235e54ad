"""The report names what a session measured (dataset, model, weights) in its title and its answer, and
sets the study's claims only beside a session of the study's own setting (its CNN on CIFAR-10)."""
from __future__ import annotations

import pandas as pd

from cnnsql.models import model_spec
from cnnsql.models import weights as W
from cnnsql.results import render, report


def runs_of(kind: str, weights) -> pd.DataFrame:
    return pd.DataFrame([{"engine": e, "dataset_kind": kind, "weights": str(weights)} for e in ("torch", "velox")])


def test_a_folder_session_is_named_and_not_set_against_the_study(tmp_path):
    path = tmp_path / "digits-vgg.npz"
    spec = model_spec.resolve("vgg", (1, 8, 8), 3)
    W.save_weights(path, W.random_weights(1, spec).arrays, {"trained_by": "random"}, spec)
    runs = runs_of("folder:digits", path)
    assert report.title(runs) == "cnnsql: PyTorch vs Velox on digits, model vgg in PostgreSQL"
    s = report.setting(runs)
    assert (s["dataset"], s["model"], s["study_setting"]) == ("digits", "vgg", False)
    (line,) = report.claims(runs)
    assert "not compared" in line and "vgg" in line and "digits" in line


def test_the_study_setting_is_recognised(tmp_path):
    path = tmp_path / "default.npz"
    W.save_weights(path, W.random_weights(2).arrays, {"trained_by": "random"})
    assert report.setting(runs_of("cifar-10", path))["study_setting"]
    assert not report.setting(runs_of("synthetic", path))["study_setting"]
    assert report.setting(runs_of("cifar-10", tmp_path / "gone.npz"))["model"] is None  # a removed file: unknown


def test_one_formatter_for_every_view():
    assert render.rng(1234.56, 1000.0, 1500.0, 1) == "1,234.6 [1,000.0-1,500.0]"
    assert render.rng(1234.56, 1000.0, 1500.0, 1, sep=False) == "1234.6 [1000.0-1500.0]"
    assert render.rng(float("nan"), 1, 2, 1) == "-" and render.fmt(None) == "-" and render.fmt(True) == "yes"
    assert render.fmt(12000.0, 0) == "12,000" and render.fmt(3, 2) == "3"


def test_session_files_carry_no_host_name_or_folder_layout():
    from cnnsql import results

    assert results._anonymous_host("build-7.corp (x86_64, AMD EPYC, 2 cpus, Linux)") == "x86_64, AMD EPYC, 2 cpus, Linux"
    assert results._file_name("/home/alice/projects/cnnsql/.cnnsql/weights/default.npz") == "default.npz"


def sql_runs(**ips):
    """One offline SQL run per engine: images/s with a +-5% spread of repetitions."""
    return pd.DataFrame([dict(engine=e, images_per_s=v, n_rows=1000, wall_s=1000 / v, wall_min_s=1000 / (1.05 * v),
                              wall_max_s=1000 / (0.95 * v)) for e, v in ips.items()])


def test_the_report_says_whether_the_study_frameworks_include_the_pick():
    """The answer sets the engine a user could pick instead (ONNX Runtime) against the fastest framework
    the study compares, with the verdict its repetitions support."""
    line = report.pick(sql_runs(torch=1500.0, tensorflow=1000.0, velox=5.0, onnxruntime=2000.0))
    assert line.startswith("ONNX Runtime, which a user could run instead, does 1.33x the images/s of PyTorch")
    assert line.endswith("ONNX Runtime is the pick here, not a framework the study compares.")
    assert report.pick(sql_runs(torch=1500.0, onnxruntime=800.0)).endswith("the study's PyTorch remains the pick here.")
    assert "no clear pick" in report.pick(sql_runs(tensorflow=1000.0, onnxruntime=1020.0))
    assert report.pick(sql_runs(torch=1500.0, velox=5.0)) is None  # no alternative ran: nothing to say
