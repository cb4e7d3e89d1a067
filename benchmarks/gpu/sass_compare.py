"""The rows of two SASS reports (sass_report.py) that differ, as one markdown table whose changed cells
read "before -> after".

    python -m benchmarks.gpu.sass_compare benchmarks/results/sass_before_fused.md benchmarks/results/sass_after.md
"""
import argparse
import sys

KEY_COLUMNS = 4  # kernel, cell, dtype-dot, W_hh


def table(path):
    """The header and the {key: cells} rows of a report's table."""
    header, rows = None, {}
    with open(path) as handle:
        for line in handle:
            if not line.startswith("|") or line.startswith("|---"):
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                rows[tuple(cells[:KEY_COLUMNS])] = cells[KEY_COLUMNS:]
    return header, rows


def compare(before_path, after_path):
    header, before = table(before_path)
    after_header, after = table(after_path)
    if after_header != header:
        raise ValueError(f"the reports' columns differ: {header} against {after_header}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, cells in after.items():
        old = before.get(key)
        if old == cells:
            continue
        shown = cells if old is None else [new if o == new else f"{o} -> {new}" for o, new in zip(old, cells)]
        lines.append("| " + " | ".join(list(key) + shown) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    print(compare(args.before, args.after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
