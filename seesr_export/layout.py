"""Where a SeeSR checkout keeps its checkpoints (the defaults of ``test_seesr.py``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .errors import CheckpointError

LAYOUT_HELP = """\
expected a SeeSR checkout laid out as:
  preset/models/stable-diffusion-2-base/{scheduler,tokenizer,text_encoder,vae,feature_extractor}/
  preset/models/seesr/{unet,controlnet}/        (config.json + diffusion_pytorch_model.{bin,safetensors})
  preset/models/ram_swin_large_14m.pth
  preset/models/DAPE.pth
  ram/data/ram_tag_list.txt
  ram/data/ram_tag_list_threshold.txt"""


@dataclass(frozen=True)
class SeeSRPaths:
    """Every input file or folder the toolkit reads, each overridable on its own."""

    sd2: Path
    unet: Path
    controlnet: Path
    ram: Path
    dape: Path
    tag_list: Path
    tag_thresholds: Path

    @classmethod
    def from_root(cls, root: Path | str, **overrides: Path | str | None) -> SeeSRPaths:
        root = Path(root)
        models = root / "preset" / "models"
        defaults = dict(
            sd2=models / "stable-diffusion-2-base",
            unet=models / "seesr" / "unet",
            controlnet=models / "seesr" / "controlnet",
            ram=models / "ram_swin_large_14m.pth",
            dape=models / "DAPE.pth",
            tag_list=root / "ram" / "data" / "ram_tag_list.txt",
            tag_thresholds=root / "ram" / "data" / "ram_tag_list_threshold.txt",
        )
        defaults.update({k: Path(v) for k, v in overrides.items() if v is not None})
        return cls(**defaults)

    def check(self) -> SeeSRPaths:
        """Fail early, naming every missing path, before any heavy loading."""
        missing = [f"{f.name}: {getattr(self, f.name)}" for f in fields(self) if not getattr(self, f.name).exists()]
        if missing:
            raise CheckpointError("missing SeeSR inputs:\n  " + "\n  ".join(missing) + "\n" + LAYOUT_HELP)
        return self
