"""The README's scale table, from the last lines that `bench_scale.py` printed.

    python benchmarks/scale_table.py [CPU_LOG] [GPU_LOG] [--readme]
        (defaults benchmarks/results/cpu_scale.log and benchmarks/results/gpu_h200.log;
         --readme replaces the table in README.md instead of printing it)

One row per method x (MIT-States closed, C-GQA closed, C-GQA open) from the CPU log (ViT-L/14's image tower,
`benchmarks/vitl14_image.json`), with the step time as a ratio to CSP's row of the same shape and world in the same
log; the GPU columns come from the GPU log's rows of the same method and shape (closed world only), else "not
measured on a GPU". A row's later line replaces an earlier one (a re-run after a fix).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [("mit-states", "closed"), ("cgqa", "closed"), ("cgqa", "open")]
SHAPE_NAMES = {"mit-states": "MIT-States", "cgqa": "C-GQA"}

def read_rows(path: Path) -> dict:
    "(method, shape, world) -> the last `bench_scale` line's fields (failed rows keep their status and error)."
    rows = {}
    if not path.is_file(): return rows
    for line in path.read_text().splitlines():
        if not line.startswith("bench_scale "): continue
        head, _, error = line.partition(" error=")
        fields = dict(kv.split("=", 1) for kv in head.split()[1:] if "=" in kv)
        if error: fields["error"] = error
        rows[fields["method"], fields["shape"], fields.get("world", "closed")] = fields
    return rows

def gb(x: str) -> str: return f"{float(x):.2f}"

def seconds(x: str) -> str:
    s = float(x)
    return f"{s:.0f}" if s >= 100 else f"{s:.3g}"

def gpu_cells(row: dict | None) -> list[str]:
    if row is None: return ["not measured on a GPU"] * 2
    if row.get("status") == "failed": return [f"failed: {row['error'].split(':')[0]}", ""]
    return [gb(row["peak_gpu_gb"]), seconds(row["step_s"]) if float(row["step_s"]) else "-"]

def table(cpu: dict, gpu: dict) -> str:
    lines = ["| method | benchmark | world | peak anon GB (goal) | cache GB | step s (x CSP) | eval s | "
             "GPU peak GB | GPU step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    methods = sorted({m for m, _, _ in cpu})
    for shape, world in SHAPES:
        for method in methods:
            row = cpu.get((method, shape, world))
            gpu_row = gpu.get((method, shape, "closed")) if world == "closed" else None
            name = [method, SHAPE_NAMES[shape], world]
            if row is None:
                lines.append("| " + " | ".join(name + ["not run", "", "", ""] + gpu_cells(gpu_row)) + " |")
                continue
            if row.get("status") in ("aborted", "failed"):
                cells = [f"{row.get('status')} ({row.get('peak_anon_gb', '?')})", "", "", ""]
                lines.append("| " + " | ".join(name + cells + gpu_cells(gpu_row)) + " |")
                continue
            over = " **over**" if float(row["peak_anon_gb"]) > float(row["goal_gb"]) else ""
            csp = cpu.get(("csp", shape, world))
            step = float(row["step_s"])
            x = step / float(csp["step_s"]) if step and csp and float(csp.get("step_s", 0)) else None
            ratio = "" if x is None else f" ({x:.1f}x)" if x >= 0.1 else f" ({x:.2f}x)"
            eval_s = seconds(row["eval_s"]) + ("*" if row.get("extrapolated") == "1" else "")
            cells = [f"{gb(row['peak_anon_gb'])} ({gb(row['goal_gb'])}){over}", gb(row["cache_gb"]),
                     (seconds(row["step_s"]) + ratio) if step else "-", eval_s]
            lines.append("| " + " | ".join(name + cells + gpu_cells(gpu_row)) + " |")
    return "\n".join(lines)

def replace_readme_table(text: str, new: str) -> str:
    "README text with its scale table (from its header row to the next blank line) replaced by `new`."
    start = text.index(new.splitlines()[0])
    end = text.index("\n\n", start)
    return text[:start] + new + text[end:]

def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    readme = "--readme" in argv
    logs = [a for a in argv if a != "--readme"]
    cpu = read_rows(Path(logs[0]) if logs else ROOT / "benchmarks" / "results" / "cpu_scale.log")
    gpu = read_rows(Path(logs[1]) if len(logs) > 1 else ROOT / "benchmarks" / "results" / "gpu_h200.log")
    if not readme: print(table(cpu, gpu)); return
    path = ROOT / "README.md"
    path.write_text(replace_readme_table(path.read_text(), table(cpu, gpu)))

if __name__ == "__main__":
    main()
