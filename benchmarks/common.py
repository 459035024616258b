"""What the benchmarks share: the machine line, the load average, a plain-text table and a Markdown one."""

from __future__ import annotations

import os
import platform

import torch
import transformers


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_line() -> str:
    """One line saying what the numbers were measured on (recorded next to every table)."""
    return (
        f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels), "
        f"transformers {transformers.__version__}"
    )


def load_line() -> str:
    """The 1/5/15-minute load average: with 2 cores, anything above ~0.5 means our timings share the CPU."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Right-aligned text table; floats get thousands separators and one decimal."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[k]) for r in cells)) for k, c in enumerate(columns)]

    def line(parts: list[str]) -> str:  # the first column is a label: left-aligned
        return "  ".join(p.ljust(w) if k == 0 else p.rjust(w) for k, (p, w) in enumerate(zip(parts, widths)))

    print(line(columns))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(line(r))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The same table as Markdown (floats with thousands separators and one decimal)."""

    def cell(v) -> str:
        return f"{v:,.1f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
