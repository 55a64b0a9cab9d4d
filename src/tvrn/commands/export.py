"""`tvrn export RUN_OR_CKPT OUT/`: a model as a folder others load in one line (docs/export.md).

    tvrn export runs/tvrn models/tvrn-synth            # the run's best.pt (else last.pt)
    tvrn export scan.pt models/scan --force             # a checkpoint (trained or converted); replace OUT
"""
from __future__ import annotations

import argparse
import shlex


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a shareable folder (safetensors weights, config, vocabulary, model card)",
        description="Write the model of a training run (its best.pt, else last.pt), a checkpoint (trained or made "
                    "by `tvrn convert`), a model folder or an hf-hub: name as a self-describing folder: "
                    "model.safetensors, config.json (model, tokenizer, the image features it expects, sha256 of "
                    "the files), vocab.json (GRU text encoders) and a README.md model card. `tvrn eval OUT`, "
                    "tvrn.load('OUT') and tvrn.load_model('OUT') read it.")
    p.add_argument("source", help="a training run folder, a checkpoint (.pt), a model folder or hf-hub:ORG/NAME")
    p.add_argument("out", help="the model folder to write (built beside it, then renamed into place)")
    p.add_argument("--data", help="the data folder the model was trained on, when neither the checkpoint nor the "
                                  "run.json beside it records it (its `tvrn extract` manifest gives the recipe)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is already a model folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvrn.export import export_model

    command = ["tvrn", "export", args.source, args.out]
    if args.data:
        command += ["--data", args.data]
    if args.force:
        command.append("--force")
    cfg = export_model(args.source, args.out, data_root=args.data, command=shlex.join(command),
                       overwrite=args.force)
    feat = cfg["features"]
    print(f"tvrn export: {cfg['model_name']} ({cfg['parameters'] / 1e6:.2f} M parameters) -> {args.out}")
    for rel, digest in cfg["files"].items():
        print(f"  {rel}  sha256 {digest}")
    print(f"  image input: features of size {feat['feature_size']}"
          + (f", {feat['num_regions']} regions" if feat.get("num_regions") else "")
          + (", boxes" if feat.get("boxes") else "")
          + ("; photos: the recorded `tvrn extract` recipe" if feat.get("extract") else
             "; photos: not possible (training features not made by `tvrn extract`)"))
    print(f"  load it: tvrn.load({args.out!r}).similarity(images, texts)")
    return 0
