"""What a user would run instead of the Ray job: a `torchrun` script with a PyTorch DataLoader (BLIText's setup).

    torchrun --standalone --nproc_per_node=1 bench/torchrun_baseline.py --config CONFIG [key=value ...] \
        [--loader-workers 1] [--threads 1]

The same stage as the Ray job of that config, without Ray: the same model (`stage.build_model`), objective
(`stage.losses`), optimiser, schedule and step (`app.train.step.Stepper`, DDP-wrapped trainable modules when
more than one process runs), and the same data functions on the fly in `--loader-workers` DataLoader worker
processes: stage 0 reads the corpus's lines (`parse_rows`), shuffles them and cleans + tokenizes each batch
(`preprocess_text_batch`); stages 1-2 read the WebDataset shards in a shuffled file order (`iter_tar_samples`)
and decode, transform and tokenize each batch (`preprocess_image_batch`). No MLflow, no checkpoints (the Ray
job writes one at the end, after its clock stops). Rank 0 prints one JSON line per `train.log_every_steps`
window: {"step", "time" (Unix seconds at its end), "samples_per_s"}; the comparison is
`bench/vs_torchrun.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402


class Epochs(IterableDataset):
    """An iterable dataset that yields one epoch per iteration (`epoch` set before each; the loader's worker
    processes, started anew for each iteration, see it)."""

    epoch = 0


class TextBatches(Epochs):
    """Stage 0: the corpus's rows, shuffled, in batches tokenized as Ray Data's `text_dataset` does."""

    def __init__(self, cfg, batch_size: int, rank: int, world: int, llm_is_encoder_decoder: bool):
        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world
        self.encoder_decoder = llm_is_encoder_decoder

    def __iter__(self):
        from app.data.text import _raw_lines, corpus_files, parse_rows, preprocess_text_batch

        cfg, info = self.cfg, get_worker_info()
        shard, shards = self.rank * (info.num_workers if info else 1) + (info.id if info else 0), \
            self.world * (info.num_workers if info else 1)
        rows = []
        for fmt, paths in corpus_files(cfg.data.text, cfg.data.text_format)[1].items():
            for path in sorted(paths):
                with open(path, "rb") as f:
                    rows.extend(parse_rows(_raw_lines(f), fmt, cfg.data.text_column, path))
        epoch = self.epoch
        # one epoch per iteration of the loader, as a script's `for epoch ...: for batch in loader`
        order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(rows))[shard::shards]
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            chosen = [rows[i] for i in order[start:start + self.batch_size]]
            raw = {"text": np.array([t for t, _ in chosen], dtype=object),
                   "problem": np.array([p for _, p in chosen], dtype=object)}
            arrays = preprocess_text_batch(
                raw, pformer_tokenizer=cfg.model.pformer, llm_tokenizer=cfg.model.llm,
                llm_is_encoder_decoder=self.encoder_decoder, max_chars=cfg.data.max_chars,
                max_txt_len=cfg.data.max_txt_len, seed=cfg.run.seed, caption_style=cfg.data.caption_style,
                max_words=cfg.data.max_words)
            if arrays and len(next(iter(arrays.values()))) == self.batch_size:
                yield {k: torch.from_numpy(v) for k, v in arrays.items()}


class ShardBatches(Epochs):
    """Stages 1-2: the shards' samples, files in a shuffled order, decoded in batches as `image_text_dataset`."""

    def __init__(self, cfg, stage, batch_size: int, rank: int, world: int):
        from app.data.media import MediaSpec
        from app.data.sources import shard_files
        from app.models.vision import image_size_for

        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world
        self.files = sorted(p for paths in shard_files(cfg.data.train, cfg.data.image_format)[1].values() for p in paths)
        self.media = MediaSpec.from_config(cfg, size=image_size_for(cfg, None), train=True)
        self.captions = stage.caption_spec(cfg, None)

    def __iter__(self):
        import pyarrow as pa

        from app.data.samples import preprocess_image_batch
        from app.data.sources import SCHEMA, iter_tar_samples

        info = get_worker_info()
        shard = self.rank * (info.num_workers if info else 1) + (info.id if info else 0)
        shards = self.world * (info.num_workers if info else 1)
        epoch, pending = self.epoch, []
        # one epoch per iteration of the loader
        files = list(self.files)
        random.Random(self.cfg.run.seed * 1000 + epoch).shuffle(files)
        for path in files[shard::shards]:
            with open(path, "rb") as f:
                for row in iter_tar_samples(f, path, self.cfg.data.caption_column):
                    pending.append(row)
                    if len(pending) == self.batch_size:
                        out = preprocess_image_batch(pa.Table.from_pylist(pending, schema=SCHEMA),
                                                     media=self.media, captions=self.captions,
                                                     seed=self.cfg.run.seed)
                        pending = []
                        if out and len(out["pixels"]) == self.batch_size:
                            yield {k: torch.from_numpy(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from app.config import load_config
    from app.data.captions import trim_padding
    from app.models.llm import llm_is_encoder_decoder
    from app.stages import get_stage
    from app.train.levers import apply_levers
    from app.train.loop import _to_device
    from app.train.optim import build_optimizer, build_scheduler
    from app.train.step import Stepper

    cfg = load_config(args.config, args.overrides)
    stage = get_stage(cfg.stage)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = torch.device("cpu")
    model = stage.build_model(cfg).to(device)
    apply_levers(model, cfg, device)
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = build_scheduler(optimizer, cfg.train)
    if world > 1:
        for name in model.trainable_names:
            setattr(model, name, torch.nn.parallel.DistributedDataParallel(getattr(model, name)))
    model.train()
    stepper = Stepper(model, stage.losses, optimizer, scheduler, accum_steps=cfg.train.grad_accum_steps,
                      grad_clip_norm=cfg.train.grad_clip_norm)
    batch_size = cfg.train.batch_size_per_worker
    data = (TextBatches(cfg, batch_size, rank, world, llm_is_encoder_decoder(cfg.model.llm)) if cfg.stage == "pformer"
            else ShardBatches(cfg, stage, batch_size, rank, world))
    loader = DataLoader(data, batch_size=None, num_workers=args.loader_workers,
                        prefetch_factor=cfg.data.prefetch_batches if args.loader_workers else None,
                        persistent_workers=False)  # (each epoch's iteration starts workers that see data.epoch)
    step, window_start, window = 0, time.perf_counter(), cfg.train.log_every_steps
    for epoch in range(cfg.train.epochs * 1000):  # max_steps ends the run
        data.epoch = epoch
        for batch in loader:
            batch.pop("sample_id", None)
            _, stepped = stepper.micro(trim_padding(_to_device(batch, device)))
            if not stepped:
                continue
            step += 1
            if step % window == 0:
                now = time.perf_counter()
                if rank == 0:
                    rate = window * batch_size * cfg.train.grad_accum_steps * world / (now - window_start)
                    print(json.dumps({"step": step, "time": round(time.time(), 3), "samples_per_s": round(rate, 2)}),
                          flush=True)
                window_start = now
            if step >= cfg.train.max_steps:
                break
        stepper.discard()
        if step >= cfg.train.max_steps:
            break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
