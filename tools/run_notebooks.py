"""Execute the library notebooks in order and store their outputs, as a reader sees them in JupyterLab.

    python tools/run_notebooks.py                 # every numbered notebook and index.ipynb
    python tools/run_notebooks.py 24_sam 25_hope  # some of them

Each notebook runs in a fresh kernel from nbs/ (as JupyterLab runs it). Cells marked `#| slow`, `#| notest`
or `#| cuda` are not run here and keep the outputs they have. Then the noise a reader should not see is
stripped: progress-bar carriage-return frames (only each line's final state stays), stderr boxes
(warnings), absolute paths of this machine, the progress lines' timings, and oversized PNG figures
(re-encoded as JPEG). Last, `nbdev_clean` normalises the file, so that running it again leaves it as is.
"""
import base64, io, os, re, subprocess, sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"
SKIP_FLAGS = ("slow", "notest", "cuda")
MAX_PNG_BYTES = 60_000


def library_notebooks() -> list[Path]:
    return sorted(p for p in NBS.glob("*.ipynb") if p.name[:2].isdigit() or p.name == "index.ipynb")


def _skipped(cell) -> bool:
    flags = re.findall(r"^#\|\s*(\w+)", cell.source, flags=re.M)
    return any(flag in SKIP_FLAGS for flag in flags) or "skip_exec: true" in cell.source


def _clean_text(text: str) -> str:
    "Keep each line's last carriage-return frame; write this machine's paths as a reader's."
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    text = "\n".join(line for line in lines if not re.fullmatch(r".*: \d+ steps in [\d.]+ s", line))
    for path, short in ((str(REPO), "."), (str(Path.home()), "~")):
        text = text.replace(path, short)
    return re.sub(r"/tmp/[\w./-]+", "/tmp/...", text)


def _small_image(data: str) -> tuple[str, str]:
    "A PNG over MAX_PNG_BYTES becomes a JPEG (figures are photographs and plots; both read fine)."
    raw = base64.b64decode(data)
    if len(raw) <= MAX_PNG_BYTES: return "image/png", data
    from PIL import Image
    out = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").save(out, format="JPEG", quality=80, optimize=True)
    return "image/jpeg", base64.b64encode(out.getvalue()).decode()


def clean_outputs(cell) -> None:
    outputs = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            if out.name == "stderr": continue
            out.text = _clean_text(out.text)
            if not out.text.strip(): continue
        elif out.output_type in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "text/plain" in data: data["text/plain"] = _clean_text(data["text/plain"])
            if "text/html" in data: data["text/html"] = _clean_text(data["text/html"])
            if "image/png" in data:
                kind, payload = _small_image(data.pop("image/png"))
                data[kind] = payload
        outputs.append(out)
    cell.outputs = outputs


def run(path: Path, timeout: int = 1800) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NBS)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or _skipped(cell): continue
            client.execute_cell(cell, index)
            clean_outputs(cell)
    nbformat.write(nb, path)
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(path)], check=True, cwd=REPO)
    print(f"{path.name}: {path.stat().st_size / 1000:.0f} KB")


def main(names: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = [NBS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] if names else library_notebooks()
    for path in paths: run(path)


if __name__ == "__main__":
    main(sys.argv[1:])
