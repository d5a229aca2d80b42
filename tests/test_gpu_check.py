"""bench/gpu_check.sh, the one-call GPU check, kept working on the CPU (`--device cpu`: the demo pair and a tiny
random Llama): every stage runs and its check holds."""
from __future__ import annotations

import subprocess

from helpers import REPO


def test_the_gpu_check_runs_every_stage_on_the_cpu():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |")
            for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert len(rows) == 17  # the header and the 16 stages
    assert rows["circuit demo"].startswith("1108 edges, EAP-IG CPR ")
    assert rows["finetune ZeRO-3 demo, 1 rank(s)"] == "max |change| frozen 0"
    assert rows["finetune ZeRO-3 demo-moe, 1 rank(s)"] == "max |change| frozen 0"
    assert rows["score wandg demo-moe, granularity expert"].startswith("experts chosen per layer: ")
    assert "significant" in rows["patch demo-moe experts and routers"]
    assert rows["eval demo"] == "ASR 0.00, refusal 1.00"  # demo-chat refuses
    assert rows["pipeline demo (one seed, benign attack)"] == "report written"
    assert "significant" in rows["patch demo"] and "aggregate p" in rows["trace demo vs pruned"]
