"""What every experiment writes: its markdown table and its raw results, side by side in experiments/out/."""
import json
import os
from typing import Any


def write_outputs(out_dir: str, stem: str, table: str, results: Any) -> str:
    """Writes OUT_DIR/STEM.md (the table) and OUT_DIR/STEM.json (the results); returns OUT_DIR/STEM."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".md", "w") as f:
        f.write(table.rstrip("\n") + "\n")
    with open(path + ".json", "w") as f:
        json.dump(results, f, indent=1, default=float)
    return path
