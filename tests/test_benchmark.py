"""scripts/benchmark.py runs end to end on small sizes and reports ratios to Attention from the same run; the
measuring scripts refuse flags they could not use before they measure."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark  # noqa: E402

from tests.helpers import expect_one_line_error  # noqa: E402

CPU = torch.device("cpu")


def test_layer_table_covers_every_case_with_ratios_to_attention():
    rows = benchmark.layer_table(CPU, None, repeats=1, warmup=0, shapes=((2, 65),))
    assert [row["layer"] for row in rows] == [name for name, _ in benchmark.LAYER_CASES]
    attention = rows[0]
    assert attention["time_ratio"] == attention["memory_ratio"] == 1.0
    for row in rows:
        assert row["ms"] > 0 and row["saved_mib"] > 0
        assert row["time_ratio"] == pytest.approx(row["ms"] / attention["ms"])
        assert row["memory_ratio"] == pytest.approx(row["saved_mib"] / attention["saved_mib"])
        assert row["page_faults"] is None or row["page_faults"] >= 0
        # One repeat: its ratio is the ratio of medians, and the middle half of the repeats' ratios is that one.
        assert row["time_ratio_quartiles"] == pytest.approx((row["time_ratio"], row["time_ratio"]))


def test_ratio_quartiles_pair_each_repeat_with_the_baselines_same_repeat():
    # Ratios 2, 4, 6, 8, 10: quartiles 4 and 8 (the inclusive method, which interpolates between the ratios seen).
    assert benchmark.ratio_quartiles([2, 4, 6, 8, 10], [1, 1, 1, 1, 1]) == pytest.approx((4, 8))
    # Both steps slower in the same repeat: that repeat's ratio stays 1.
    assert benchmark.ratio_quartiles([1, 3, 1], [1, 3, 1]) == pytest.approx((1, 1))
    # The same times in the other order: ratios 2 and 0.5, a wide middle half, though the medians are equal.
    assert benchmark.ratio_quartiles([2, 1], [1, 2]) == pytest.approx((0.875, 1.625))
    assert benchmark.ratio_quartiles([3], [2]) == pytest.approx((1.5, 1.5))


def test_interleaved_timings_count_the_page_faults_of_each_step():
    # A step that writes into memory freshly mapped at every call faults once per page; one that allocates nothing
    # does not. The counts let a reader tell a ratio that comes from one layer's page faults.
    mmap = pytest.importorskip("mmap")
    if benchmark.page_faults() is None:
        pytest.skip("this system does not count page faults")
    pages = 64

    def touch_fresh_pages():
        mapped = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for page in range(pages):
            mapped[page * mmap.PAGESIZE] = 1
        mapped.close()

    faulting, quiet = benchmark.interleaved_timings([touch_fresh_pages, lambda: None], repeats=5, warmup=1,
                                                    device=CPU)
    assert faulting.page_faults >= pages and quiet.page_faults < pages
    assert faulting.seconds > 0 and quiet.seconds >= 0


def test_layer_table_prints_page_faults_or_a_dash_where_they_are_not_counted(capsys):
    row = dict(batch=2, tokens=65, layer="Attention", ms=1.0, time_ratio=1.0, time_ratio_quartiles=(0.97, 1.04),
               saved_mib=1.0, memory_ratio=1.0)
    benchmark.print_tables([dict(row, page_faults=1398.0), dict(row, page_faults=None)], [], [], [], "header")
    lines = capsys.readouterr().out.splitlines()
    assert "middle half of repeats | page faults per step" in lines[2]
    assert "| 1.00 | 0.97-1.04 | 1398 | 1.0 |" in lines[4] and "| 1.00 | 0.97-1.04 | - | 1.0 |" in lines[5]


def test_model_table_prints_the_middle_half_of_the_repeats_ratios(capsys):
    row = dict(image=32, patch=4, dropout=0.1, layer="ConvNNAttention", mode="eager", images_per_second=28.9,
               ratio_to_attention=1.07, ratio_to_attention_quartiles=(1.02, 1.1), ratio_to_eager=1.0)
    benchmark.print_tables([], [row], [], [], "header")
    lines = capsys.readouterr().out.splitlines()
    assert "| x Attention | middle half of repeats | x eager |" in lines[2]
    assert lines[4].endswith("| 28.9 | 1.07 | 1.02-1.10 | 1.00 |")


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes, saved twice by x * x
    assert benchmark.saved_bytes(lambda: x * x) == 4000
    assert benchmark.saved_bytes(lambda: x.exp()) == 4000  # exp saves its output only


@pytest.mark.slow
def test_model_and_data_tables_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNN_SYNTHETIC_SIZES", "64,16")
    models = benchmark.model_table(CPU, None, repeats=1, warmup=0, batch=2, compile_modes=(False,))
    assert {(row["image"], row["dropout"], row["layer"]) for row in models} == {
        (image, dropout, layer) for image, _, dropout in benchmark.MODEL_CASES
        for layer in ("Attention", "ConvNNAttention")}
    for row in models:
        assert row["images_per_second"] > 0 and row["ratio_to_eager"] == 1.0
        assert row["ratio_to_attention_quartiles"] == pytest.approx((row["ratio_to_attention"],) * 2)
        if row["layer"] == "Attention":
            assert row["ratio_to_attention"] == 1.0
    data = benchmark.data_table(CPU, batches=3, batch_size=4)
    assert [row["path"] for row in data] == ["workers", "device"]
    assert all(row["images_per_second"] > 0 for row in data)

    out = tmp_path / "benchmark.json"
    monkeypatch.setattr(benchmark, "layer_table", lambda *args: [])
    monkeypatch.setattr(benchmark, "model_table", lambda *args: models)
    monkeypatch.setattr(benchmark, "data_table", lambda *args, **kwargs: data)
    operations = [dict(layer="Attention", path="GPU", operations=16, by_operator={"aten::mm": 12})]
    monkeypatch.setattr(benchmark, "operation_table", lambda *args: operations)
    benchmark.main(["--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["models"] == models and written["operations"] == operations


def test_convnn_profile_covers_convnn_and_attention(capsys):
    # It passed ConvNN-Attention's K to Attention too, which takes no such option.
    import benchmark_convnn

    benchmark_convnn.main(["--profile", "--batch", "2", "--tokens", "17", "--width", "12", "--K", "3",
                           "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "\nConvNNAttention: " in printed and "\nAttention: " in printed


def test_chunk_budget_comparison_rows_and_restores_the_budget(capsys):
    import benchmark_convnn
    import models.neighbour_conv as neighbour_conv_module

    default = neighbour_conv_module.CHUNK_BYTES
    benchmark_convnn.main(["--chunks", "0.001,1", "--batch", "3", "--tokens", "17", "--width", "12", "--K", "3",
                           "--repeats", "1", "--warmup", "0", "--runs", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.001 |")
            or line.startswith("| 1 |")]
    # 17 tokens x 3 slots x 12 channels x 4 bytes = 2,448 bytes per sequence: a 1 KiB budget still takes one.
    assert [row.split(" | ")[1] for row in rows] == ["1", "3"]
    assert all(len(row.split(" | ")[3].split(", ")) == 2 for row in rows)  # one ratio per run
    assert neighbour_conv_module.CHUNK_BYTES == default


@pytest.mark.parametrize("arguments,flag", [
    (["--repeats", "0", "--parts", "layers"], "--repeats"),
    (["--repeats", "1"], "--repeats"),  # the data part needs a batch after the first
    (["--warmup", "-1"], "--warmup"),
    (["--model_batch", "0"], "--model_batch"),
    (["--parts", "layers,bogus"], "--parts"),
    (["--device", "cuda"], "--device"),
    (["--json", "{missing}/out.json"], "--json"),
    (["--json", "{folder}"], "--json"),
])
def test_benchmark_refuses_bad_flags_before_measuring(arguments, flag, tmp_path, monkeypatch, capsys):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for table in ("layer_table", "model_table", "data_table", "operation_table"):
        monkeypatch.setattr(benchmark, table, lambda *args, **kwargs: pytest.fail("measured before refusing"))
    arguments = [argument.format(missing=tmp_path / "missing", folder=tmp_path) for argument in arguments]
    expect_one_line_error(capsys, arguments, 2, f"{flag}: ", main=benchmark.main)


@pytest.mark.parametrize("arguments,flag", [
    (["--batch", "0"], "--batch"),
    (["--repeats", "0"], "--repeats"),
    (["--runs", "0", "--chunks", "1"], "--runs"),
    (["--warmup", "-1"], "--warmup"),
    (["--K", "0"], "--K"),
    (["--K", "18", "--tokens", "17"], "--K"),
    (["--chunks", "2,abc"], "--chunks"),
    (["--chunks", "0,2"], "--chunks"),
    (["--profile", "--width", "10"], "--width"),
])
def test_convnn_benchmark_refuses_bad_flags_before_measuring(arguments, flag, monkeypatch, capsys):
    import benchmark_convnn

    for mode in ("compare_with_reference", "print_profile", "compare_chunk_budgets"):
        monkeypatch.setattr(benchmark_convnn, mode, lambda *args: pytest.fail("measured before refusing"))
    expect_one_line_error(capsys, arguments, 2, f"{flag}: ", main=benchmark_convnn.main)


def test_device_check_refuses_a_device_this_machine_lacks(monkeypatch, capsys):
    import check_device

    monkeypatch.setattr(check_device, "device_problem", lambda name: f"{name} is not available on this machine")
    monkeypatch.setattr(check_device, "combinations", lambda: pytest.fail("checked before refusing"))
    expect_one_line_error(capsys, ["--device", "cuda"], 2, "--device: cuda is not available", main=check_device.main)
