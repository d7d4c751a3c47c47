"""Whether a Trainer checkpoint folder (`checkpoint-<step>/`) loads in full, before a run resumes from it.

No mlflow here. Tensors saved by torch are zip archives: their members are read and CRC-checked
(`zipfile.ZipFile.testzip`) without unpickling anything, since a checkpoint folder may come from elsewhere;
safetensors and JSON files are read in full.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors.torch import load_file


def checkpoint_damage(folder: str | Path) -> str | None:
    """What keeps a Trainer checkpoint folder from loading ("optimizer.pt: PytorchStreamReader failed ..."),
    or None where every file in it reads: each `.pt`/`.pth`/`.bin` (optimizer, scheduler, RNG states) as a
    complete zip archive whose every member passes its CRC, each `.safetensors` in full, each `.json`
    (trainer_state.json must be there) as JSON. A copy cut
    off on a full disk or by a crash mid-save would otherwise fail the resumed run, and every rerun after it."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return "trainer_state.json missing (cut off mid-save)"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:  # torch.save's format; a cut-off file has no central directory
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
            elif path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - whatever a damaged file raises, the checkpoint is unusable
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{path.relative_to(folder)}: {reason[:200]}"
    return None
