"""First and last value of every ``val/*`` and ``train/loss*`` column of a Lightning CSV log
(``metrics.csv``): ``python benchmarks/summarise_metrics.py PATH``."""

import csv
import sys


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for key in [k for k in (rows[0] if rows else {}) if k.startswith(("val/", "train/loss"))]:
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            print(f"  {key}: first {values[0]:.4f} last {values[-1]:.4f} ({len(values)} values)")


if __name__ == "__main__":
    main(sys.argv[1])
