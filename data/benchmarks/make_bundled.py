"""Write the frozen bundled benchmark data/benchmarks/bundled/pairs.jsonl from the bundled inputs.

For each bundled photo i (in file order) and its neighbour j = i + 1 (cyclically):
  I2T: image i, chosen = the human caption of i, rejected = the human caption of j;
  T2I: prompt of i, chosen = photo i, rejected = photo j.
Human-grounded (the captions and prompts were written for these photos), so any reward model should prefer the
chosen side. The photos are copied into bundled/images/ (a benchmark reads nothing outside its own directory) and
referenced relative to the jsonl. Run once by hand; the output is tracked.
"""

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent
rows = [json.loads(line) for line in (HERE.parent / "inputs/texts.jsonl").read_text().splitlines()]
(HERE / "bundled/images").mkdir(parents=True, exist_ok=True)
for r in rows:
    shutil.copyfile(HERE.parent / "inputs" / r["file"], HERE / "bundled/images" / Path(r["file"]).name)
out = []
for i, r in enumerate(rows):
    other = rows[(i + 1) % len(rows)]
    image, other_image = f"images/{Path(r['file']).name}", f"images/{Path(other['file']).name}"
    stem = Path(r["file"]).stem
    out.append({"id": f"i2t-{stem}", "task": "i2t", "image": image, "chosen": r["caption"],
                "rejected": other["caption"]})
    out.append({"id": f"t2i-{stem}", "task": "t2i", "prompt": r["prompt"], "chosen": image,
                "rejected": other_image})
(HERE / "bundled/pairs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
