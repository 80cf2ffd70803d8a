"""The benchmark scripts run end to end (on the seconds-long 'smoke' workload) and print
their tables; what they measure is never asserted here."""
from benchmarks import memory, run


def test_run_prints_a_flax_vs_torch_table(capsys):
    run.main(["--workloads", "smoke", "--modes", "infer", "--steps", "1"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| smoke @64"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["fp32", "infer", "2"]
    assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[6].strip("*")) > 0


def test_memory_compares_plain_and_remat(capsys):
    memory.main(["--workloads", "smoke", "--steps", "1", "--size", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smoke")]
    assert [r.split("|")[3].strip() for r in rows] == ["plain", "remat"]


def test_detection_prints_a_torchvision_vs_flaxbones_row(capsys):
    from benchmarks import detection
    detection.main(["--models", "fasterrcnn_mobilenet_v3_large_320_fpn", "--images", "1",
                    "--min-size", "64", "--repeats", "1"])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| fasterrcnn_mobilenet_v3_large_320_fpn"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "64x96"
    assert all(float(c) > 0 for c in cells[2:8])


def test_detection_train_prints_a_torchvision_vs_flaxbones_row(capsys):
    from benchmarks import detection_train
    detection_train.main(["--models", "retinanet_resnet50_fpn", "--images", "1", "--size", "64",
                          "--repeats", "1"])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| retinanet_resnet50_fpn"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "64x96"
    assert all(float(c) > 0 for c in cells[2:6])
