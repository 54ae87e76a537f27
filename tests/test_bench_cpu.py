"""benchmarks/speed/bench_cpu.py: which end-to-end runs it makes, the default run's command,
and the child environment without the cpu-fast extra (nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.speed.bench_cpu import SlideVariant, forward_name, hide_cpu_fast, segment_command, slide_row_name, slide_variant_list

REPO = Path(__file__).resolve().parent.parent


def _variants(bf16: bool, engines: tuple[str, ...]) -> dict:
    rows = {"reference": ("fp32", "torch", None, None), "torch fp32 NCHW": ("fp32", "torch", None, None),
            "torch fp32 channels-last": ("fp32", "torch", None, None)}
    if bf16:
        rows["torch bf16 channels-last"] = ("bf16", "torch", None, None)
    for engine in engines:
        for precision in ("fp32", "int8"):
            rows[f"{engine} {precision}"] = (precision, engine, None, None)
    return rows


def test_the_runs_cover_bf16_where_native_and_the_default_with_and_without_the_extra(monkeypatch):
    from wsi_ircr.model import engines

    monkeypatch.setattr(engines, "installed_engines", lambda: ["onnxruntime"])
    runs = slide_variant_list(_variants(True, ("onnxruntime",)), ["onnxruntime"], None)
    assert runs == [SlideVariant("fp32", "torch"), SlideVariant("bf16", "torch"), SlideVariant("fp32", "onnxruntime"),
                    SlideVariant("int8", "onnxruntime"), SlideVariant("int8", "onnxruntime", skip_glass=False),
                    SlideVariant("auto", "auto"), SlideVariant("auto", "auto", cpu_fast=False)]
    monkeypatch.setattr(engines, "installed_engines", lambda: [])
    runs = slide_variant_list(_variants(False, ()), [], None)
    assert runs == [SlideVariant("fp32", "torch"), SlideVariant("fp32", "torch", skip_glass=False), SlideVariant("auto", "auto")]


def test_the_default_run_is_the_readme_command_and_names_what_auto_chose(tmp_path):
    cmd = segment_command(SlideVariant("auto", "auto"), tmp_path / "out")
    assert "--precision" not in cmd and "--device" not in cmd and not any(a.startswith("engine=") for a in cmd)
    assert cmd[1:5] == ["-m", "wsi_ircr", "segment", str(REPO / "examples" / "cmu-1-small-region.svs")]
    explicit = segment_command(SlideVariant("int8", "onnxruntime", skip_glass=False, model="fast"), tmp_path / "out")
    assert explicit[-8:] == ["--precision", "int8", "--set", "engine=onnxruntime", "--set", "skip_glass=false", "--model", "fast"]
    assert slide_row_name(SlideVariant("auto", "auto", cpu_fast=False), "fp32", "torch") == "default without the cpu-fast extra (auto: fp32, torch)"
    assert slide_row_name(SlideVariant("int8", "onnxruntime", skip_glass=False), "int8", "onnxruntime") == "int8, onnxruntime, whole tiles"
    assert forward_name("bf16", "torch", None) == "torch bf16 channels-last"
    assert forward_name("int8", "onnxruntime", "fast") == "student onnxruntime int8"


def test_without_the_extra_a_child_finds_no_engine_and_auto_takes_no_int8(tmp_path):
    code = ("import json, torch; from wsi_ircr.model.engines import installed_engines; "
            "from wsi_ircr.model.precision import int8_engine, resolve_engine; "
            "ok = True\ntry:\n import onnxruntime\nexcept ImportError:\n ok = False\n"
            "print(json.dumps([installed_engines(), int8_engine(), resolve_engine('fp32', torch.device('cpu')), ok]))")
    done = subprocess.run([sys.executable, "-c", code], env=hide_cpu_fast(tmp_path / "hide"), capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [[], None, "torch", False]


def test_the_table_names_the_default_runs_by_what_auto_chose(monkeypatch, capsys):
    """main() with the timing and the segment runs stood in for: one row per run, the default
    runs named by the precision and engine their summary reports, rates looked up for them."""
    from benchmarks.speed import bench_cpu
    from wsi_ircr.model import engines

    monkeypatch.setattr(engines, "installed_engines", lambda: ["onnxruntime"])
    variants = _variants(True, ("onnxruntime",))
    seconds = {name: 1.0 for name in variants}
    monkeypatch.setattr(bench_cpu, "forward_variants", lambda threads, student: variants)
    monkeypatch.setattr(bench_cpu, "time_forwards", lambda v, rounds: dict(seconds))
    monkeypatch.setattr(bench_cpu, "tuned_forwards", lambda threads, rounds, student: dict(seconds))
    monkeypatch.setattr(bench_cpu, "reference_rate", lambda net, x: 1.0)
    monkeypatch.setattr(bench_cpu, "forwarded_mpx", lambda skip_glass: 20.0)
    chosen = {True: ("bf16", "torch"), False: ("bf16", "torch")}

    def fake_run(v, out):
        precision, engine = chosen[v.cpu_fast] if v.precision == "auto" else (v.precision, v.engine)
        return 10.0, 500.0, {"tiles": {"segmented": 29}, "nuclei": 3000, "execution": {"precision": precision, "engine": engine}}

    monkeypatch.setattr(bench_cpu, "run_slide", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--rounds", "1", "--slide-rounds", "1", "--student", "", "--no-record"])
    bench_cpu.main()
    rows = [line.split(" | ")[0].lstrip("| ") for line in capsys.readouterr().out.splitlines() if "| 10.0 |" in line]
    assert rows == ["fp32, torch", "bf16, torch", "fp32, onnxruntime", "int8, onnxruntime", "int8, onnxruntime, whole tiles",
                    "default (auto: bf16, torch)", "default without the cpu-fast extra (auto: bf16, torch)"]
